"""CIFD for CLIP (paper Sec. 3.3.1, eq. 10-13; Tables 4, 5, 12-15): open_clip ViT-L-14 -> ViT-S-16 on CC12M.

    accelerate launch recipes/clip_vitl_to_vits.py --output_dir runs/clip_vits16
    accelerate launch recipes/clip_vitl_to_vits.py --student open_clip:RN50 --output_dir runs/clip_rn50
    accelerate launch --config_file recipes/configs/accelerate/multi_gpu.yaml recipes/clip_vitl_to_vits.py --output_dir runs/x
    ACCELERATE_USE_CPU=1 torchrun --nproc_per_node 2 recipes/clip_vitl_to_vits.py --smoke --output_dir /tmp/smoke  # 2 CPU processes

Paper defaults (``recipes/configs/clip_vitl_to_vits.yaml``; each overridable by its flag or ``--config my.yaml``;
Appendix A.3): teacher ``open_clip:ViT-L-14@openai``, student ``open_clip:ViT-S-16`` (or RN50 / ViT-B-16), CC12M
streamed from ``pixparse/cc12m-wds``, batch 256 per GPU (1024 on 4 GPUs), lr 1e-3, warmup 1/6 of training, 32 "epochs"
of 3M pairs, lambda_CL = 0.005, 3 RDMs per modality trained for 7 "epochs" of 3M pairs. Evaluation: zero-shot ImageNet
(``clip-benchmark/wds_imagenet1k``) and Flickr30k retrieval (``clip-benchmark/wds_flickr30k``). Every
DistillationConfig flag works (``--method clipkd``, ``--lambda_ibm``, ``--push_to_hub``, ...). ``--smoke``: see
:mod:`hf_cifd.clip_pipeline`.

Writes ``<output_dir>/eval_results.json`` (zero-shot top-1/top-5, both retrieval directions' R@1/5/10) and the student
in open_clip's format to ``<output_dir>/student`` (``open_clip.create_model_and_transforms("local-dir:...")``).
"""


def main():
    from hf_cifd.clip_pipeline import recipe_main

    recipe_main(__file__)


if __name__ == "__main__":
    main()
