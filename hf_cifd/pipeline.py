"""The classification recipe pipeline: teacher + student -> (teacher cache -> RDMs) -> distillation -> evaluation.

Used by ``recipes/imagenet_r34_to_r18.py``, ``recipes/imagenet_r50_to_mbv1.py`` and ``recipes/cifar100_cnn10_to_cnn2.py``
(each one's paper setting is ``recipes/configs/<recipe>.yaml``; the script only calls :func:`recipe_main`) and by
``hf-cifd distill``. Public names:

* :class:`RecipeArguments`: models, data and stage knobs (an ``HfArgumentParser`` dataclass, next to
  :class:`~hf_cifd.config.DistillationConfig` which holds every Trainer / method flag).
* :func:`parse_classification_args`: the two dataclasses from the command line, the recipe's YAML (and
  :data:`SMOKE_DEFAULTS` with ``--smoke``, then ``--config``) as defaults; explicit flags always win.
* :func:`load_model` (from :mod:`hf_cifd.adapters.specs`): ``"timm:resnet34.a1_in1k"``, ``"hf:<hub id or dir>"``,
  ``"cnn:cnn10"`` / ``"cnn:<dir>"`` -> an ``nn.Module``, through the adapters' ``load``.
* :func:`run_classification`: the whole run; returns (and writes, on the main process) ``eval_results.json``.

Stages of :func:`run_classification` (each logged as ``[stage] ...``; the data and model stages are cheap):

1. ``smoke data`` (``--smoke`` only): the coloured-shapes webdataset (:mod:`hf_cifd.data.shapes`, 24 classes) is
   written under ``<output_dir>/data`` by rank 0 and read through the same streaming ``load_image_dataset`` path.
2. ``teacher training`` (``--train_teacher``): the teacher is trained from scratch with cross-entropy (method
   "student") and saved to ``<output_dir>/teacher`` (the CIFAR recipe's Table 8 CNN teacher).
3. ``teacher cache`` (method cifd, ``num_rdms > 0``, no ``--rdm_dir``): the teacher runs ONCE over the training set
   (its eval transform, no augmentation); every process writes its shards of ``<output_dir>/teacher_cache`` together
   with the labels of the samples it saw (``labels-rank<r>.json``; ``complete.json`` marks a finished cache, which a
   re-run reuses; an unfinished one is rebuilt).
4. ``RDM training``: the N RDMs learn from the cache alone: the dataset is the cached sample keys + labels, so no image
   is decoded and the teacher never runs again; 5% of the keys (``--rdm_val_fraction``, the paper's 95/5 split) are
   held out for each RDM's reported rate / distortion / accuracy. Saved to ``<output_dir>/rdms/rdm-image-<i>``
   (+ ``rdm_metrics.json``, ``rd_curve.png``). ``--rdm_dir`` loads such RDMs instead.
5. ``distillation``: ``DistillationTrainer(...).train()`` on the streamed training set (student train transform;
   the teacher gets its own eval transform only when its data config differs from the student's, else it sees the
   student's augmented view).
6. ``evaluation`` + ``export``: ``trainer.evaluate()`` on the eval split, the student alone saved in its library's
   format to ``<output_dir>/student``, and ``<output_dir>/eval_results.json`` written by the main process.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch

from .adapters.specs import load_model, split_spec
from .checkpoints import atomic_json, files_identity, finished_stage
from .checks import DistillationInputError
from .config import DistillationConfig

logger = logging.getLogger("hf_cifd.pipeline")

SMOKE_NUM_CLASSES = 24  # hf_cifd.data.shapes: 6 colours x 4 shapes

# --smoke: the shared offline settings (each recipe adds its own small models on top).
SMOKE_DEFAULTS = {
    "use_cpu": True, "max_steps": 6, "per_device_train_batch_size": 8, "per_device_eval_batch_size": 24,
    "save_strategy": "no", "eval_strategy": "no", "logging_steps": 2, "dataloader_num_workers": 0,
    "rdm_max_steps": 3, "image_size": 32, "num_classes": SMOKE_NUM_CLASSES, "teacher_pretrained": False,
    "shuffle_buffer": 64, "warmup_steps": 0, "learning_rate": 0.05, "teacher_max_steps": 10,
    "progressive_resolution": None,  # the smoke images stay at image_size
}


@dataclass
class RecipeArguments:
    """Models, data and stage settings of a classification recipe (flags of ``HfArgumentParser``)."""

    smoke: bool = field(default=False, metadata={
        "help": "Offline smoke run: generated coloured-shapes webdataset (24 classes), random-init models at "
                "--image_size, a few RDM and training steps."})
    teacher: str = field(default="timm:resnet34.a1_in1k", metadata={
        "help": "Teacher spec '<library>:<name>': timm:<model[.tag]> (timm.create_model; also timm:local-dir:PATH), "
                "hf:<hub id or dir> (AutoModelForImageClassification), cnn:<Table 8 name or trained dir> (SimpleCNN)."})
    student: str = field(default="timm:resnet18", metadata={"help": "Student spec, same forms as --teacher."})
    teacher_pretrained: bool = field(default=True, metadata={"help": "Load the teacher's pretrained weights."})
    student_pretrained: bool = field(default=False, metadata={"help": "Start the student from pretrained weights."})
    num_classes: int = field(default=1000, metadata={"help": "Classes of teacher and student heads (smoke: 24)."})
    image_size: int | None = field(default=None, metadata={
        "help": "Override the models' input resolution (timm: pretrained_cfg input_size, so transforms and the exported "
                "config follow). Smoke: 32."})
    dataset: str = field(default="timm/imagenet-1k-wds", metadata={
        "help": "Hub dataset id (timm/imagenet-1k-wds, ILSVRC/imagenet-1k, uoft-cs/cifar100) or a builder "
                "(webdataset, imagefolder, parquet) with --data_files."})
    data_files: list[str] | None = field(default=None, metadata={"help": "Local training files (builder datasets)."})
    eval_data_files: list[str] | None = field(default=None, metadata={"help": "Local evaluation files."})
    train_split: str = field(default="train", metadata={"help": "Training split."})
    eval_split: str = field(default="validation", metadata={"help": "Evaluation split (CIFAR-100: test)."})
    image_column: str | None = field(default=None, metadata={"help": "Image column (default: the dataset preset's)."})
    label_column: str | None = field(default=None, metadata={"help": "Label column (default: the preset's; CIFAR-100: fine_label)."})
    streaming: bool = field(default=True, metadata={"help": "Stream the dataset (datasets.IterableDataset)."})
    shuffle_buffer: int = field(default=10_000, metadata={"help": "Streaming shuffle buffer (records)."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Use at most this many training samples."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Evaluate on at most this many samples."})
    num_train_samples: int | None = field(default=None, metadata={
        "help": "Size of the training set, to turn --num_train_epochs into max_steps for a stream (ImageNet-1k: "
                "1281167); --max_steps wins."})
    rdm_dir: str | None = field(default=None, metadata={
        "help": "Load trained RDMs (rdm-image-<i>/, what train_rdms saves) from this folder or Hub repo id instead of "
                "caching the teacher and training them."})
    push_rdms_to_hub: str | None = field(default=None, metadata={
        "help": "Upload the trained RDMs (weights, cards, rdm_metrics.json, RD curve) as their own Hub repo ORG/NAME."})
    rdm_architecture: str = field(default="paper_imagenet", metadata={
        "help": "RDM architecture (hf_cifd.rdm_training.build_rdm): paper_imagenet (A.2: 3 hidden layers, the 3rd = X^, "
                "512 / 1024 wide), paper_cifar_cnn (A.1.1 / Table 1: FC512, FC306, FC100 + head, no reconstruction, "
                "R = 0), custom (--rdm_hidden_dims / --rdm_bottleneck_after / --rdm_activation_after + a linear layer "
                "back to the embedding)."})
    rdm_bottleneck_after: int = field(default=2, metadata={"help": "RDM hidden layers before the bottleneck (paper: 2)."})
    rdm_activation_after: list[int] = field(default_factory=lambda: [1, 3], metadata={
        "help": "1-based RDM hidden layers followed by an activation (paper ImageNet: 1 3)."})
    rdm_distortion: str = field(default="smooth_l1", metadata={"help": "RDM distortion D: smooth_l1 (ImageNet) or mse."})
    rdm_batch_size: int | None = field(default=None, metadata={"help": "RDM batch per process (default: per_device_train_batch_size)."})
    rdm_max_steps: int | None = field(default=None, metadata={"help": "RDM optimizer steps (overrides --rdm_epochs)."})
    rdm_val_fraction: float = field(default=0.05, metadata={"help": "Cached keys held out to report each RDM (paper: 0.05)."})
    cache_dtype: str = field(default="float16", metadata={"help": "Teacher-cache storage dtype: float16 or float32."})
    train_teacher: bool | None = field(default=None, metadata={
        "help": "Train the teacher from scratch first (cross-entropy, method 'student'; saved to <output_dir>/teacher). "
                "Unset: only when --teacher is a Table 8 name (cnn:cnn10), which has no weights."})
    teacher_epochs: float | None = field(default=None, metadata={"help": "Teacher-training epochs (default: num_train_epochs)."})
    teacher_max_steps: int | None = field(default=None, metadata={"help": "Teacher-training steps (overrides --teacher_epochs)."})
    lr_milestones: list[float] | None = field(default=None, metadata={
        "help": "Epochs at which the learning rate is multiplied by --lr_gamma (MultiStepLR; replaces "
                "--lr_scheduler_type). Paper CIFAR: 150 160 180."})
    lr_gamma: float = field(default=0.1, metadata={"help": "Factor of each --lr_milestones step."})
    smoke_train_samples: int = field(default=192, metadata={"help": "Smoke: generated training images."})
    smoke_eval_samples: int = field(default=48, metadata={"help": "Smoke: generated evaluation images."})

    def __post_init__(self):
        from .rdm_training import RDM_ARCHITECTURES

        if self.rdm_architecture not in RDM_ARCHITECTURES:
            raise DistillationInputError(f"rdm_architecture must be one of {RDM_ARCHITECTURES}, got {self.rdm_architecture!r}.")
        if self.rdm_distortion not in ("mse", "smooth_l1"):
            raise DistillationInputError(f"rdm_distortion must be mse or smooth_l1, got {self.rdm_distortion!r}.")
        if not 0.0 <= self.rdm_val_fraction < 1.0:
            raise DistillationInputError(f"rdm_val_fraction must be in [0, 1), got {self.rdm_val_fraction!r}.")
        if self.cache_dtype not in ("float16", "float32"):
            raise DistillationInputError(f"cache_dtype must be float16 or float32, got {self.cache_dtype!r}.")
        for spec in (self.teacher, self.student):
            if split_spec(spec)[0] == "open_clip":
                raise DistillationInputError(f"{spec}: the classification pipeline takes timm:, hf: or cnn: models; "
                                             "CLIP models go through recipes/clip_vitl_to_vits.py.")


# ------------------------------------------------------------------------------------------------ command line
def parse_classification_args(defaults: str | Mapping[str, Any] | None = None,
                              smoke_defaults: Mapping[str, Any] | None = None, argv: list[str] | None = None,
                              prog: str | None = None) -> tuple[RecipeArguments, DistillationConfig]:
    """``(RecipeArguments, DistillationConfig)`` from ``argv``: ``defaults`` (the recipe's YAML) and, with ``--smoke``,
    :data:`SMOKE_DEFAULTS` + ``smoke_defaults`` as defaults, then ``--config``, then the flags
    (:func:`hf_cifd.recipe_args.parse_recipe_args`)."""
    from .recipe_args import parse_recipe_args

    smoke = {**SMOKE_DEFAULTS, **dict(smoke_defaults or {})}
    return parse_recipe_args((RecipeArguments, DistillationConfig), defaults, smoke, argv, prog=prog)


def recipe_main(recipe_file: str, smoke_defaults: Mapping[str, Any] | None = None,
                argv: list[str] | None = None) -> dict[str, Any]:
    """A classification recipe script: its ``configs/<name>.yaml`` as defaults, then :func:`run_classification`."""
    from .recipe_args import recipe_config_path

    recipe_args, config = parse_classification_args(recipe_config_path(recipe_file), smoke_defaults, argv,
                                                    prog=os.path.basename(recipe_file))
    return run_classification(recipe_args, config)


# ------------------------------------------------------------------------------------------------ helpers
def _is_main() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _stage(name: str, detail: str = "") -> float:
    if _is_main():
        msg = f"[stage] {name}" + (f": {detail}" if detail else "")
        logger.info(msg)
    return time.time()


def _barrier() -> None:
    from accelerate import PartialState

    PartialState().wait_for_everyone()


class _LabelRecorder:
    """A collate fn for cache_teacher_outputs that remembers each sample's label (runs in the caching process)."""

    def __init__(self, collate_fn):
        self.collate_fn = collate_fn
        self.labels: dict[str, int] = {}

    def __call__(self, samples):
        batch = self.collate_fn(samples)
        if "labels" not in batch:
            raise DistillationInputError("the training samples carry no labels; the RDMs' classifier heads need them.")
        self.labels.update(zip(map(str, batch["sample_key"]), batch["labels"].tolist()))
        return batch


def _transform_key(transform) -> str:
    return repr(transform)


def _multistep_trainer_cls(milestones_steps: list[int] | None, gamma: float):
    from .trainer import DistillationTrainer

    if not milestones_steps:
        return DistillationTrainer

    class MultiStepDistillationTrainer(DistillationTrainer):
        """DistillationTrainer with a MultiStepLR schedule (``--lr_milestones``, in optimizer steps here)."""

        def create_scheduler(self, num_training_steps, optimizer=None):
            if self.lr_scheduler is None:
                self.lr_scheduler = torch.optim.lr_scheduler.MultiStepLR(
                    optimizer or self.optimizer, milestones=milestones_steps, gamma=gamma)
                self._created_lr_scheduler = True
            return self.lr_scheduler

    return MultiStepDistillationTrainer


# ------------------------------------------------------------------------------------------------ the run
class _Run:
    def __init__(self, args: RecipeArguments, config: DistillationConfig):
        self.args, self.config = args, config
        self.out = config.output_dir
        self.world = config.world_size  # sets up torch.distributed (gloo on CPU) through TrainingArguments
        self.results: dict[str, Any] = {}
        self.seconds: dict[str, float] = {}

    # -- data ----------------------------------------------------------------------------------------------------
    def smoke_data(self) -> None:
        from .data import shapes

        t0 = _stage("smoke data", "coloured-shapes webdataset (24 classes)")
        root = os.path.join(self.out, "data")
        dirs = {"train": os.path.join(root, "train"), "eval": os.path.join(root, "eval")}
        a = self.args
        if _is_main() and not os.path.exists(os.path.join(dirs["eval"], "info.json")):
            shapes.write_webdataset(dirs["train"], a.smoke_train_samples, seed=1,
                                    shard_size=math.ceil(a.smoke_train_samples / 4))
            shapes.write_webdataset(dirs["eval"], a.smoke_eval_samples, seed=2,
                                    shard_size=math.ceil(a.smoke_eval_samples / 2))
        _barrier()
        a.dataset, a.streaming = "webdataset", True
        a.data_files = sorted(glob.glob(os.path.join(dirs["train"], "*.tar")))
        a.eval_data_files = sorted(glob.glob(os.path.join(dirs["eval"], "*.tar")))
        a.image_column, a.label_column = "jpg", "cls"
        a.num_train_samples = a.smoke_train_samples
        self.seconds["smoke_data"] = time.time() - t0

    def dataset(self, split: str, files, transform, teacher_transform=None, shuffle: bool = False,
                max_samples: int | None = None, view=None):
        from .data import load_image_dataset

        a = self.args
        kwargs: dict[str, Any] = {}
        if files:
            kwargs["data_files"] = {split: list(files)}
        if not a.streaming and a.dataset not in ("webdataset",):
            # Map-style: give every row a stable key (the cache joins on it; image hashes may collide).
            import datasets

            ds = datasets.load_dataset(a.dataset, split=split, **kwargs)
            if "__key__" not in ds.column_names:
                ds = ds.add_column("__key__", [f"{split}-{i:07d}" for i in range(len(ds))])
            kwargs = {"dataset": ds, "key_column": "__key__"}
        return load_image_dataset(
            a.dataset, task="classification", split=split, streaming=a.streaming, image_column=a.image_column,
            label_column=a.label_column, transform=None if view is not None else transform,
            teacher_transform=teacher_transform, view=view, shuffle_buffer=a.shuffle_buffer if shuffle and a.streaming else None, seed=self.config.seed,
            max_samples=max_samples, **kwargs)

    # -- models --------------------------------------------------------------------------------------------------
    def models(self):
        from transformers.trainer_utils import set_seed

        from .adapters import adapter_for

        a = self.args
        t0 = _stage("models", f"teacher {a.teacher} (pretrained={a.teacher_pretrained}), student {a.student}")
        set_seed(self.config.seed)
        teacher = load_model(a.teacher, a.num_classes, a.teacher_pretrained, a.image_size)
        student = load_model(a.student, a.num_classes, a.student_pretrained, a.image_size)
        self.t_adapter, self.s_adapter = adapter_for(teacher), adapter_for(student)
        self.s_train = self.s_adapter.image_transform(student, True)
        self.s_eval = self.s_adapter.image_transform(student, False)
        self.t_train = self.t_adapter.image_transform(teacher, True)
        self.t_eval = self.t_adapter.image_transform(teacher, False)
        # Same preprocessing: the teacher reads the student's pixel_values. Otherwise one shared view per sample, each
        # model with its own resize + normalisation of it (hf_cifd.data.views), never two independent crops.
        self.views = None
        if _transform_key(self.t_eval) != _transform_key(self.s_eval):
            from .data.views import shared_views

            self.views = shared_views(self.s_train, self.s_eval, self.t_eval, seed=self.config.seed)
        self.seconds["models"] = time.time() - t0
        return teacher, student

    def max_steps(self, epochs: float, lr_batch: int) -> int | None:
        """Optimizer steps of ``epochs`` over a stream (None for map-style data: Trainer counts epochs)."""
        a = self.args
        if not a.streaming:
            return None
        sizes = [x for x in (a.max_train_samples, a.num_train_samples) if x]
        n = min(sizes) if sizes else None
        if n is None:
            raise DistillationInputError(
                "a streamed training set has no length: give --max_steps, or --num_train_samples (ImageNet-1k: "
                "1281167) so that --num_train_epochs can be turned into steps.")
        return max(1, math.ceil(epochs * n / lr_batch))

    def global_batch(self) -> int:
        c = self.config
        return c.per_device_train_batch_size * self.world * c.gradient_accumulation_steps

    # -- stage: teacher training ---------------------------------------------------------------------------------
    def train_teacher(self, teacher):
        from .data import collate

        a, c = self.args, self.config
        epochs = a.teacher_epochs if a.teacher_epochs is not None else c.num_train_epochs
        steps = a.teacher_max_steps or self.max_steps(epochs, self.global_batch()) or -1
        t0 = _stage("teacher training", f"{a.teacher} from scratch, cross-entropy, "
                    + (f"{steps} steps" if steps > 0 else f"{epochs} epochs"))
        cfg = dataclasses.replace(c, method="student", output_dir=os.path.join(self.out, "teacher"), max_steps=steps,
                                  num_train_epochs=epochs, num_rdms=0, save_strategy="no", eval_strategy="no",
                                  push_to_hub=False)  # only the student stage pushes
        marker = os.path.join(cfg.output_dir, "complete.json")
        identity = {"teacher": a.teacher, **self._data_identity(), "steps": steps, "epochs": epochs, "seed": c.seed,
                    "learning_rate": c.learning_rate, "batch": self.global_batch(), "milestones": a.lr_milestones}
        if finished_stage(marker, identity, "teacher training") is not None:
            prefix, _ = split_spec(a.teacher)
            spec = f"timm:local-dir:{cfg.output_dir}" if prefix == "timm" else f"{prefix}:{cfg.output_dir}"
            _stage("teacher training", f"reusing the teacher this run trained ({spec})")
            return load_model(spec, a.num_classes, True, a.image_size).eval().requires_grad_(False)
        ds = self.dataset(a.train_split, a.data_files, self.t_train, shuffle=True, max_samples=a.max_train_samples)
        milestones = self.milestone_steps(cfg, ds)
        trainer = _multistep_trainer_cls(milestones, a.lr_gamma)(teacher, args=cfg, train_dataset=ds,
                                                                 data_collator=collate)
        trainer.train()
        trainer.save_model(cfg.output_dir)
        if _is_main():  # written last, atomically: a restarted run reuses this teacher
            atomic_json(marker, {"identity": identity, "steps": trainer.state.global_step})
        _barrier()
        teacher = trainer.accelerator.unwrap_model(trainer.model).student
        self.seconds["teacher_training"] = time.time() - t0
        self.results["teacher_training_steps"] = trainer.state.global_step
        del trainer
        return teacher.eval().requires_grad_(False)

    def milestone_steps(self, cfg: DistillationConfig, train_ds) -> list[int] | None:
        a = self.args
        if not a.lr_milestones:
            return None
        if cfg.max_steps and cfg.max_steps > 0:
            per_epoch = cfg.max_steps / max(cfg.num_train_epochs, 1e-9)
        else:
            batches = math.ceil(len(train_ds) / (cfg.per_device_train_batch_size * self.world))
            per_epoch = batches / cfg.gradient_accumulation_steps
        return sorted({max(1, int(round(m * per_epoch))) for m in a.lr_milestones})

    # -- stages: teacher cache + RDMs ----------------------------------------------------------------------------
    # -- stage reuse (README: Resuming and failure handling) -------------------------------------------------------
    def _teacher_identity(self, teacher) -> dict[str, Any]:
        """What the cached teacher outputs depend on: teacher spec and weights, data, storage dtype."""
        from .data.cache import teacher_fingerprint

        return {"teacher": self.args.teacher, "teacher_weights_sha256": teacher_fingerprint(teacher)["weights_sha256"],
                **self._data_identity(), "cache_dtype": self.args.cache_dtype}

    def _data_identity(self) -> dict[str, Any]:
        a = self.args
        return {"dataset": a.dataset, "split": a.train_split, "data_files": files_identity(a.data_files),
                "max_train_samples": a.max_train_samples, "image_size": a.image_size}

    def _rdm_identity(self, teacher) -> dict[str, Any]:
        a, c = self.args, self.config
        return {**self._teacher_identity(teacher), "rates": list(c.rdm_rates), "hidden_dims": list(c.rdm_hidden_dims),
                "bottleneck_after": a.rdm_bottleneck_after, "activation_after": list(a.rdm_activation_after),
                "distortion": a.rdm_distortion, "epochs": c.rdm_epochs, "max_steps": a.rdm_max_steps,
                "learning_rate": c.rdm_learning_rate, "bottleneck_learning_rate": c.rdm_bottleneck_learning_rate,
                "val_fraction": a.rdm_val_fraction, "seed": c.seed}

    def rdms(self, teacher):
        a, c = self.args, self.config
        if not a.rdm_dir:
            done = finished_stage(os.path.join(self.out, "rdms", "complete.json"), self._rdm_identity(teacher), "RDMs")
            if done is not None:
                a.rdm_dir = os.path.join(self.out, "rdms")
                _stage("RDMs", f"reusing the RDMs this run trained in {a.rdm_dir} (the teacher cache is not read)")
        if a.rdm_dir:
            from .hub import load_rdms, resolve_rdm_dir

            t0 = _stage("RDMs", f"loading {c.num_rdms} trained RDMs from {a.rdm_dir}")
            local = resolve_rdm_dir(a.rdm_dir, c.hub_token)  # a folder, or a Hub repo id downloaded once
            rdms = load_rdms(local, c.num_rdms, "image")
            metrics = os.path.join(local, "rdm_metrics.json")
            if os.path.exists(metrics):
                with open(metrics) as f:
                    self.results["rdm_metrics"] = json.load(f).get("rdms")
            self.seconds["rdms"] = time.time() - t0
            return rdms
        cache = self.teacher_cache(teacher)
        return self.train_rdms(teacher, cache)

    def teacher_cache(self, teacher):
        from accelerate import Accelerator
        from accelerate.utils import DataLoaderConfiguration

        from .data import cache_teacher_outputs, collate

        a, c = self.args, self.config
        cache_dir = os.path.join(self.out, "teacher_cache")
        marker = os.path.join(cache_dir, "complete.json")
        self.accelerator = Accelerator(dataloader_config=DataLoaderConfiguration(dispatch_batches=False))
        t0 = _stage("teacher cache", f"one teacher pass over the training set -> {cache_dir}")
        identity = self._teacher_identity(teacher)
        info = finished_stage(marker, identity, "teacher cache")
        if info is not None:
            _stage("teacher cache", f"reusing the finished cache ({info.get('num_samples')} samples)")
            self.results["teacher_calls_cache"] = 0
        else:
            if _is_main() and os.path.isdir(cache_dir):  # an unfinished cache from a crashed run: its labels are lost
                shutil.rmtree(cache_dir)
            _barrier()
            ds = self.dataset(a.train_split, a.data_files, self.t_eval)  # no augmentation, no shuffling
            recorder = _LabelRecorder(collate)
            report = cache_teacher_outputs(
                teacher, ds, cache_dir, adapter=self.t_adapter, collate_fn=recorder,
                batch_size=c.per_device_eval_batch_size, dtype=a.cache_dtype, accelerator=self.accelerator,
                max_samples=a.max_train_samples, num_workers=c.dataloader_num_workers, progress=_is_main())
            with open(os.path.join(cache_dir, f"labels-rank{self.accelerator.process_index}.json"), "w") as f:
                json.dump(recorder.labels, f)
            _barrier()
            if _is_main():  # atomically: a kill never leaves half a marker
                atomic_json(marker, {"num_samples": report.num_samples, "teacher_calls": report.teacher_calls,
                                     "num_processes": self.world, "identity": identity})
            _barrier()
            self.results["teacher_calls_cache"] = report.teacher_calls
        self.seconds["teacher_cache"] = time.time() - t0
        return cache_dir

    def train_rdms(self, teacher, cache_dir: str):
        from .data import TeacherCache, collate
        from .rdm_training import CacheKeysDataset, build_rdm, train_rdms

        a, c = self.args, self.config
        labels: dict[str, int] = {}
        for path in sorted(glob.glob(os.path.join(cache_dir, "labels-rank*.json"))):
            with open(path) as f:
                labels.update(json.load(f))
        keys = CacheKeysDataset(TeacherCache(cache_dir), labels=labels)
        cache = keys.cache
        held_out = a.rdm_val_fraction > 0 and len(keys) > 1
        train, val = keys.split(a.rdm_val_fraction, seed=c.seed) if held_out else (keys, None)
        width = cache.fields["teacher_image_embedding"]
        num_classes = cache.fields.get("teacher_logits")
        act = set(a.rdm_activation_after)
        rdms = [build_rdm(a.rdm_architecture, width, num_classes, r, hidden_dims=c.rdm_hidden_dims,
                          bottleneck_after=a.rdm_bottleneck_after,
                          activate=[i + 1 in act for i in range(len(c.rdm_hidden_dims))], distortion=a.rdm_distortion)
                for r in c.rdm_rates]
        batch = a.rdm_batch_size or c.per_device_train_batch_size
        how = f"{a.rdm_max_steps} steps" if a.rdm_max_steps else f"{c.rdm_epochs} epochs"
        t0 = _stage("RDM training", f"{len(rdms)} RDMs (R = {', '.join(f'{r:g}' for r in c.rdm_rates)}) from the "
                    f"cache, {len(train)} train / {len(val) if val else 0} held-out samples, {how}")
        report = train_rdms(
            train, teacher_cache=cache, rdms={"image": rdms}, eval_dataset=val, output_dir=os.path.join(self.out, "rdms"),
            epochs=c.rdm_epochs, max_steps=a.rdm_max_steps, batch_size=batch, learning_rate=c.rdm_learning_rate,
            bottleneck_learning_rate=c.rdm_bottleneck_learning_rate,
            lambda_ce=c.lambda_ce, lambda_kl=c.lambda_kl, temperature=c.temperature, collate_fn=collate,
            seed=c.seed, accelerator=self.accelerator, progress=_is_main(), teacher_name=a.teacher,
            teacher_hub_id=_teacher_hub_id(a))
        if a.push_rdms_to_hub and _is_main():
            from .hub import push_rdm_folder

            push_rdm_folder(os.path.join(self.out, "rdms"), a.push_rdms_to_hub, token=c.hub_token,
                            private=c.hub_private_repo)
        self.results.update({"rdm_metrics": report.metrics, "rdm_steps": report.steps,
                             "rdm_teacher_accuracy": report.teacher_accuracy,
                             "rdm_teacher_calls": report.teacher_calls})
        if _is_main():  # written last, atomically: a restarted run reuses these RDMs
            atomic_json(os.path.join(self.out, "rdms", "complete.json"),
                        {"identity": self._rdm_identity(teacher), "num_rdms": len(rdms)})
        _barrier()
        self.seconds["rdm_training"] = time.time() - t0
        return [m.eval() for m in report.rdms["image"]]

    # -- stage: distillation -------------------------------------------------------------------------------------
    def resume_value(self) -> str | None:
        from .checkpoints import restart_value

        return restart_value(self.config.resume_from_checkpoint, self.out)

    def distill(self, teacher, student, rdms):
        from .data import collate

        a, c = self.args, self.config
        if a.streaming:
            c.accelerator_config.dispatch_batches = False  # each process streams its own shards
            if not (c.max_steps and c.max_steps > 0):
                c.max_steps = self.max_steps(c.num_train_epochs, self.global_batch())
        views = self.views or (None, None)
        train = self.dataset(a.train_split, a.data_files, self.s_train, shuffle=True, max_samples=a.max_train_samples,
                             view=views[0])
        evals = self.dataset(a.eval_split, a.eval_data_files, self.s_eval, max_samples=a.max_eval_samples,
                             view=views[1])
        milestones = self.milestone_steps(c, train)
        how = f"{c.max_steps} steps" if c.max_steps and c.max_steps > 0 else f"{c.num_train_epochs} epochs"
        t0 = _stage("distillation", f"method {c.method}, {how}, global batch {self.global_batch()}"
                    + (f", one shared view per sample ({self.views[0].describe()}), each model's own resize and "
                       "normalisation" if self.views is not None else ""))
        trainer = _multistep_trainer_cls(milestones, a.lr_gamma)(
            student, teacher if c.uses_teacher else None, args=c, train_dataset=train, eval_dataset=evals,
            rdms=rdms, data_collator=collate)
        trainer.model_card_info.update(teacher=a.teacher, base_model=_teacher_hub_id(a), datasets=[a.dataset],
                                       eval_split=a.eval_split, rdm_metrics=self.results.get("rdm_metrics"))
        trainer.train(resume_from_checkpoint=self.resume_value())
        self.seconds["distillation"] = time.time() - t0
        t0 = _stage("evaluation", f"{a.eval_split} split")
        metrics = trainer.evaluate()
        self.seconds["evaluation"] = time.time() - t0
        _stage("export", f"student -> {os.path.join(self.out, 'student')}")
        trainer.save_model(os.path.join(self.out, "student"))
        calls = torch.tensor(float(trainer.teacher_calls), device=c.device)
        self.results["teacher_calls_distillation"] = int(trainer.accelerator.reduce(calls, reduction="sum").item())
        self.results["max_steps"] = trainer.state.max_steps
        self.results["global_steps"] = trainer.state.global_step
        return metrics


def _teacher_hub_id(a: RecipeArguments) -> str | None:
    """The Hub repo of the teacher's pretrained weights (a card's base_model); None for a random / trained-here one."""
    from .hub import model_hub_id

    return model_hub_id(None, a.teacher, pretrained=a.teacher_pretrained and not _trains_teacher(a))


def _trains_teacher(a: RecipeArguments) -> bool:
    if a.train_teacher is not None:
        return a.train_teacher
    from .models import TABLE8

    prefix, name = split_spec(a.teacher)
    return prefix == "cnn" and name in TABLE8


def run_classification(recipe_args: RecipeArguments, config: DistillationConfig) -> dict[str, Any]:
    """Runs a classification recipe end to end (see the module docstring); returns the results that the main
    process writes to ``<output_dir>/eval_results.json``: ``eval_accuracy`` (top-1 as a fraction, eval split), ``eval_loss``,
    ``teacher_calls`` (all processes: cache pass + distillation, incl. evaluation batches), the RDM report
    (``rdm_metrics``: rate / distortion / accuracy per RDM on the held-out keys), ``num_processes``,
    ``wall_time_s`` and per-stage seconds."""
    start = time.time()
    logging.basicConfig(level=logging.INFO if _is_main() else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logger.setLevel(logging.INFO if _is_main() else logging.WARNING)
    run = _Run(recipe_args, config)
    if recipe_args.smoke:
        # Tiny models on a shared CPU: one intra-op thread per process avoids oversubscription.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // run.world))
    os.makedirs(config.output_dir, exist_ok=True)
    if recipe_args.smoke:
        run.smoke_data()
    teacher, student = run.models()
    if _trains_teacher(recipe_args):
        teacher = run.train_teacher(teacher)
    teacher.eval().requires_grad_(False)
    rdms = None
    if config.method == "cifd" and config.num_rdms > 0:
        rdms = run.rdms(teacher)
    metrics = run.distill(teacher, student, rdms)

    r = run.results
    results: dict[str, Any] = {
        "eval_accuracy": metrics.get("eval_accuracy"),
        "eval_loss": metrics.get("eval_loss"),
        "method": config.method,
        "teacher": recipe_args.teacher,
        "student": recipe_args.student,
        "dataset": recipe_args.dataset,
        "teacher_calls": r.get("teacher_calls_cache", 0) + r.get("teacher_calls_distillation", 0),
        **r,
        "eval_metrics": {k: v for k, v in metrics.items() if isinstance(v, (int, float))},
        "num_processes": run.world,
        "stage_seconds": {k: round(v, 1) for k, v in run.seconds.items()},
        "wall_time_s": round(time.time() - start, 1),
    }
    if _is_main():
        with open(os.path.join(config.output_dir, "eval_results.json"), "w") as f:
            json.dump(results, f, indent=2, default=str)
        summary = {k: results[k] for k in ("eval_accuracy", "teacher_calls", "num_processes", "wall_time_s")}
        _stage("done", json.dumps(summary))
    from .distributed import shutdown

    shutdown()  # every rank exits 0: no process group left to interpreter exit
    return results


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """``hf-cifd distill [flags]``: a classification run with the given RecipeArguments / DistillationConfig flags."""
    recipe_args, config = parse_classification_args(None, None, argv, prog="hf-cifd distill")
    return run_classification(recipe_args, config)


__all__ = ["RecipeArguments", "SMOKE_DEFAULTS", "load_model", "main", "parse_classification_args", "recipe_main",
           "run_classification"]
