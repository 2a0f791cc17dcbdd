"""The CLIP recipe pipeline (``recipes/clip_vitl_to_vits.py``): open_clip teacher -> RDMs per modality -> CIFD student
-> zero-shot + retrieval evaluation -> the student in open_clip's format.

* :class:`CLIPRecipeArguments`: models, data and stage knobs (next to :class:`~hf_cifd.config.DistillationConfig`).
* :data:`SMOKE_DEFAULTS`: the ``--smoke`` settings (tiny configs, generated coloured-shapes data, CPU).
* :func:`recipe_main`: parse (the recipe's YAML, ``--smoke``, ``--config``, flags) and :func:`run_clip`.

``--smoke``: offline, on tiny open_clip configs and the generated coloured-shapes data (:mod:`hf_cifd.data.shapes`,
24 classes): a tiny teacher is first trained with plain CLIP (stand-in for the pretrained ViT-L-14), then the RDMs,
then the student is distilled and evaluated. Teacher and student differ in image size, mean/std and context length.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch

from .checkpoints import atomic_json, files_identity, finished_stage, restart_value
from .config import DistillationConfig

logger = logging.getLogger("hf_cifd.clip_pipeline")

SAMPLES_PER_EPOCH = 3_000_000  # the paper's "epoch" on CC12M

# Tiny configs for --smoke (random init): different widths, image sizes, mean/std and context lengths.
SMOKE_TEACHER = {"embed_dim": 64, "vision_cfg": {"image_size": 32, "layers": 3, "width": 96, "patch_size": 8, "head_width": 32},
                 "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}}
SMOKE_TEACHER_PP = {"mean": [0.48145466, 0.4578275, 0.40821073], "std": [0.26862954, 0.26130258, 0.27577711]}
SMOKE_STUDENT = {"embed_dim": 48, "vision_cfg": {"image_size": 24, "layers": 2, "width": 64, "patch_size": 6, "head_width": 32},
                 "text_cfg": {"context_length": 12, "vocab_size": 49408, "width": 48, "heads": 2, "layers": 2}}
SMOKE_STUDENT_PP = {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}

SMOKE_DEFAULTS = {
    "per_device_train_batch_size": 64, "max_steps": 150, "learning_rate": 2e-3, "logging_steps": 50,
    "num_rdms": 3, "rdm_rates": [30, 10, 3], "rdm_hidden_dims": [64, 64, 64], "lambda_ibm": 0.001, "per_device_eval_batch_size": 128,
    "use_cpu": True, "eval_strategy": "no", "disable_tqdm": True, "dataloader_num_workers": 0,
}


@dataclass
class CLIPRecipeArguments:
    """Models, data and stage settings of the CLIP recipe (flags of ``HfArgumentParser``)."""

    smoke: bool = field(default=False, metadata={"help": "Offline run on tiny configs and generated shapes data."})
    teacher: str = field(default="open_clip:ViT-L-14@openai", metadata={
        "help": "open_clip teacher: open_clip:<name>@<pretrained tag>, open_clip:hf-hub:org/repo or "
                "open_clip:local-dir:PATH."})
    student: str = field(default="open_clip:ViT-S-16", metadata={
        "help": "open_clip student architecture (random init): open_clip:ViT-S-16, open_clip:RN50, open_clip:ViT-B-16."})
    dataset: str = field(default="pixparse/cc12m-wds", metadata={"help": "Image-text training data (streamed)."})
    data_files: list[str] | None = field(default=None, metadata={"help": "Local shards (with --dataset webdataset)."})
    epochs: float = field(default=32.0, metadata={"help": "Paper 'epochs' of --samples_per_epoch pairs (sets max_steps)."})
    samples_per_epoch: int = field(default=SAMPLES_PER_EPOCH, metadata={"help": "Pairs per paper 'epoch'."})
    rdm_samples_per_epoch: int = field(default=SAMPLES_PER_EPOCH, metadata={"help": "Pairs per RDM 'epoch'."})
    rdm_dir: str | None = field(default=None, metadata={
        "help": "Load trained RDMs (rdm-<modality>-<i>/) from this folder or Hub repo id instead of training them."})
    push_rdms_to_hub: str | None = field(default=None, metadata={
        "help": "Upload the trained RDMs (+ card, metrics, RD curve) as their own Hub repo ORG/NAME."})
    zeroshot_dataset: str = field(default="clip-benchmark/wds_imagenet1k", metadata={"help": "Zero-shot evaluation data."})
    retrieval_dataset: str = field(default="clip-benchmark/wds_flickr30k", metadata={"help": "Retrieval evaluation data."})
    eval_max_samples: int | None = field(default=None, metadata={"help": "Evaluate on at most this many samples."})
    shuffle_buffer: int = field(default=10_000, metadata={"help": "Streaming shuffle buffer (records)."})
    smoke_teacher_steps: int = field(default=150, metadata={"help": "Smoke: plain-CLIP steps of the tiny teacher."})

    def __post_init__(self):
        from .adapters.specs import split_spec
        from .checks import DistillationInputError

        for spec in (self.teacher, self.student):
            if split_spec(spec)[0] != "open_clip":
                raise DistillationInputError(f"{spec}: the CLIP recipe takes open_clip models (open_clip:<name>[@tag]).")


def parse_clip_args(defaults=None, argv: list[str] | None = None, prog: str | None = None):
    """``(CLIPRecipeArguments, DistillationConfig)``; see :func:`hf_cifd.recipe_args.parse_recipe_args`."""
    from .recipe_args import parse_recipe_args

    return parse_recipe_args((CLIPRecipeArguments, DistillationConfig), defaults, SMOKE_DEFAULTS, argv, prog=prog)


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def _barrier():
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def make_smoke_data(root: str) -> dict[str, str]:
    from .data import shapes

    dirs = {name: os.path.join(root, name) for name in ("train", "zeroshot", "retrieval")}
    if int(os.environ.get("RANK", "0")) == 0 and not os.path.exists(os.path.join(dirs["retrieval"], "info.json")):
        shapes.write_webdataset(dirs["train"], 4096, seed=1, shard_size=512)
        shapes.write_webdataset(dirs["zeroshot"], 480, seed=2, shard_size=480)
        shapes.write_webdataset(dirs["retrieval"], 200, seed=3, shard_size=200, captions_per_image=2)
    _barrier()
    return dirs


def _pairs(path, data_files, student_pre, student_tok, teacher_pre=None, teacher_tok=None, shuffle_buffer=None,
           view=None):
    """``view`` (a SharedView) replaces both image transforms: one crop per sample, each model's own finishing."""
    from .data.loading import load_image_dataset

    return load_image_dataset(path, task="image-text", data_files=data_files, streaming=True,
                              transform=None if view is not None else student_pre, tokenizer=student_tok,
                              teacher_transform=None if view is not None else teacher_pre, teacher_tokenizer=teacher_tok,
                              shuffle_buffer=shuffle_buffer, view=view)


