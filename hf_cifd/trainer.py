"""`DistillationTrainer`: a `transformers.Trainer` that distils a frozen teacher into a student.

What it overrides, and why:

* ``__init__``: wraps the student and every trainable loss module (IBMs, projectors, method extras) into one
  :class:`DistillationModel`, so Trainer optimises, checkpoints and resumes them together (also under DeepSpeed
  ZeRO); places the frozen teacher and RDMs with accelerate / DeepSpeed in eval mode; checks the inputs.
* ``compute_loss``: teacher (or its cached outputs) -> frozen RDMs -> student -> the method's named terms.
* ``prediction_step``: eval loss + student logits for ``compute_metrics``.
* ``log``: adds each loss term's running mean and the teacher-call count to Trainer's logs.
* ``save_model``: checkpoints keep the whole container; the final save writes the student alone, in its own
  library's format, with its model card (:mod:`hf_cifd.hub`), and pushes it when ``push_to_hub`` is set.
* ``push_to_hub`` / ``_push_from_checkpoint``: the exported student (weights, config, processor / tokenizer, card) is
  staged in a clean folder (``<output_dir>/.hub_staging``) and only that folder is uploaded: never checkpoints,
  ``training_args.bin``, caches, RDMs, the teacher or data.
"""

from __future__ import annotations

import logging
import os
import shutil
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import nn
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import enable_full_determinism, set_seed

from .adapters import Encoded, ModelAdapter, adapter_for
from .checks import DistillationInputError, NonFiniteLossError, check_world_size
from .data import collate
from .data.stats import StreamResumeCallback, StreamTrackingMixin
from .config import DistillationConfig
from .methods import StudentOutput, build_method
from .modules import EntropyBottleneck1d, InformationBottleneck, Projector, RateDistortionModule
from .losses import total_loss
from .teacher import TeacherRunner, embedding_fields

logger = logging.getLogger(__name__)


class DistillationModel(nn.Module):
    """The one module handed to Trainer: the student plus the trainable loss modules.

    ``forward(**batch)`` runs the student through its adapter and, per modality, the IBM (training: noisy
    embedding, rate, decoded embedding at the teacher's width; the student's head sees the noisy embedding, as in
    the paper's Fig. 8) or the projector. Only ``student`` is exported.
    """

    accepts_loss_kwargs = False  # compute_loss returns a per-batch mean; Trainer scales it for accumulation.
    config = None  # not a PreTrainedModel; Trainer reads model.config with getattr (e.g. for label_smoothing_factor)

    def __init__(
        self,
        student: nn.Module,
        adapter: ModelAdapter,
        ibms: Mapping[str, InformationBottleneck] | None = None,
        projectors: Mapping[str, nn.Module] | None = None,
        extra: Mapping[str, nn.Module] | None = None,
    ):
        super().__init__()
        self.student = student
        self.adapter = adapter
        self.ibms = nn.ModuleDict(ibms or {})
        self.projectors = nn.ModuleDict(projectors or {})
        self.extra = nn.ModuleDict(extra or {})

    def forward(self, **batch: Any) -> StudentOutput:
        encoded = self.adapter.encode(self.student, batch)
        matched, rates = {}, {}
        for modality, embedding in encoded.embeddings.items():
            if modality in self.ibms:
                out = self.ibms[modality](embedding)
                matched[modality], rates[modality] = out.decoded["teacher"], out.rate
                encoded.extras.setdefault("ibm_noisy", {})[modality] = out.noisy  # W^ (CLIP: the contrastive input)
                if self.training and encoded.logits is not None:
                    noisy_logits = self.adapter.head(self.student, out.noisy)
                    if noisy_logits is not None:
                        encoded.logits = noisy_logits
            elif modality in self.projectors:
                matched[modality] = self.projectors[modality](embedding)
        return StudentOutput(encoded=encoded, matched=matched, ibm_rate=rates, training=self.training)


def _sample_fields(dataset) -> set[str] | None:
    """The field names of the training samples, found without reading a stream (iterating one would fill its
    shuffle buffer: thousands of decoded images before training starts); None when unknown."""
    if dataset is None:
        return None
    if _is_stream(dataset):
        from .data import find_processor

        processor = find_processor(dataset)
        if processor is not None:  # load_image_dataset: classification streams always yield labels
            return {"labels"} if processor.task == "classification" else {"pixel_values", "text"}
        return set(dataset.column_names) if dataset.column_names else None
    if hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__") and len(dataset):
        first = dataset[0]
        return set(first) if isinstance(first, Mapping) else None
    return None


