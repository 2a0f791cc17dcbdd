"""CIFD on ImageNet-1k (paper Table 3 / Appendix A.2): timm ResNet34 teacher -> ResNet18 student.

    accelerate launch recipes/imagenet_r34_to_r18.py --output_dir runs/r34_r18
    accelerate launch recipes/imagenet_r34_to_r18.py --method kd --output_dir runs/r34_r18_kd
    accelerate launch --config_file recipes/configs/accelerate/multi_gpu.yaml recipes/imagenet_r34_to_r18.py --output_dir runs/x
    ACCELERATE_USE_CPU=1 torchrun --nproc_per_node 2 recipes/imagenet_r34_to_r18.py --smoke --output_dir /tmp/smoke  # 2 CPU processes

Paper defaults (``recipes/configs/imagenet_r34_to_r18.yaml``; each overridable by its flag or ``--config my.yaml``; every
DistillationConfig / RecipeArguments flag works): teacher
``timm:resnet34.a1_in1k`` (pretrained), student ``timm:resnet18`` (random init), ``timm/imagenet-1k-wds`` streamed
(gated on the Hub: log in first), SGD (momentum 0.9) lr 2.0, batch 1024 per device, weight decay 5e-5, 88 epochs,
tau 2, lambda_CE = lambda_KL = lambda_n = 1, KD dropout 0.25, embedding-loss weight 100 with smooth-L1, IBM with
lambda_I 0.001, 3 RDMs with R = 1e4, 5e3, 1e3 (three hidden layers of 512, activation after the 1st and 3rd, bottleneck
after the 2nd) trained 30 epochs on the cached teacher embeddings (95/5 split). Schedule: linear warm-up for 2 epochs,
then linear decay (the ffcv defaults the paper refers to).

Writes ``<output_dir>/eval_results.json`` (top-1 on the validation split, teacher calls, RDM metrics, processes, wall
time), ``<output_dir>/rdms/`` and the student in timm's format to ``<output_dir>/student``
(``timm.create_model("local-dir:<output_dir>/student", pretrained=True)``). ``--smoke``: offline, random-init models at 32 px on the
generated coloured-shapes webdataset (see :mod:`hf_cifd.pipeline`).
"""

SMOKE = {"teacher": "timm:resnet34", "student": "timm:resnet18"}  # --smoke: random-init models (on top of hf_cifd.pipeline.SMOKE_DEFAULTS)


def main():
    from hf_cifd.pipeline import recipe_main

    recipe_main(__file__, SMOKE)


if __name__ == "__main__":
    main()