def run_clip(args: CLIPRecipeArguments, config: DistillationConfig) -> dict[str, Any] | None:
    """Runs the CLIP recipe; the main process writes and returns ``<output_dir>/eval_results.json``."""
    from .adapters import OpenCLIPAdapter
    from .adapters.open_clip import create_openclip
    from .eval.clip import CLIPEvaluator
    from .data.collate import collate
    from .hub import model_hub_id
    from .trainer import DistillationTrainer

    # Each process streams its own shards (CC12M has thousands) instead of rank 0 decoding for everyone.
    config.accelerator_config.dispatch_batches = False
    logging.basicConfig(level=logging.INFO if int(os.environ.get("RANK", "0")) == 0 else logging.WARNING)
    t0 = time.time()
    out = config.output_dir
    os.makedirs(out, exist_ok=True)
    if args.smoke:
        # Tiny models on a shared CPU: one intra-op thread per process avoids oversubscription (2-4x faster here).
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size()))
        data = make_smoke_data(os.path.join(out, "data"))
        files = {"train": sorted(glob.glob(os.path.join(data["train"], "*.tar")))}
        teacher, t_pre_train, t_pre_val, t_tok = create_openclip(SMOKE_TEACHER, preprocess_cfg=SMOKE_TEACHER_PP)
        student, s_pre_train, s_pre_val, s_tok = create_openclip(SMOKE_STUDENT, preprocess_cfg=SMOKE_STUDENT_PP)
        teacher, t_pre_val, t_tok = _smoke_teacher(args, config, teacher, t_pre_val, t_tok, files)
        zs_dir, rt_dir = data["zeroshot"], data["retrieval"]
        rdm_steps = max(1, int(0.3 * config.max_steps))
        train_files, train_path = files, "webdataset"
        s_pre_aug = s_pre_val  # no augmentation on 24 px shapes
    else:
        adapter = OpenCLIPAdapter()
        teacher = OpenCLIPAdapter.load(args.teacher.partition(":")[2], pretrained=True)
        student = OpenCLIPAdapter.load(args.student.partition(":")[2], pretrained=False)
        t_pre_val, t_tok = adapter.image_transform(teacher, False), adapter.tokenizer(teacher)
        s_pre_aug, s_pre_val, s_tok = (adapter.image_transform(student, True), adapter.image_transform(student, False),
                                       adapter.tokenizer(student))
        zs_dir, rt_dir = args.zeroshot_dataset, args.retrieval_dataset
        global_batch = config.per_device_train_batch_size * world_size()
        if config.max_steps is None or config.max_steps <= 0:
            config.max_steps = int(args.epochs * args.samples_per_epoch / global_batch)
        rdm_steps = int(config.rdm_epochs * args.rdm_samples_per_epoch / global_batch)
        train_files, train_path = ({"train": args.data_files} if args.data_files else None), args.dataset
    teacher.eval().requires_grad_(False)

    # Student data: each sample carries the student's AND the teacher's inputs (own tokenizers), both images cut from
    # ONE random view of the picture (the student's augmentation), each resized / normalised for its model.
    from .data.views import SharedView

    buffer = 1024 if args.smoke else args.shuffle_buffer
    ds = _pairs(train_path, train_files, None, s_tok, None, t_tok, shuffle_buffer=buffer,
                view=SharedView(s_pre_aug, s_pre_val, t_pre_val, train=True, seed=config.seed))

    rdms = None
    if config.method == "cifd" and config.num_rdms:
        rdms = _rdms(args, config, teacher, t_pre_val, t_tok, train_path, train_files, rt_dir, rdm_steps, buffer)

    evaluator = None
    if int(os.environ.get("RANK", "0")) == 0:
        evaluator = CLIPEvaluator(s_pre_val, s_tok, zs_dir, rt_dir, max_samples=args.eval_max_samples,
                                  batch_size=config.per_device_eval_batch_size)
    trainer = DistillationTrainer(student, teacher, args=config, train_dataset=ds, rdms=rdms, data_collator=collate,
                                  evaluator=evaluator if evaluator is not None else (lambda model: {}))
    if not args.smoke:
        trainer.model_card_info.update(teacher=args.teacher, base_model=model_hub_id(None, args.teacher),
                                       datasets=[args.dataset])
    trainer.train(resume_from_checkpoint=restart_value(config.resume_from_checkpoint, out))
    metrics = trainer.evaluate()
    trainer.save_model(os.path.join(out, "student"))
    if not trainer.is_world_process_zero():
        return None
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
    return results


