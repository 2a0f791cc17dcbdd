"""CIFD for CLIP (paper Sec. 3.3.1, eq. 10-13; Tables 4, 5, 12-15): open_clip ViT-L-14 -> ViT-S-16 on CC12M.

    accelerate launch recipes/clip_vitl_to_vits.py --output_dir runs/clip_vits16
    accelerate launch recipes/clip_vitl_to_vits.py --student RN50 --output_dir runs/clip_rn50
    accelerate launch --config_file recipes/configs/accelerate/multi_gpu.yaml recipes/clip_vitl_to_vits.py --output_dir runs/x
    ACCELERATE_USE_CPU=1 torchrun --nproc_per_node 2 recipes/clip_vitl_to_vits.py --smoke --output_dir /tmp/smoke  # 2 CPU processes

Paper defaults (Appendix A.3): teacher ViT-L-14 (pretrained tag ``--teacher_pretrained``, default "openai"), student
ViT-S-16 (or RN50 / ViT-B-16), CC12M streamed from ``pixparse/cc12m-wds``, batch 256 per GPU (1024 on 4 GPUs),
lr 1e-3, warmup 1/6 of training, 32 "epochs" of 3M pairs, lambda_CL = 0.005, 3 RDMs per modality trained for 7
"epochs" of 3M pairs. Evaluation: zero-shot ImageNet (``clip-benchmark/wds_imagenet1k``) and Flickr30k retrieval
(``clip-benchmark/wds_flickr30k``). Every DistillationConfig flag works (``--method clipkd``, ``--lambda_ibm``, ...).

``--smoke``: offline, on tiny open_clip configs and the generated coloured-shapes data (:mod:`hf_cifd.data.shapes`,
24 classes): a tiny teacher is first trained with plain CLIP (stand-in for the pretrained ViT-L-14), then the RDMs,
then the student is distilled with CIFD and evaluated. Teacher and student differ in image size, mean/std and
context length.

Writes ``<output_dir>/eval_results.json`` (zero-shot top-1/top-5, both retrieval directions' R@1/5/10) and the student
in open_clip's format to ``<output_dir>/student`` (``open_clip.create_model_and_transforms("local-dir:...")``).
"""

from __future__ import annotations

import glob
import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field

import torch
from transformers import HfArgumentParser

from hf_cifd import DistillationConfig, DistillationTrainer
from hf_cifd.adapters.open_clip import create_openclip
from hf_cifd.clip_eval import CLIPEvaluator
from hf_cifd.data.collate import collate
from hf_cifd.distributed import shutdown
from hf_cifd.data.loading import load_image_dataset

logger = logging.getLogger("clip_vitl_to_vits")

SAMPLES_PER_EPOCH = 3_000_000  # the paper's "epoch" on CC12M