class DistillationTrainer(StreamTrackingMixin, Trainer):
    """Trainer for knowledge distillation (CIFD, KD, FitNet, RKD, CKD; CLIP methods via the open_clip adapter).

    Args:
        model: the student (timm, transformers, open_clip, or an nn.Module returning (embedding, logits)).
        teacher: the frozen teacher (same kinds), or its id (``"timm:resnet34.tv_in1k"``, ``"hf:<repo or dir>"``,
            ``"open_clip:ViT-L-14@openai"``, ``"cnn:<dir>"``; loaded with pretrained weights through the adapters).
            May be None when ``args.teacher_cache_dir`` / ``teacher_cache`` supplies its outputs, or for methods
            without a teacher.
        args: a :class:`DistillationConfig`.
        rdms: trained :class:`RateDistortionModule` s (see :func:`hf_cifd.train_rdms`): a list (single-modality
            models) or a dict modality -> list (CLIP: "image", "text").
        teacher_cache: a ``hf_cifd.data.TeacherCache`` (or its directory); batches are joined with it by
            ``sample_key`` and the teacher never runs.
        indistill_teacher: (keyword) an auxiliary teacher for the InDistill warm-up (``args.indistill_layers``),
            e.g. trained by :func:`hf_cifd.assistants.train_auxiliary_teacher`; default: the teacher.
        assistants: (keyword) trained teacher assistants, largest first (see :func:`hf_cifd.assistants.train_assistants`).
            Method ``takd`` distils from the last one (the teacher is then not needed); ``dgkd`` runs the teacher and
            every assistant on each batch. Their forward passes are logged as ``assistant_calls``.
        Other arguments are Trainer's.

    ``model_card_info`` (a dict: ``teacher``, ``base_model``, ``datasets``, ``eval_split``, ``rdm_metrics``) feeds the
    exported student's card; the recipes fill in the dataset and the RDM report.
    """

    # compute_loss returns a per-batch mean: Trainer divides it by the accumulation steps exactly once.
    loss_is_scaled_for_ga = False

    def __init__(
        self,
        model: nn.Module | None = None,
        teacher: nn.Module | str | None = None,
        args: DistillationConfig | None = None,
        train_dataset=None,
        eval_dataset=None,
        rdms: Sequence[RateDistortionModule] | Mapping[str, Sequence[RateDistortionModule]] | None = None,
        *,
        data_collator=None,
        compute_metrics=None,
        student_adapter: ModelAdapter | None = None,
        teacher_adapter: ModelAdapter | None = None,
        teacher_cache=None,
        evaluator=None,
        **kwargs,
    ):
        args = args if args is not None else DistillationConfig(output_dir="outputs/distill")
        if not isinstance(args, DistillationConfig):
            raise DistillationInputError("args must be a DistillationConfig (it subclasses TrainingArguments).")
        check_world_size(args.world_size)
        # Trainer seeds in its __init__, after the IBM / projectors below are created: seed them the same way.
        enable_full_determinism(args.seed) if args.full_determinism else set_seed(args.seed)
        teacher_spec = teacher if isinstance(teacher, str) else None
        if teacher_spec is not None:
            from .adapters.specs import load_model

            teacher = load_model(teacher_spec, pretrained=True)
        from .hub import model_hub_id

        base_model = model_hub_id(None, teacher_spec) if teacher_spec else model_hub_id(teacher)
        self.model_card_info: dict[str, Any] = {"teacher": teacher_spec, "base_model": base_model,
                                                "datasets": None, "eval_split": None, "rdm_metrics": None}
        # model_init(trial) -> a fresh student; each hyperparameter-search trial wraps it in a fresh container
        # (IBMs, projectors, method modules: see call_model_init). ``rdms`` may be a callable(config) -> RDMs,
        # called again when a trial changes the RDM rates.
        model_init = kwargs.pop("model_init", None)
        if (model is None) == (model_init is None):
            raise DistillationInputError("pass the student as model=... or as model_init=... (for "
                                         "hyperparameter_search), exactly one of them.")
        if model_init is not None:
            from transformers.trainer_utils import number_of_arguments

            model = model_init(None) if number_of_arguments(model_init) == 1 else model_init()
        self.student_adapter = student_adapter or adapter_for(model)
        self.method = build_method(args, self.student_adapter.task)
        # Comparative KD add-on, teacher-call budget subset and InDistill warm-up (methods/ckd.py, indistill.py):
        # all their input checks run here, before Trainer is built.
        from .methods.ckd import TeacherCallBudget, with_ckd_addon
        from .methods.indistill import InDistillStage

        self.method = with_ckd_addon(self.method, args)
        indistill_teacher = kwargs.pop("indistill_teacher", None)
        teacher, assistants = self._resolve_assistants(args, model, teacher, list(kwargs.pop("assistants", None) or ()),
                                                       teacher_cache)
        self.ckd_budget = TeacherCallBudget(args, train_dataset) if args.teacher_call_budget else None
        if self.ckd_budget is not None:
            if teacher is None or teacher_cache is not None or args.teacher_cache_dir:
                raise DistillationInputError(
                    "teacher_call_budget runs the teacher itself on the N budget samples: pass teacher=... and no "
                    "teacher-output cache.")
            train_dataset = self.ckd_budget.dataset
        stage_teacher = indistill_teacher if indistill_teacher is not None else teacher
        if args.indistill_layers and stage_teacher is None:
            raise DistillationInputError(
                "InDistill reads the teacher's intermediate features: pass teacher=... (or indistill_teacher=...); a "
                "teacher-output cache holds final outputs only.")
        self.indistill = InDistillStage.from_config(
            args, stage_teacher, model, adapter_for(stage_teacher) if stage_teacher is not None else None)
        self.teacher_cache = self._open_cache(teacher_cache or args.teacher_cache_dir)
        if teacher is not None and self.teacher_cache is not None:  # the cache wins: it must be this teacher's
            self.teacher_cache.check_teacher(teacher)
        if self.method.uses_teacher and teacher is None and self.teacher_cache is None:
            raise DistillationInputError(
                f"method {args.method!r} needs a teacher: pass teacher=... or a teacher-output cache "
                "(teacher_cache=... / --teacher_cache_dir, written by `hf-cifd cache-teacher`)."
            )
        self.teacher_adapter = teacher_adapter or (adapter_for(teacher) if teacher is not None else None)
        teacher_dims = self._teacher_dims(teacher)
        self._rdm_factory, self._rdm_memo = (rdms, {}) if callable(rdms) else (None, None)
        if self._rdm_factory is not None:
            rdms = self._factory_rdms(args)
        rdm_map = self._check_inputs(args, model, teacher, rdms, teacher_dims, train_dataset)

        self._teacher_widths = teacher_dims
        student_dims = self.student_adapter.embedding_dims(model)
        container = self._build_container(model, args)
        if data_collator is None:
            data_collator = collate
        if self.teacher_cache is not None:
            from .data.cache import CachedTeacherCollator

            data_collator = CachedTeacherCollator(self.teacher_cache, data_collator)
            logger.info("teacher outputs come from the cache %s: the teacher's view of each sample is the one cached "
                        "(un-augmented with hf-cifd cache-teacher), not the student's augmented view",
                        getattr(self.teacher_cache, "path", ""))
        data_collator = self._checked_collator(data_collator, model)
        # A callable(student) -> {metric: value} run by evaluate(), e.g. hf_cifd.eval.clip.CLIPEvaluator (CLIP).
        self.evaluator = evaluator
        if compute_metrics is None and self.student_adapter.task == "classification":
            compute_metrics = accuracy_metrics
        callbacks = list(kwargs.pop("callbacks", None) or [])
        self._nonfinite = _NonFiniteGuard(args.nonfinite_policy)
        callbacks.append(self._nonfinite)
        if _is_stream(train_dataset) and not any(isinstance(c, StreamResumeCallback) for c in callbacks):
            # Saves the stream position in each checkpoint and restores it on resume (no repeats, no skips).
            callbacks.append(StreamResumeCallback(dataset=train_dataset))
        super().__init__(model=container, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                         data_collator=data_collator, compute_metrics=compute_metrics, callbacks=callbacks, **kwargs)
        if self.is_deepspeed_enabled:
            _fill_deepspeed_sizes(self.accelerator.state.deepspeed_plugin.hf_ds_config, max(student_dims.values()))
            self.student_adapter.prepare_for_deepspeed(self.model.student)
            if self.accelerator.state.deepspeed_plugin.zero_stage == 3:
                from deepspeed.utils import set_z3_leaf_modules

                # The entropy model reads compressai's ParameterLists without calling them, and torch's
                # MultiheadAttention reads its out_proj's weight without calling it: ZeRO-3 gathers them whole.
                set_z3_leaf_modules(container, list(_Z3_LEAVES), raise_if_not_found=False)

        self.model_init = model_init
        self.teacher = self._prepare_teacher(teacher) if teacher is not None and self.method.uses_teacher else None
        self.teacher_runner = TeacherRunner(self.teacher, self.teacher_adapter)
        self._setup_budget_and_warmup(indistill_teacher)
        self.assistant_runners = [TeacherRunner(self._prepare_teacher(a), adapter_for(a)) for a in assistants]
        self.rdms = nn.ModuleDict({m: nn.ModuleList(r) for m, r in rdm_map.items()})
        self.rdms.to(self.args.device).eval().requires_grad_(False)
        self._rdm_cache_dir = self._cache_rdm_outputs()
        self._term_sums: dict[str, torch.Tensor] = {}
        self._term_count = 0
        if self.args.world_size > 1:
            from .distributed import destroy_at_exit

            destroy_at_exit()  # every rank exits 0 even when the script never tears the process group down
        self._term_names: tuple[str, ...] | None = None  # the running sum of steps with these terms, as one vector
        self._term_vector: torch.Tensor | None = None
        if args.nonfinite_policy == "skip" and self.is_deepspeed_enabled:
            raise DistillationInputError(
                "nonfinite_policy='skip' drops a step's gradients before the optimizer step, which DeepSpeed's engine "
                "does not allow: use nonfinite_policy='stop' with DeepSpeed.")

    # ------------------------------------------------------------------ set-up
    def _build_container(self, student: nn.Module, args: DistillationConfig) -> DistillationModel:
        """The student plus freshly initialised IBMs / projectors / method modules (seeded by the caller)."""
        student_dims, teacher_dims = self.student_adapter.embedding_dims(student), self._teacher_widths
        ibms, projectors = {}, {}
        if self.method.matches_embeddings and teacher_dims:
            for modality, dim in student_dims.items():
                if args.use_ibm and self.method.uses_rdms:
                    ibms[modality] = InformationBottleneck(dim, teacher_dims[modality],
                                                           _ibm_decoder_layers(args, modality, dim, teacher_dims[modality]))
                else:
                    projectors[modality] = Projector(dim, teacher_dims[modality], args.projector_layers)
        return DistillationModel(student, self.student_adapter, ibms, projectors,
                                 self.method.extra_modules(student_dims, teacher_dims))

    def _factory_rdms(self, args: DistillationConfig):
        """RDMs from the ``rdms`` callable, memoised by rates (a trial that keeps the rates reuses them)."""
        if not (self.method.uses_rdms and args.num_rdms):
            return None
        key = tuple(args.rdm_rates)
        if key not in self._rdm_memo:
            self._rdm_memo[key] = self._rdm_factory(args)
        return self._rdm_memo[key]

    def call_model_init(self, trial=None) -> DistillationModel:
        """A fresh container per hyperparameter-search trial: the trial's values are applied to ``args`` first (Trainer
        applies them only after building the model), the seed becomes ``seed + trial.number`` (every trial starts
        from its own initial weights), then the student, IBMs / projectors and method modules are built anew and,
        when the trial changed the RDM rates, the RDMs are re-made by the ``rdms`` callable."""
        from .hpo import apply_trial_params

        if trial is not None and self.hp_search_backend is not None:
            apply_trial_params(self, trial)
        enable_full_determinism(self.args.seed) if self.args.full_determinism else set_seed(self.args.seed)
        student = super().call_model_init(trial)
        if self.indistill is not None:  # its hooks and channel selections belong to one student
            from .methods.indistill import InDistillStage

            old = self.indistill
            self.indistill = InDistillStage.from_config(self.args, old.teacher, student, old.teacher_adapter)
            self.indistill.teacher, self.indistill.counter = old.teacher, old.counter
        if self._rdm_factory is not None and self.method.uses_rdms:
            rdm_map = self._check_inputs(self.args, student, self.teacher, self._factory_rdms(self.args),
                                         self._teacher_widths, None)
            self.rdms = nn.ModuleDict({m: nn.ModuleList(r) for m, r in rdm_map.items()})
            self.rdms.to(self.args.device).eval().requires_grad_(False)
            if self._rdm_cache_dir is not None:  # the cached RDM outputs were the previous RDMs'
                self.data_collator = self.data_collator.collate_fn
                self._rdm_cache_dir.cleanup()
            self._rdm_cache_dir = self._cache_rdm_outputs()
        return self._build_container(student, self.args)

    def hyperparameter_search(self, hp_space=None, compute_objective=None, n_trials: int = 20,
                              direction: str | None = None, backend: str | None = "optuna", hp_name=None, *,
                              storage: str | None = None, study_name: str | None = None, pruner=None, **kwargs):
        """Trainer's hyperparameter search with this method's default space, an ASHA-style pruner and a resumable
        study; see :func:`hf_cifd.hpo.run_search` (arguments, defaults and what a resumed search does)."""
        from .hpo import run_search

        return run_search(self, super().hyperparameter_search, hp_space=hp_space, compute_objective=compute_objective,
                          n_trials=n_trials, direction=direction, backend=backend, hp_name=hp_name, storage=storage,
                          study_name=study_name, pruner=pruner, **kwargs)

    @staticmethod
    def _open_cache(cache):
        if cache is None or not isinstance(cache, (str, os.PathLike)):
            return cache
        from .data.cache import TeacherCache

        return TeacherCache(cache)

    def _resolve_assistants(self, args, student, teacher, assistants, teacher_cache):
        """TAKD: the last assistant becomes the teacher of this (last) link of the chain. DGKD: the assistants run
        beside the teacher. Returns ``(teacher, assistants the trainer runs)``."""
        mode = self.method.uses_assistants
        if mode is None:
            if assistants:
                raise DistillationInputError(
                    f"assistants=... were given but method {args.method!r} does not use teacher assistants "
                    "(use method 'takd' or 'dgkd').")
            return teacher, []
        if not assistants:
            raise DistillationInputError(
                f"method {args.method!r} distils through teacher assistants: pass assistants=[...] (largest first), "
                "trained e.g. with hf_cifd.assistants.train_assistants(...).")
        n_student = self.student_adapter.num_classes(student)
        for k, assistant in enumerate(assistants):
            n = adapter_for(assistant).num_classes(assistant)
            if n_student and n and n != n_student:
                raise DistillationInputError(
                    f"assistant {k} predicts {n} classes but the student {n_student}: every assistant needs the "
                    "teacher's label space.")
        if mode == "last":
            if teacher_cache is not None or args.teacher_cache_dir:
                raise DistillationInputError(
                    "method 'takd' distils from the last assistant, but a teacher-output cache holds the teacher's "
                    "outputs: drop the cache (or cache the last assistant's outputs and use method 'kd').")
            return assistants[-1], []
        if args.dgkd_drop_num >= 1 + len(assistants):
            raise DistillationInputError(
                f"dgkd_drop_num={args.dgkd_drop_num} would drop every one of the {1 + len(assistants)} teacher/assistant "
                "KD terms: use a smaller dgkd_drop_num or more assistants.")
        return teacher, assistants

    def assistant_outputs(self, batch: Mapping[str, Any]) -> dict[str, list[Encoded]]:
        """Each assistant's outputs for ``batch`` (no grad), as the ``guides`` of an assistant method."""
        if not self.assistant_runners:
            return {}
        outs = [runner(_without_cached_teacher(batch)) for runner in self.assistant_runners]
        return {m: outs for m in outs[0].embeddings}

    @property
    def assistant_calls(self) -> int:
        """Samples the teacher assistants were run on by this process (summed over assistants)."""
        return sum(r.calls for r in getattr(self, "assistant_runners", ()))

    def _teacher_dims(self, teacher) -> dict[str, int]:
        if teacher is not None:
            return self.teacher_adapter.embedding_dims(teacher)
        if self.teacher_cache is not None:
            return embedding_fields(self.teacher_cache.fields)
        return {}

    def _check_inputs(self, args, student, teacher, rdms, teacher_dims, train_dataset) -> dict[str, list]:
        """Every check that can fail before training starts."""
        task = self.student_adapter.task
        if task == "classification" and self.method.uses_teacher:
            n_student = self.student_adapter.num_classes(student)
            if teacher is not None:
                n_teacher = self.teacher_adapter.num_classes(teacher)
            else:
                n_teacher = self.teacher_cache.fields.get("teacher_logits")
            if n_student and n_teacher and n_student != n_teacher:
                raise DistillationInputError(
                    f"the teacher predicts {n_teacher} classes but the student {n_student}: distillation needs the "
                    "same label space (re-create the student head with the teacher's num_classes)."
                )
        if rdms is None:
            rdm_map = {}
        elif isinstance(rdms, Mapping):
            rdm_map = {m: list(r) for m, r in rdms.items()}
        else:
            rdm_map = {self.student_adapter.modalities[0]: list(rdms)}
        if self.method.uses_rdms and args.num_rdms:
            counts = {m: len(r) for m, r in rdm_map.items()}
            if not rdm_map or any(c != args.num_rdms for c in counts.values()):
                raise DistillationInputError(
                    f"method 'cifd' with num_rdms={args.num_rdms} needs {args.num_rdms} trained RDMs per modality, got "
                    f"{counts or 'none'}: train them with hf_cifd.train_rdms(...) (or `hf-cifd train-rdms`), or set "
                    "num_rdms=0."
                )
        for modality, modules in rdm_map.items():
            for i, rdm in enumerate(modules):
                width = teacher_dims.get(modality)
                if width is not None and rdm.embed_dim != width:
                    raise DistillationInputError(
                        f"RDM {i} ({modality}) was trained for a teacher embedding of width {rdm.embed_dim}, but this "
                        f"teacher's is {width}: train RDMs on this teacher's embeddings."
                    )
        if train_dataset is not None and not _is_stream(train_dataset):
            from .data.validate import check_dataset

            check_dataset(train_dataset, num_classes=self.student_adapter.num_classes(student),
                          needs_labels=task == "classification" and self.method.needs_labels)
        if task == "classification" and self.method.needs_labels:
            fields = _sample_fields(train_dataset)
            if fields is not None and not ({"labels", "label"} & fields):
                raise DistillationInputError(
                    f"the training dataset has no 'labels'/'label' field (fields: {sorted(fields)}); method "
                    f"{args.method!r} trains on labels. Add the label column or rename it to 'labels'."
                )
        if self.teacher_cache is not None and train_dataset is not None:
            keys = _dataset_keys(train_dataset)
            if keys is not None:
                self.teacher_cache.check_covers(keys)
        return rdm_map

    def _checked_collator(self, data_collator, student):
        """Every batch (streams included) is checked on the CPU where it is collated: data/validate.py."""
        from .data.validate import CheckedCollator

        required = ["pixel_values"]
        if self.student_adapter.task == "classification" and self.method.needs_labels:
            required.append("labels")
        return CheckedCollator(data_collator, num_classes=self.student_adapter.num_classes(student), required=required)

    def _prepare_teacher(self, teacher: nn.Module) -> nn.Module:
        """The frozen teacher in ``args.teacher_dtype`` (default: the training dtype), placed by accelerate or, under
        DeepSpeed, by its own inference engine (ZeRO-3 shards it too, as TRL does for its reference model)."""
        teacher.eval().requires_grad_(False)
        dtype = self.args.teacher_torch_dtype
        if self.is_deepspeed_enabled:
            import deepspeed

            config = dict(self.accelerator.state.deepspeed_plugin.deepspeed_config)
            zero = dict(config.get("zero_optimization", {}))
            if zero.get("stage") != 3:
                zero["stage"] = 0  # no sharding needed for a frozen model below ZeRO-3
            # No optimizer for a frozen model: DeepSpeed refuses an optimizer offload without one (TRL drops it too).
            zero.pop("offload_optimizer", None)
            config = {k: v for k, v in config.items() if k not in ("optimizer", "scheduler")}
            config["zero_optimization"] = zero
            config["bf16"] = {"enabled": dtype == torch.bfloat16}
            config["fp16"] = {"enabled": dtype == torch.float16}
            adapter_for(teacher).prepare_for_deepspeed(teacher)
            if zero["stage"] == 3:
                from deepspeed.utils import set_z3_leaf_modules

                set_z3_leaf_modules(teacher, list(_Z3_LEAVES), raise_if_not_found=False)
            engine, *_ = deepspeed.initialize(model=teacher, config=config)
            return engine.module.eval()
        if dtype != torch.float32:
            teacher.to(dtype)  # TeacherRunner then runs it under autocast, which casts its inputs
        return self.accelerator.prepare_model(teacher, evaluation_mode=True)

    def get_decay_parameter_names(self, model: nn.Module) -> list[str]:
        """Trainer's rule (no weight decay on biases and LayerNorm) extended to every normalisation layer: BatchNorm
        and GroupNorm weights get no decay either (the ffcv ImageNet recipe the paper trains with; timm's default)."""
        norms = (nn.GroupNorm, nn.modules.batchnorm._NormBase)
        norm_params = {f"{name}.{p}" if name else p for name, module in model.named_modules() if isinstance(module, norms)
                       for p, _ in module.named_parameters(recurse=False)}
        return [n for n in super().get_decay_parameter_names(model) if n not in norm_params]

    # ------------------------------------------------------------------ the loss
    @property
    def teacher_calls(self) -> int:
        """Samples the teacher was run on by this process (cached outputs cost none)."""
        return self.teacher_runner.calls

    def teacher_outputs(self, batch: Mapping[str, Any]) -> Encoded | None:
        """The teacher's outputs for ``batch``: read from cached fields when present, else computed (no grad)."""
        return self.teacher_runner(batch) if self.method.uses_teacher else None

    def _cache_rdm_outputs(self):
        """With a teacher-output cache, the frozen RDMs run once per cached sample here instead of once per step
        (data/rdm_cache.py); returns the temporary directory holding their outputs (None: RDMs run per step)."""
        if not (self.args.rdm_output_cache and self.teacher_cache is not None and self.method.uses_rdms
                and any(len(mods) for mods in self.rdms.values())):
            return None
        from .data.rdm_cache import CachedRDMCollator, compute_rdm_outputs, temporary_rdm_cache_dir

        directory = temporary_rdm_cache_dir()
        table = compute_rdm_outputs(self.rdms, self.teacher_cache, directory.name, device=self.args.device,
                                    batch_size=max(self.args.per_device_eval_batch_size, 256),
                                    context=self.compute_loss_context_manager)
        self.data_collator = CachedRDMCollator(table, self.data_collator)
        return directory

    def rdm_outputs(self, teacher: Encoded | None, batch: Mapping[str, Any] | None = None) -> dict[str, list]:
        """Each frozen RDM's output for the teacher embedding: read from the batch when cached, else computed."""
        if teacher is None or not self.method.uses_rdms:
            return {}
        if batch is not None and self._rdm_cache_dir is not None:
            from .data.rdm_cache import cached_rdm_outputs

            cached = cached_rdm_outputs(batch, self.rdms)
            if cached is not None:
                return cached
        with torch.no_grad():
            # The student loss reads the RDMs' embeddings and logits, never their rates.
            return {m: [rdm(teacher.embeddings[m], with_rate=False) for rdm in mods] for m, mods in self.rdms.items()}

    # ------------------------------------------------------------------ InDistill warm-up, teacher-call budget
    def _setup_budget_and_warmup(self, indistill_teacher) -> None:
        if self.ckd_budget is not None:  # the teacher runs once on each budget sample, then never again
            self.teacher_runner.calls += self.ckd_budget.run_teacher(
                self.teacher, self.teacher_adapter, self.data_collator, self.accelerator,
                self.args.per_device_eval_batch_size)
            self.data_collator = self.ckd_budget.collator(self.data_collator)
            self.teacher_runner.model = None
        if self.indistill is not None:
            if indistill_teacher is not None:
                self.indistill.teacher = self._prepare_teacher(indistill_teacher)
            else:
                self.indistill.teacher = self.teacher
                self.indistill.counter = self.teacher_runner  # warm-up teacher passes count as teacher calls
            logger.info("InDistill schedule: %s", self.indistill.schedule.describe(self.indistill.pairs))

    def _get_train_sampler(self, train_dataset=None):
        if self.ckd_budget is not None:  # batches of whole pairs drawn from the pool of all subset pairs
            return self.ckd_budget.sampler(self._train_batch_size, self.args.world_size)
        return super()._get_train_sampler(train_dataset)

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        """Trainer's ``train``; ``resume_from_checkpoint`` (True / "true" / a path) resumes from a complete checkpoint
        only, or says why not (hf_cifd/checkpoints.py)."""
        view, tmp = self._prepare_resume(resume_from_checkpoint)
        try:
            output = super().train(view, *args, **kwargs)
            if self.state.global_step == 0 and self.state.max_steps > 0 and _is_stream(self.train_dataset):
                # Trainer only warns: a run that "finished" without one sample is a broken data pipeline.
                raise DistillationInputError(
                    "the training stream yielded no sample: check the dataset id / data_files / split, the filters and "
                    "the bad-record log (every record may have been rejected).")
            return output
        finally:
            from .checkpoints import remove_view

            remove_view(tmp)
            if self.indistill is not None:
                self.indistill.close()  # no hook survives train(), even when it fails

    def _stage_terms(self, model, inputs):
        """``(terms, student)`` of the InDistill warm-up while a layer pair is active, or (budget mode) the CE of
        evaluation batches the teacher may not see; ``(None, None)`` when the method's own loss applies."""
        from .methods.ckd import student_only_terms
        from .teacher import cached_teacher_outputs

        terms = student = None
        if self.indistill is not None and model.training:
            index = self.indistill.active(self.state)
            if index is not None:
                terms, student = self.indistill.loss_terms(index, inputs, lambda: model(**inputs))
        if terms is None and self.ckd_budget is not None and cached_teacher_outputs(inputs) is None:
            student = model(**inputs)
            terms = student_only_terms(self.args, student, inputs)
        return terms, student

    def _unwrapped(self, model: nn.Module) -> DistillationModel:
        # accelerate's unwrap_model reads package metadata (is_deepspeed_available) on every call: ~1 ms a step.
        if getattr(self, "_unwrap_memo", (None,))[0] is not model:
            self._unwrap_memo = (model, self.accelerator.unwrap_model(model))
        return self._unwrap_memo[1]

    def _at_training_resolution(self, inputs):
        """``progressive_resolution``: the batch's ``pixel_values`` resized to this epoch's resolution (antialiased
        bilinear; the teacher reads the same resized images unless it has its own ``teacher_pixel_values``)."""
        from .data.views import progressive_resolution

        pixels = inputs.get("pixel_values")
        if pixels is None or pixels.dim() != 4:
            return inputs
        res = progressive_resolution(int(self.state.epoch or 0), *self.args.progressive_resolution)
        if tuple(pixels.shape[-2:]) == (res, res):
            return inputs
        resized = torch.nn.functional.interpolate(pixels, size=(res, res), mode="bilinear", antialias=True,
                                                  align_corners=False)
        return {**inputs, "pixel_values": resized}

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if model.training and self.args.progressive_resolution:
            inputs = self._at_training_resolution(inputs)
        terms, student = self._stage_terms(model, inputs)
        if terms is None:
            teacher = self.teacher_outputs(inputs)
            student = model(**inputs)
            guides = (self.assistant_outputs(inputs) if self.method.uses_assistants == "all"
                      else self.rdm_outputs(teacher, inputs))
            terms = self.method.loss_terms(student, teacher, guides, inputs, self._unwrapped(model).extra)
        loss = total_loss(terms)
        if model.training:
            self._record(terms)
        return (loss, student) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss, student = self.compute_loss(model, inputs, return_outputs=True)
        if prediction_loss_only:
            return loss.detach(), None, None
        return loss.detach(), student.logits, inputs.get("labels")

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """Trainer's evaluation (eval loss) plus, when an ``evaluator`` was given, its metrics (CLIP: zero-shot top-1/5
        and retrieval R@1/5/10), computed on the main process, broadcast, logged and returned as ``eval_*``."""
        has_data = eval_dataset is not None or self.eval_dataset is not None
        metrics = super().evaluate(eval_dataset, ignore_keys, metric_key_prefix) if has_data else {}
        if self.evaluator is None:
            return metrics
        from accelerate.utils import broadcast_object_list

        extra = [None]
        if self.accelerator.is_main_process:
            student = self.accelerator.unwrap_model(self.model_wrapped).student
            was_training = student.training
            student.eval()
            with torch.no_grad():
                extra[0] = {f"{metric_key_prefix}_{k}": v for k, v in self.evaluator(student).items()}
            student.train(was_training)
        if self.accelerator.num_processes > 1:
            broadcast_object_list(extra, from_process=0)
        self.log(extra[0])
        metrics.update(extra[0])
        return metrics

    # ------------------------------------------------------------------ logging
    def _record(self, terms: Mapping[str, torch.Tensor]) -> None:
        names = tuple(terms)
        values = torch.stack([terms[n].detach().float().reshape(()) for n in names])
        finite = torch.isfinite(values)
        if not bool(finite.all()):  # the step's one host synchronisation for this check
            bad = {n: v for n, v, ok in zip(names, values.tolist(), finite.tolist()) if not ok}
            self._nonfinite.found(bad, self.state.global_step + 1)
            return  # a skipped step's terms stay out of the logged means
        if names == self._term_names:  # the usual step: one addition for all terms
            self._term_vector = self._term_vector + values
        else:
            self._fold_term_vector()
            self._term_names, self._term_vector = names, values
        self._term_count += 1

    def _fold_term_vector(self) -> None:
        """Adds the running vector of the last term set into the per-name sums."""
        if self._term_vector is not None:
            for name, value in zip(self._term_names, self._term_vector.unbind()):
                self._term_sums[name] = self._term_sums[name] + value if name in self._term_sums else value
        self._term_names, self._term_vector = None, None

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._term_count:
            self._fold_term_vector()
            names = sorted(self._term_sums)
            means = torch.stack([self._term_sums[n] for n in names]) / self._term_count
            means = self.accelerator.reduce(means.to(self.args.device), reduction="mean")
            logs.update({f"loss/{n}": round(v, 6) for n, v in zip(names, means.tolist())})
            self._term_sums, self._term_count = {}, 0
        if self.indistill is not None and "loss" in logs:  # the layer pair of the last step (-1: main method)
            logs["indistill_pair"] = -1 if self.indistill.last_active is None else self.indistill.last_active
        calls = torch.tensor(float(self.teacher_calls), device=self.args.device)
        logs["teacher_calls"] = int(self.accelerator.reduce(calls, reduction="sum").item())
        if self.assistant_runners:
            calls = torch.tensor(float(self.assistant_calls), device=self.args.device)
            logs["assistant_calls"] = int(self.accelerator.reduce(calls, reduction="sum").item())
        if self.args.nonfinite_policy == "skip" and "loss" in logs:
            logs["skipped_steps"] = self._nonfinite.skipped
        super().log(logs, start_time)

    # ------------------------------------------------------------------ saving and sharing
    def create_model_card(self, model_name: str | None = None, language: str | None = None,
                          license: str | None = None, tags: str | list[str] | None = None,
                          finetuned_from: str | None = None, dataset: str | list[str] | None = None,
                          output_dir: str | None = None, **kwargs) -> None:
        """Writes ``README.md`` for the exported student to ``output_dir`` (default ``args.output_dir``): Trainer's
        own card assumes a ``PreTrainedModel``; this one (:func:`hf_cifd.hub.student_model_card`) has the student's
        library, pipeline tag, teacher as ``base_model``, datasets and a ``model-index`` of the last evaluation."""
        if not self.is_world_process_zero():
            return
        from .hub import student_model_card

        a, info = self.args, self.model_card_info
        output_dir = output_dir or a.output_dir
        rdms = {m: len(r) for m, r in self.rdms.items()}
        settings = {"method": a.method, "temperature": a.temperature, "lambda_ce": a.lambda_ce,
                    "lambda_kl": a.lambda_kl}
        if self.method.uses_rdms:
            settings.update(kd_dropout=a.kd_dropout, num_rdms=rdms or 0, rdm_rates=a.rdm_rates if rdms else None,
                            use_ibm=a.use_ibm, lambda_ibm=a.lambda_ibm if a.use_ibm else None)
        if self.method.matches_embeddings:
            settings.update(embedding_weight=a.embedding_weight, embedding_distortion=a.embedding_distortion)
        if self.student_adapter.task == "clip":
            settings["lambda_cl"] = a.lambda_cl
        settings.update(learning_rate=a.learning_rate, per_device_train_batch_size=a.per_device_train_batch_size,
                        seed=a.seed)
        settings = {k: v for k, v in settings.items() if v is not None}
        metrics = next((h for h in reversed(self.state.log_history) if any(k.startswith("eval_") for k in h)), {})
        runtime = next((h["train_runtime"] for h in reversed(self.state.log_history) if "train_runtime" in h), None)
        # The last logged count is summed over processes (log() reduces it); before any log, this process's own.
        calls = next((h["teacher_calls"] for h in reversed(self.state.log_history) if "teacher_calls" in h),
                     self.teacher_calls)
        cost = {"optimizer steps": self.state.global_step, "teacher calls (samples the teacher ran on)": calls}
        if runtime is not None:
            cost["training time (s)"] = round(runtime, 1)
        datasets = [dataset] if isinstance(dataset, str) else (dataset or info.get("datasets"))
        name = model_name or (a.hub_model_id or "").split("/")[-1] or os.path.basename(os.path.abspath(output_dir))
        library = self.student_adapter.library
        if library == "torch":  # a plain module: hf_cifd's own Hub-mixin classes (SimpleCNN) or bare PyTorch
            from huggingface_hub import PyTorchModelHubMixin

            student = self.accelerator.unwrap_model(self.model_wrapped).student
            library = "hf_cifd" if isinstance(student, PyTorchModelHubMixin) else "pytorch"
        card = student_model_card(
            model_name=name, library=library, task=self.student_adapter.task, method=a.method,
            settings=settings, metrics=metrics, teacher=info.get("teacher"),
            teacher_hub_id=finetuned_from or info.get("base_model"), datasets=datasets,
            eval_split=info.get("eval_split"), rdm_rows=info.get("rdm_metrics") or self._rdm_card_rows(), cost=cost,
            repo_id=a.hub_model_id, tags=[tags] if isinstance(tags, str) else list(tags or []), license=license)
        os.makedirs(output_dir, exist_ok=True)
        card.save(os.path.join(output_dir, "README.md"))

    # ------------------------------------------------------------------ checkpoints and resume
    def _run_state(self) -> dict[str, Any]:
        from .checkpoints import rdm_fingerprint

        if not hasattr(self, "_rdm_fingerprint"):  # the RDMs are frozen: hash them once
            self._rdm_fingerprint = rdm_fingerprint({m: list(r) for m, r in self.rdms.items()})
        return {"method": self.args.method, "rdms": self._rdm_fingerprint, "teacher_calls": self.teacher_calls,
                "skipped_steps": self._nonfinite.skipped}

    def _stream_callbacks(self) -> list[StreamResumeCallback]:
        return [c for c in self.callback_handler.callbacks if isinstance(c, StreamResumeCallback)]

    def _save_checkpoint(self, model, trial) -> None:
        """Trainer's checkpoint + hf_cifd's state (teacher calls, run identity, stream position), then the manifest
        that marks it complete; old checkpoints are rotated only after that."""
        import shutil

        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

        from . import checkpoints

        run_dir = self._get_output_dir(trial=trial)
        path = os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        if self.args.should_save and os.path.isdir(path) and not checkpoints.is_complete(path):
            shutil.rmtree(path)  # the remains of an interrupted save of this step
        self.accelerator.wait_for_everyone()
        limit, self.args.save_total_limit = self.args.save_total_limit, None
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self.args.save_total_limit = limit
        os.makedirs(path, exist_ok=True)
        checkpoints.save_run_state(path, self.args.process_index, self._run_state())
        for cb in self._stream_callbacks():
            cb.save(self.args, self.state, path)
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            checkpoints.write_manifest(path)
            rotate_checkpoints(output_dir=run_dir, save_total_limit=limit,
                               best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=True)

    def _prepare_resume(self, value) -> tuple[str | None, str | None]:
        """Resolves ``resume_from_checkpoint``, checks the checkpoint's files and run identity, restores the teacher-call
        count and points the stream callback at the checkpoint; returns ``(path for Trainer, temp dir to remove)``."""
        from . import checkpoints

        path, absent = checkpoints.resolve(value, self.args.output_dir, self.args.resume_partial)
        if path is None:
            return None, None
        rank = self.args.process_index
        state_file = checkpoints.RUN_STATE.format(rank=rank)
        saved = None if state_file in absent else checkpoints.load_run_state(path, rank)
        if saved is None and checkpoints.is_complete(path) and not self.args.resume_partial:
            raise DistillationInputError(
                f"{path} has no {state_file} (teacher calls, method, RDMs): it was not written by this version of "
                "hf_cifd. Set resume_partial=True to resume without it.")
        if saved is not None:
            checkpoints.check_same_run(saved, self._run_state(), path)
            self.teacher_runner.calls += int(saved["teacher_calls"])
            self._nonfinite.skipped = int(saved.get("skipped_steps", 0))
        for cb in self._stream_callbacks():
            cb.resume_dir, cb.resume_required = path, not self.args.resume_partial
            cb.resume_skip = f"stream_state_rank{rank}.json" in absent
        logger.info("resuming from %s", path)
        return checkpoints.without(path, absent)

    def _rdm_card_rows(self) -> list[dict] | None:
        """What train_rdms measured for each RDM (``card_info``: rate weight, bits, distortion, accuracy)."""
        rows = [dict(r.card_info) for mods in self.rdms.values() for r in mods if getattr(r, "card_info", None)]
        return rows or None

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        output_dir = output_dir or self.args.output_dir
        if _internal_call and os.path.abspath(output_dir) != os.path.abspath(self.args.output_dir):
            # A checkpoint: the whole container (student + IBM + projectors), so that training resumes exactly.
            return super().save_model(output_dir, _internal_call)
        self.save_student(output_dir)
        if self.args.push_to_hub and not _internal_call:
            self.push_to_hub(commit_message="Model save", revision=self.args.hub_revision)

    def save_student(self, output_dir: str) -> None:
        """Writes the student alone (no IBM, projectors or RDMs) in its library's own format, with its card."""
        student = self.accelerator.unwrap_model(self.model_wrapped).student
        zero3 = self.is_deepspeed_enabled and self.accelerator.state.deepspeed_plugin.zero_stage == 3
        if zero3:
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(student.parameters()), modifier_rank=None):
                if self.args.should_save:
                    self.student_adapter.save(student, output_dir)
        elif self.args.should_save:
            self.student_adapter.save(student, output_dir)
        if self.args.should_save:
            self.create_model_card(output_dir=output_dir)
            logger.info("Saved the %s student (+ model card) to %s", self.student_adapter.library, output_dir)

    def init_hf_repo(self, token: str | None = None, private: bool | None = None) -> None:
        """Trainer's repo creation (``hub_model_id``, else the output_dir's name) through ``HfApi.create_repo``, with
        offline mode / no network / no login as one clear error."""
        from pathlib import Path

        from huggingface_hub import HfApi

        from .hub import as_hub_error, check_hub_reachable

        if not self.is_world_process_zero():
            return
        check_hub_reachable()
        name = self.args.hub_model_id or Path(self.args.output_dir).absolute().name
        token = token if token is not None else self.args.hub_token
        private = private if private is not None else self.args.hub_private_repo
        try:
            self.hub_model_id = HfApi(token=token).create_repo(name, private=private, exist_ok=True).repo_id
        except Exception as e:  # noqa: BLE001
            err = as_hub_error(e)
            if err is None:
                raise
            raise err from None
        self.push_in_progress = None

    def _stage_student(self) -> str:
        """The exported student in a clean ``<output_dir>/.hub_staging`` (every process: ZeRO-3 gathers)."""
        staging = os.path.join(self.args.output_dir, ".hub_staging")
        if self.args.should_save and os.path.exists(staging):
            shutil.rmtree(staging)
        self.save_student(staging)
        return staging

    def push_to_hub(self, commit_message: str | None = "End of training", blocking: bool = True,
                    token: str | None = None, revision: str | None = None, private: bool | None = None, **kwargs):
        """Uploads the exported student alone (staged by :meth:`save_student` in a clean folder: weights, config,
        processor / tokenizer, card) to ``args.hub_model_id``; nothing else in ``output_dir`` is uploaded."""
        from .hub import check_hub_reachable, upload_folder

        check_hub_reachable()
        self.callback_handler.on_push_begin(self.args, self.state, self.control)
        self._finish_current_push()
        staging = self._stage_student()
        if not self.is_world_process_zero():
            return None
        if self.hub_model_id is None:
            self.init_hf_repo(token=token, private=private)
        info = upload_folder(staging, self.hub_model_id, token=token if token is not None else self.args.hub_token,
                             commit_message=commit_message, revision=revision or self.args.hub_revision,
                             run_as_future=not blocking, create_repo=False)  # init_hf_repo created it
        if blocking:
            shutil.rmtree(staging, ignore_errors=True)
        return info

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        """At each save (hub_strategy every_save): the student exported from the current weights, not the
        checkpoint (which holds the training container, optimizer state and training_args.bin)."""
        from transformers.trainer_utils import HubStrategy

        from .hub import upload_folder

        if self.args.hub_strategy == HubStrategy.END:
            return
        pending = getattr(self, "push_in_progress", None)
        busy = pending is not None and not pending.is_done()
        if busy and not self.args.hub_always_push:
            return
        self._finish_current_push()  # the staging folder is reused: let the last upload finish
        self.callback_handler.on_push_begin(self.args, self.state, self.control)
        staging = self._stage_student()
        if not self.is_world_process_zero():
            return
        from transformers.utils import PushInProgress

        job = upload_folder(staging, self.hub_model_id, token=self.args.hub_token, run_as_future=True,
                            commit_message=f"Training in progress, step {self.state.global_step}",
                            revision=self.args.hub_revision, create_repo=False)
        self.push_in_progress = PushInProgress([job])