def recipe_main(recipe_file: str, argv: list[str] | None = None) -> dict[str, Any] | None:
    """The CLIP recipe script: its ``configs/<name>.yaml`` as defaults, then :func:`run_clip`."""
    from .distributed import shutdown
    from .recipe_args import recipe_config_path

    args, config = parse_clip_args(recipe_config_path(recipe_file), argv, prog=os.path.basename(recipe_file))
    results = run_clip(args, config)
    shutdown()  # every rank exits 0: no process group left to interpreter exit
    return results


def _rdms(args, config, teacher, t_pre_val, t_tok, train_path, train_files, rt_dir, rdm_steps, buffer) -> Mapping:
    """The trained RDMs per modality: loaded from ``--rdm_dir`` (a folder or Hub repo), or trained from the teacher."""
    from .hub import load_rdms, model_hub_id, push_rdm_folder

    if args.rdm_dir:
        return {m: load_rdms(args.rdm_dir, config.num_rdms, m) for m in ("image", "text")}
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration

    from .data.collate import collate
    from .rdm_training import train_rdms

    rdm_dir = os.path.join(config.output_dir, "rdms")
    marker = os.path.join(rdm_dir, "complete.json")
    identity = {**_teacher_identity(args, teacher, train_path, train_files), "num_rdms": config.num_rdms,
                "rates": list(config.rdm_rates), "hidden_dims": list(config.rdm_hidden_dims), "steps": rdm_steps,
                "batch": config.per_device_train_batch_size * world_size(), "learning_rate": config.rdm_learning_rate,
                "bottleneck_learning_rate": config.rdm_bottleneck_learning_rate, "shuffle_buffer": buffer,
                "distortion": "mse"}
    if finished_stage(marker, identity, "RDMs") is not None:  # a restarted run: same teacher, data and settings
        logger.info("[stage] RDMs: reusing the RDMs this run trained in %s", rdm_dir)
        return {m: load_rdms(rdm_dir, config.num_rdms, m) for m in ("image", "text")}
    rdm_ds = _pairs(train_path, train_files, t_pre_val, t_tok, shuffle_buffer=buffer)
    rates = {m: list(config.rdm_rates) for m in ("image", "text")}
    rdm_eval = None
    if args.smoke:  # the RDM report (rate / distortion per RDM) on held-out pairs, not on the whole train set
        rdm_eval = _pairs("webdataset", {"train": sorted(glob.glob(os.path.join(rt_dir, "*.tar")))}, t_pre_val, t_tok)
    # Each process streams its own shards; dispatching would try to concatenate the string fields (keys, text).
    rdm_accelerator = Accelerator(dataloader_config=DataLoaderConfiguration(dispatch_batches=False))
    report = train_rdms(rdm_ds, teacher=teacher, rates=rates, max_steps=rdm_steps, eval_dataset=rdm_eval,
                        accelerator=rdm_accelerator, batch_size=config.per_device_train_batch_size,
                        learning_rate=config.rdm_learning_rate,
                        bottleneck_learning_rate=config.rdm_bottleneck_learning_rate,
                        hidden_dims=config.rdm_hidden_dims, distortion="mse",
                        collate_fn=collate, output_dir=rdm_dir, progress=False,
                        teacher_name=None if args.smoke else args.teacher,
                        teacher_hub_id=None if args.smoke else model_hub_id(None, args.teacher))
    if args.push_rdms_to_hub and rdm_accelerator.is_main_process:
        push_rdm_folder(rdm_dir, args.push_rdms_to_hub, token=config.hub_token, private=config.hub_private_repo)
    if rdm_accelerator.is_main_process:  # written last, atomically: a restarted run reuses these RDMs
        atomic_json(marker, {"identity": identity, "num_rdms": config.num_rdms})
    _barrier()
    return report.rdms