# Tiny configs for --smoke (random init): different widths, image sizes, mean/std and context lengths.
SMOKE_TEACHER = {"embed_dim": 64, "vision_cfg": {"image_size": 32, "layers": 3, "width": 96, "patch_size": 8, "head_width": 32},
                 "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}}
SMOKE_TEACHER_PP = {"mean": [0.48145466, 0.4578275, 0.40821073], "std": [0.26862954, 0.26130258, 0.27577711]}
SMOKE_STUDENT = {"embed_dim": 48, "vision_cfg": {"image_size": 24, "layers": 2, "width": 64, "patch_size": 6, "head_width": 32},
                 "text_cfg": {"context_length": 12, "vocab_size": 49408, "width": 48, "heads": 2, "layers": 2}}
SMOKE_STUDENT_PP = {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}


@dataclass
class RecipeArgs:
    smoke: bool = field(default=False, metadata={"help": "Offline run on tiny configs and generated shapes data."})
    teacher: str = field(default="ViT-L-14", metadata={"help": "open_clip teacher: name, hf-hub:..., local-dir:..."})
    teacher_pretrained: str = field(default="openai", metadata={"help": "Pretrained tag, e.g. openai, datacomp_xl_s13b_b90k."})
    student: str = field(default="ViT-S-16", metadata={"help": "open_clip student architecture: ViT-S-16, RN50 or ViT-B-16."})
    dataset: str = field(default="pixparse/cc12m-wds", metadata={"help": "Image-text training data (streamed)."})
    data_files: list[str] | None = field(default=None, metadata={"help": "Local shards (with --dataset webdataset)."})
    epochs: float = field(default=32.0, metadata={"help": "Paper 'epochs' of --samples_per_epoch pairs (sets max_steps)."})
    samples_per_epoch: int = field(default=SAMPLES_PER_EPOCH)
    rdm_samples_per_epoch: int = field(default=SAMPLES_PER_EPOCH)
    rdm_dir: str | None = field(default=None, metadata={"help": "Load trained RDMs (rdm-<modality>-<i>/) from here."})
    zeroshot_dataset: str = field(default="clip-benchmark/wds_imagenet1k")
    retrieval_dataset: str = field(default="clip-benchmark/wds_flickr30k")
    eval_max_samples: int | None = field(default=None)
    shuffle_buffer: int = field(default=10_000)
    smoke_teacher_steps: int = field(default=150)


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def barrier():
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def parse():
    parser = HfArgumentParser((RecipeArgs, DistillationConfig))
    argv = sys.argv[1:]
    smoke = "--smoke" in argv
    defaults = {  # paper defaults; explicit flags win
        "--per_device_train_batch_size": "256", "--learning_rate": "1e-3", "--warmup_steps": str(1 / 6),
        "--lambda_cl": "0.005", "--lr_scheduler_type": "cosine", "--weight_decay": "0.1", "--method": "cifd",
        "--rdm_epochs": "7", "--logging_steps": "50", "--save_strategy": "no", "--report_to": "none",
        "--dataloader_num_workers": "0" if smoke else "4", "--per_device_eval_batch_size": "256",
    }
    if smoke:
        defaults.update({"--per_device_train_batch_size": "64", "--max_steps": "150", "--learning_rate": "2e-3",
                         "--logging_steps": "50", "--rdm_rates": ["30", "10", "3"], "--rdm_hidden_dims": ["64", "64", "64"],
                         "--lambda_ibm": "0.001", "--per_device_eval_batch_size": "128", "--use_cpu": "true",
                         "--eval_strategy": "no", "--disable_tqdm": "true"})
    for flag, value in defaults.items():
        if flag not in argv:
            argv += [flag, *value] if isinstance(value, list) else [flag, value]
    if "--output_dir" not in argv:
        argv += ["--output_dir", "runs/clip_vitl_to_vits"]
    return parser.parse_args_into_dataclasses(argv)


def make_smoke_data(root: str) -> dict[str, str]:
    from hf_cifd.data import shapes

    dirs = {name: os.path.join(root, name) for name in ("train", "zeroshot", "retrieval")}
    if int(os.environ.get("RANK", "0")) == 0 and not os.path.exists(os.path.join(dirs["retrieval"], "info.json")):
        shapes.write_webdataset(dirs["train"], 4096, seed=1, shard_size=512)
        shapes.write_webdataset(dirs["zeroshot"], 480, seed=2, shard_size=480)
        shapes.write_webdataset(dirs["retrieval"], 200, seed=3, shard_size=200, captions_per_image=2)
    barrier()
    return dirs


def train_dataset(path, data_files, student_pre, student_tok, teacher_pre=None, teacher_tok=None, shuffle_buffer=None,
                  view=None):
    """``view`` (a SharedView) replaces both image transforms: one crop per sample, each model's own finishing."""
    return load_image_dataset(path, task="image-text", data_files=data_files, streaming=True,
                              transform=None if view is not None else student_pre, tokenizer=student_tok,
                              teacher_transform=None if view is not None else teacher_pre, teacher_tokenizer=teacher_tok,
                              shuffle_buffer=shuffle_buffer, view=view)


def main():
    args, config = parse()
    # Each process streams its own shards (CC12M has thousands) instead of rank 0 decoding for everyone.
    config.accelerator_config.dispatch_batches = False
    logging.basicConfig(level=logging.INFO if int(os.environ.get("RANK", "0")) == 0 else logging.WARNING)
    t0 = time.time()
    out = config.output_dir
    os.makedirs(out, exist_ok=True)
    base = {k: v for k, v in config.to_dict().items()}

    def cfg(**overrides) -> DistillationConfig:
        d = {k: v for k, v in base.items() if k in DistillationConfig.__dataclass_fields__
             and DistillationConfig.__dataclass_fields__[k].init}
        d.update(overrides)
        d["accelerator_config"] = {**dict(d.get("accelerator_config") or {}), "dispatch_batches": False}
        return DistillationConfig(**d)

    if args.smoke:
        # Tiny models on a shared CPU: one intra-op thread per process avoids oversubscription (2-4x faster here).
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size()))
        data = make_smoke_data(os.path.join(out, "data"))
        files = {"train": sorted(glob.glob(os.path.join(data["train"], "*.tar")))}
        teacher, t_pre_train, t_pre_val, t_tok = create_openclip(SMOKE_TEACHER, preprocess_cfg=SMOKE_TEACHER_PP)
        student, s_pre_train, s_pre_val, s_tok = create_openclip(SMOKE_STUDENT, preprocess_cfg=SMOKE_STUDENT_PP)
        # Stand-in for a pretrained teacher: a short plain-CLIP run of the tiny teacher on the same data.
        torch.manual_seed(0)
        teacher_ds = train_dataset("webdataset", files, t_pre_val, t_tok, shuffle_buffer=1024)
        pre = DistillationTrainer(teacher, args=cfg(method="clip", output_dir=os.path.join(out, "teacher"),
                                                     max_steps=args.smoke_teacher_steps, learning_rate=2e-3,
                                                     warmup_steps=0.1),
                                  train_dataset=teacher_ds, data_collator=collate)
        pre.train()
        teacher = pre.accelerator.unwrap_model(pre.model).student
        zs_dir, rt_dir = data["zeroshot"], data["retrieval"]
        rdm_steps = max(1, int(0.3 * config.max_steps))
        train_files, train_path = files, "webdataset"
        s_pre_aug = s_pre_val  # no augmentation on 24 px shapes
    else:
        teacher, t_pre_train, t_pre_val, t_tok = create_openclip(args.teacher, args.teacher_pretrained)
        student, s_pre_aug, s_pre_val, s_tok = create_openclip(args.student)
        zs_dir, rt_dir = args.zeroshot_dataset, args.retrieval_dataset
        global_batch = config.per_device_train_batch_size * world_size()
        if config.max_steps is None or config.max_steps <= 0:
            config.max_steps = int(args.epochs * args.samples_per_epoch / global_batch)
            base["max_steps"] = config.max_steps
        rdm_steps = int(config.rdm_epochs * args.rdm_samples_per_epoch / global_batch)
        train_files, train_path = ({"train": args.data_files} if args.data_files else None), args.dataset
    teacher.eval().requires_grad_(False)

    # Student data: each sample carries the student's AND the teacher's inputs (own tokenizers), both images cut from
    # ONE random view of the picture (the student's augmentation), each resized / normalised for its model.
    from hf_cifd.data.views import SharedView

    ds = train_dataset(train_path, train_files, None, s_tok, None, t_tok,
                       shuffle_buffer=1024 if args.smoke else args.shuffle_buffer,
                       view=SharedView(s_pre_aug, s_pre_val, t_pre_val, train=True, seed=config.seed))

    rdms = None
    if config.method == "cifd" and config.num_rdms:
        from hf_cifd import train_rdms

        rdm_ds = train_dataset(train_path, train_files, t_pre_val, t_tok,
                               shuffle_buffer=1024 if args.smoke else args.shuffle_buffer)
        rates = {m: list(config.rdm_rates) for m in ("image", "text")}
        rdm_eval = None
        if args.smoke:  # the RDM report (rate / distortion per RDM) on held-out pairs, not on the whole train set
            rdm_eval = train_dataset("webdataset", {"train": sorted(glob.glob(os.path.join(rt_dir, "*.tar")))}, t_pre_val, t_tok)
        from accelerate import Accelerator
        from accelerate.utils import DataLoaderConfiguration

        # Each process streams its own shards; dispatching would try to concatenate the string fields (keys, text).
        rdm_accelerator = Accelerator(dataloader_config=DataLoaderConfiguration(dispatch_batches=False))
        report = train_rdms(rdm_ds, teacher=teacher, rates=rates, max_steps=rdm_steps, eval_dataset=rdm_eval,
                            accelerator=rdm_accelerator,
                            batch_size=config.per_device_train_batch_size, learning_rate=config.rdm_learning_rate,
                            hidden_dims=config.rdm_hidden_dims, distortion="mse", collate_fn=collate,
                            output_dir=os.path.join(out, "rdms"), progress=False)
        rdms = report.rdms

    evaluator = None
    if int(os.environ.get("RANK", "0")) == 0:
        evaluator = CLIPEvaluator(s_pre_val, s_tok, zs_dir, rt_dir, max_samples=args.eval_max_samples,
                                  batch_size=config.per_device_eval_batch_size)
    trainer = DistillationTrainer(student, teacher, args=config, train_dataset=ds, rdms=rdms, data_collator=collate,
                                  evaluator=evaluator if evaluator is not None else (lambda model: {}))
    trainer.train()
    metrics = trainer.evaluate()
    trainer.save_model(os.path.join(out, "student"))
    if trainer.is_world_process_zero():
        keys = ["zeroshot_top1", "zeroshot_top5", "zeroshot_chance_top1"] + [
            f"{d}_retrieval_recall@{k}" for d in ("image", "text") for k in (1, 5, 10)]
        results = {k: metrics[f"eval_{k}"] for k in keys if f"eval_{k}" in metrics}
        results.update({k[len("eval_"):]: v for k, v in metrics.items()
                        if k.startswith("eval_") and k[len("eval_"):] not in results})
        results.update({"method": config.method, "teacher": "smoke-tiny" if args.smoke else args.teacher,
                        "student": "smoke-tiny" if args.smoke else args.student, "max_steps": config.max_steps,
                        "num_processes": world_size(), "wall_time_s": round(time.time() - t0, 1)})
        with open(os.path.join(out, "eval_results.json"), "w") as f:
            json.dump(results, f, indent=2)
        logger.info("eval results: %s", json.dumps(results))
    shutdown()  # every rank exits 0: no process group left to interpreter exit


if __name__ == "__main__":
    main()