def _ibm_decoder_layers(args, modality: str, dim: int, teacher_dim: int) -> int:
    """The paper decodes the IBM's W^ with a projection only "in case of a dimensionality mismatch"."""
    layers = args.ibm_decoder_layers
    if layers is None:
        return 0 if dim == teacher_dim else 1
    if layers == 0 and dim != teacher_dim:
        raise DistillationInputError(
            f"ibm_decoder_layers=0 (identity) needs equal widths, but the student's {modality} embedding is {dim} wide "
            f"and the teacher's {teacher_dim}: use 1 or 2 (or leave it unset).")
    return layers


def _without_cached_teacher(batch: Mapping[str, Any]) -> Mapping[str, Any]:
    """The batch minus cached teacher outputs: an assistant must run on the inputs, never read the teacher's cache."""
    cached = {f"teacher_{m}_embedding" for m in embedding_fields(batch)} | {"teacher_logits", "teacher_logit_scale"}
    return {k: v for k, v in batch.items() if k not in cached}


class _NonFiniteGuard(TrainerCallback):
    """``nonfinite_policy``: "stop" raises at the first non-finite loss term; "skip" drops the gradients of the
    optimizer step that contains it (every rank agrees: one all-reduce per step), so no parameter moves."""

    def __init__(self, policy: str):
        self.policy, self.pending, self.skipped = policy, False, 0

    def found(self, terms: dict[str, float], step: int) -> None:
        named = ", ".join(f"{n}={v}" for n, v in terms.items())
        if self.policy == "stop":
            raise NonFiniteLossError(
                f"step {step}: non-finite loss term(s) {named}. Nothing was updated with it. Look for a diverging "
                "learning rate, NaN/inf inputs or teacher outputs; set nonfinite_policy='skip' to skip such steps.")
        logger.warning("step %d: non-finite loss term(s) %s: skipping this optimizer step", step, named)
        self.pending = True

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        if self.policy != "skip":
            return
        flag = torch.tensor(float(self.pending), device=args.device)
        if args.world_size > 1 and torch.distributed.is_initialized():
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        if flag.item() > 0:
            optimizer.zero_grad(set_to_none=True)  # no gradient: SGD and Adam leave those parameters unchanged
            self.skipped += 1
        self.pending = False


