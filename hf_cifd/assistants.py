"""Teacher assistants for the TAKD / DGKD baselines: train them with the same ``DistillationTrainer``.

* TAKD (Mirzadeh et al. 2020): a chain of plain KD runs, teacher -> TA_1 -> ... -> TA_K; the student is then the
  chain's last link (``method="takd"``, ``assistants=[TA_1, ..., TA_K]``: it distils from TA_K).
* DGKD (Son et al. 2021): TA_k is distilled densely from the teacher and every larger assistant TA_1..TA_{k-1}
  (KD dropout over those terms; TA_1 has the teacher alone, i.e. plain KD); the student then from all of them
  (``method="dgkd"``).

Assistants are listed largest first. For the paper's CNN pair (Table 1) they are Table 8's 8/6/4-layer CNNs
(:func:`table8_assistants`); otherwise any timm / transformers / plain model with the teacher's label space.
Every stage reports what it cost: the samples each guiding model (teacher or assistant) was run on and the samples
the assistant trained on, so that ``hf_cifd.cost`` conventions (forward MACs x samples) apply to measured counts.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from torch import nn

from .checks import DistillationInputError
from .config import DistillationConfig

logger = logging.getLogger(__name__)

PROCEDURES = ("takd", "dgkd")


@dataclass
class AssistantStage:
    """One trained assistant: its guides and how many samples each of them (and the assistant) processed."""

    index: int
    method: str  # "kd" or "dgkd"
    guides: list[str]  # "teacher", "assistant_0", ...
    guide_calls: dict[str, int]  # samples each guide was run on (a teacher-output cache costs 0)
    train_samples: int  # samples the assistant was trained on (its forward passes)
    steps: int
    output_dir: str


@dataclass
class AssistantReport:
    assistants: list[nn.Module]
    stages: list[AssistantStage] = field(default_factory=list)

    @property
    def teacher_calls(self) -> int:
        """Samples the teacher itself was run on while the assistants trained."""
        return sum(s.guide_calls.get("teacher", 0) for s in self.stages)

    @property
    def guide_calls(self) -> int:
        """Samples any guiding model (teacher or assistant) was run on while the assistants trained."""
        return sum(sum(s.guide_calls.values()) for s in self.stages)

    def training_macs(self, forward_macs: Mapping[str, int]) -> int:
        """Forward MACs of the assistants' training (``hf_cifd.cost`` conventions: every guide's forward on each sample
        it was run on + each assistant's own forward per training sample). ``forward_macs``: per-sample forward MACs
        of "teacher" and "assistant_<k>" (e.g. ``hf_cifd.cost.forward_macs(model, one_input)``)."""
        missing = {g for s in self.stages for g in s.guide_calls} | {f"assistant_{s.index}" for s in self.stages}
        missing -= set(forward_macs)
        if missing:
            raise DistillationInputError(f"forward_macs lacks {sorted(missing)}.")
        return sum(sum(n * forward_macs[g] for g, n in s.guide_calls.items())
                   + s.train_samples * forward_macs[f"assistant_{s.index}"] for s in self.stages)

    def to_dict(self) -> dict[str, Any]:
        return {"teacher_calls": self.teacher_calls, "guide_calls": self.guide_calls,
                "stages": [dataclasses.asdict(s) for s in self.stages]}


def table8_assistants(names: Sequence[str] = ("cnn8", "cnn6", "cnn4"), num_classes: int = 100, **kwargs) -> list[nn.Module]:
    """The teacher assistants of CIFD Table 1 (TAKD / DGKD with 3 TAs): Table 8's 8-, 6- and 4-layer CNNs."""
    from .models import SimpleCNN

    return [SimpleCNN.from_table8(n, num_classes=num_classes, **kwargs) for n in names]