def _data_identity(train_path, train_files) -> dict[str, Any]:
    return {"dataset": train_path, "data_files": files_identity((train_files or {}).get("train"))}


def _teacher_identity(args, teacher, train_path, train_files) -> dict[str, Any]:
    """What a finished stage's outputs depend on: the teacher (spec and weights) and the training data."""
    from .data.cache import teacher_fingerprint

    return {"teacher": "smoke" if args.smoke else args.teacher,
            "teacher_weights_sha256": teacher_fingerprint(teacher)["weights_sha256"],
            **_data_identity(train_path, train_files)}


def _smoke_teacher(args, config, teacher, t_pre_val, t_tok, files):
    """``(teacher, its eval transform, its tokenizer)``: the tiny teacher after a short plain-CLIP run on the smoke
    data (the stand-in for a pretrained one, never pushed), saved to ``<output_dir>/teacher``; a restarted run whose
    teacher stage finished loads it from there instead."""
    from .adapters.open_clip import create_openclip
    from .data.collate import collate
    from .trainer import DistillationTrainer

    teacher_cfg = dataclasses.replace(config, method="clip", output_dir=os.path.join(config.output_dir, "teacher"),
                                      max_steps=args.smoke_teacher_steps, learning_rate=2e-3, warmup_steps=0.1,
                                      save_strategy="no", push_to_hub=False)
    marker = os.path.join(teacher_cfg.output_dir, "complete.json")
    identity = {"teacher": SMOKE_TEACHER, "preprocess": SMOKE_TEACHER_PP, **_data_identity("webdataset", files),
                "steps": args.smoke_teacher_steps, "batch": config.per_device_train_batch_size * world_size()}
    if finished_stage(marker, identity, "teacher training") is not None:
        logger.info("[stage] teacher training: reusing the teacher this run trained (%s)", teacher_cfg.output_dir)
        # Same model_cfg and preprocessing (checked above): only the weights come from disk.
        return create_openclip(f"local-dir:{teacher_cfg.output_dir}")[0], t_pre_val, t_tok
    torch.manual_seed(0)
    pre = DistillationTrainer(teacher, args=teacher_cfg, data_collator=collate,
                              train_dataset=_pairs("webdataset", files, t_pre_val, t_tok, shuffle_buffer=1024))
    pre.train()
    pre.save_model(teacher_cfg.output_dir)
    if pre.is_world_process_zero():  # written last, atomically: a restarted run reuses this teacher
        atomic_json(marker, {"identity": identity, "steps": pre.state.global_step})
    _barrier()
    return pre.accelerator.unwrap_model(pre.model).student, t_pre_val, t_tok


__all__ = ["CLIPRecipeArguments", "SMOKE_DEFAULTS", "parse_clip_args", "recipe_main", "run_clip"]