_Z3_LEAVES = (EntropyBottleneck1d, nn.MultiheadAttention)  # modules ZeRO-3 must gather whole (see __init__)


def _fill_deepspeed_sizes(ds_config, hidden_size: int) -> None:
    """The DeepSpeed "auto" values that Trainer derives from ``model.config.hidden_size`` (which the container and
    timm / open_clip students lack), from the student's embedding width instead, with Trainer's formulas."""
    ds_config.fill_only("zero_optimization.reduce_bucket_size", hidden_size * hidden_size)
    if ds_config.is_zero3():
        ds_config.fill_only("zero_optimization.stage3_prefetch_bucket_size", int(0.9 * hidden_size * hidden_size))
        ds_config.fill_only("zero_optimization.stage3_param_persistence_threshold", 10 * hidden_size)


def _is_stream(dataset) -> bool:
    import datasets

    return isinstance(dataset, datasets.IterableDataset)


def _dataset_keys(dataset) -> list[str] | None:
    """Sample keys of a map-style dataset (its ``sample_key`` column), or None when unknown up front."""
    names = getattr(dataset, "column_names", None)
    if names and "sample_key" in names and hasattr(dataset, "__len__"):
        return list(dataset["sample_key"])
    return None


def accuracy_metrics(eval_pred) -> dict[str, float]:
    """Top-1 accuracy of the student's logits on the evaluation set, as a fraction (the HF convention: 0.5 = 50 %)."""
    logits, labels = eval_pred.predictions, eval_pred.label_ids
    if isinstance(logits, tuple):
        logits = logits[0]
    return {"accuracy": float(np.mean(np.argmax(logits, axis=-1) == labels))}