def train_assistants(
    teacher: nn.Module,
    assistants: Sequence[nn.Module],
    args: DistillationConfig,
    train_dataset,
    *,
    procedure: str = "takd",
    eval_dataset=None,
    save: bool = True,
    **trainer_kwargs,
) -> AssistantReport:
    """Trains ``assistants`` (largest first, in place) from ``teacher`` by ``procedure`` ("takd" or "dgkd").

    Each stage is a ``DistillationTrainer`` run with ``args`` (its method replaced by "kd" / "dgkd", its
    ``output_dir`` by ``<output_dir>/assistant-<k>``), so schedules, logging and checkpoints are the ones of any
    other run. ``trainer_kwargs`` (data_collator, callbacks, ...) go to every stage; a teacher-output cache
    (``teacher_cache=...``) is used by the stages whose teacher is the real teacher. ``save`` writes each assistant
    with the student exporter (its library's own format).
    """
    from .trainer import DistillationTrainer

    if procedure not in PROCEDURES:
        raise DistillationInputError(f"procedure must be one of {PROCEDURES}, got {procedure!r}.")
    assistants = list(assistants)
    if not assistants:
        raise DistillationInputError("train_assistants needs at least one assistant model.")
    if teacher is None:
        raise DistillationInputError("train_assistants needs the teacher: every chain starts from it.")
    cache = trainer_kwargs.pop("teacher_cache", None)
    report = AssistantReport(assistants=assistants)
    for k, assistant in enumerate(assistants):
        if procedure == "takd" or k == 0:
            method, guide, extra = "kd", (teacher if k == 0 else assistants[k - 1]), []
            guides = ["teacher" if k == 0 else f"assistant_{k - 1}"]
        else:
            method, guide, extra = "dgkd", teacher, assistants[:k]
            guides = ["teacher", *(f"assistant_{j}" for j in range(k))]
        # Only the student's run pushes; a teacher-output cache holds the TEACHER's outputs, so a stage guided by an
        # assistant must not read it.
        stage_args = dataclasses.replace(args, method=method, output_dir=os.path.join(args.output_dir, f"assistant-{k}"),
                                         push_to_hub=False,
                                         teacher_cache_dir=args.teacher_cache_dir if guide is teacher else None)
        if method == "dgkd" and stage_args.dgkd_drop_num >= 1 + len(extra):
            stage_args = dataclasses.replace(stage_args, dgkd_drop_num=len(extra))
        kwargs = dict(trainer_kwargs)
        if guide is teacher and cache is not None:
            kwargs["teacher_cache"] = cache
        if extra:
            kwargs["assistants"] = extra
        logger.info("%s: training assistant %d (%s) from %s", procedure, k, type(assistant).__name__, ", ".join(guides))
        trainer = DistillationTrainer(model=assistant, teacher=guide, args=stage_args, train_dataset=train_dataset,
                                      eval_dataset=eval_dataset, **kwargs)
        trainer.train()
        if save:
            trainer.save_model()
        calls = {guides[0]: trainer.teacher_calls}
        for j, runner in enumerate(trainer.assistant_runners):
            calls[f"assistant_{j}"] = runner.calls
        steps = trainer.state.global_step
        samples = steps * stage_args.train_batch_size * stage_args.gradient_accumulation_steps * stage_args.world_size
        report.stages.append(AssistantStage(index=k, method=method, guides=guides, guide_calls=calls,
                                            train_samples=samples, steps=steps, output_dir=stage_args.output_dir))
        assistant.eval().requires_grad_(False)
    return report


def train_auxiliary_teacher(aux: nn.Module, teacher: nn.Module, args, train_dataset, **trainer_kwargs) -> nn.Module:
    """Distils ``teacher`` into the auxiliary teacher ``aux`` (a wider model of the student's family) with a plain
    :class:`~hf_cifd.DistillationTrainer` run configured by ``args`` (e.g. ``method="kd"``, no InDistill), and returns
    ``aux`` (trained, in eval mode). Use it as the warm-up teacher: ``DistillationTrainer(student, teacher,
    args=..., indistill_teacher=aux)``; its layers' channels are then selected to the student's widths."""
    from .trainer import DistillationTrainer

    if getattr(args, "indistill_layers", None):
        raise DistillationInputError("train_auxiliary_teacher runs plain distillation: unset indistill_layers in its args.")
    trainer = DistillationTrainer(aux, teacher, args=args, train_dataset=train_dataset, **trainer_kwargs)
    trainer.train()
    trainer.accelerator.wait_for_everyone()
    return trainer.accelerator.unwrap_model(trainer.model).student.eval()
