"""Method objects: map (student outputs, teacher outputs, RDM outputs, batch) to named loss terms.

The trainer sums the terms and logs each by name; a method never runs a model itself. One method per
(task, name); the task comes from the student's adapter ("classification" or "clip").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ..adapters import Encoded
from ..modules import RDMOutput


@dataclass
class StudentOutput:
    """What the trainable container produced: the raw encoding, and per modality the student embedding
    mapped to the teacher's width (IBM decoder or projector) and the IBM rate (bits/sample, training only)."""

    encoded: Encoded
    matched: dict[str, torch.Tensor] = field(default_factory=dict)
    ibm_rate: dict[str, torch.Tensor | None] = field(default_factory=dict)
    training: bool = True  # KD dropout and the IBM noise apply only in training

    @property
    def logits(self) -> torch.Tensor | None:
        return self.encoded.logits


class Method:
    """Base class. Subclasses set the class attributes and implement :meth:`loss_terms`."""

    name: str = ""
    task: str = "classification"
    uses_teacher: bool = True
    uses_rdms: bool = False
    # Teacher assistants (DistillationTrainer(..., assistants=[...])): "all" = the trainer runs every assistant and
    # passes their outputs as ``guides`` (DGKD); "last" = the last assistant replaces the teacher (TAKD's chain).
    uses_assistants: str | None = None
    # The container maps the student embedding to the teacher's width (projector or IBM decoder).
    matches_embeddings: bool = False
    needs_labels: bool = True

    def __init__(self, config):
        self.config = config

    def extra_modules(self, student_dims: Mapping[str, int], teacher_dims: Mapping[str, int]) -> dict[str, nn.Module]:
        """Trainable modules the method needs besides the IBM/projectors (they join the container)."""
        return {}

    def loss_terms(
        self,
        student: StudentOutput,
        teacher: Encoded | None,
        rdms: Mapping[str, list[RDMOutput]],
        batch: Mapping[str, Any],
        extra: nn.ModuleDict,
    ) -> dict[str, torch.Tensor]:
        """``rdms``: per modality, the frozen RDMs' outputs (``uses_rdms``) or the teacher assistants' ``Encoded``
        outputs (``uses_assistants == "all"``), largest first; both have ``.logits`` and an embedding."""
        raise NotImplementedError


def ce_loss(config, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The label cross-entropy of every classification method (Trainer's ``label_smoothing_factor`` applies), in
    float32 whatever the logits' precision."""
    return F.cross_entropy(logits.float(), labels, label_smoothing=config.label_smoothing_factor)


_METHODS: dict[tuple[str, str], type[Method]] = {}


def register_method(cls: type[Method]) -> type[Method]:
    _METHODS[(cls.task, cls.name)] = cls
    return cls


def build_method(config, task: str) -> Method:
    try:
        return _METHODS[(task, config.method)](config)
    except KeyError:
        names = sorted(n for t, n in _METHODS if t == task)
        raise ValueError(f"method {config.method!r} is not available for {task} models; choose one of {names}.") from None
