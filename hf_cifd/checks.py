"""Input checks shared by modules, losses and the trainer.

Every check raises :class:`DistillationInputError` (a ``ValueError``) whose message names the problem and
the fix, so that bad input fails before expensive work starts.
"""

from __future__ import annotations

import math
from typing import Mapping
import os

import torch


class DistillationInputError(ValueError):
    """Bad input to hf_cifd: the message says what is wrong and how to fix it."""


class NonFiniteLossError(FloatingPointError):
    """A training step produced a non-finite loss term (``nonfinite_policy="stop"``); the message names it."""


def check_positive(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise DistillationInputError(f"{name} must be a finite number > 0, got {value!r}.")


def check_probability(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and 0.0 <= value < 1.0):
        raise DistillationInputError(f"{name} must be in [0, 1), got {value!r}.")


def check_finite(name: str, tensor: torch.Tensor) -> None:
    if not torch.isfinite(tensor).all():
        bad = (~torch.isfinite(tensor)).sum().item()
        raise DistillationInputError(
            f"{name} contains {bad} non-finite value(s) (NaN or inf). Check the data pipeline and the "
            "model producing it (e.g. a diverged teacher, fp16 overflow, a corrupt cache shard)."
        )


def check_all_finite(tensors: Mapping[str, torch.Tensor | None]) -> None:
    """:func:`check_finite` of several tensors in one reduction (a loss with 8 inputs: ~30 small ops instead of ~130);
    the error names the first non-finite tensor in the mapping's order. Non-tensors are left to the shape checks."""
    present = [(name, t) for name, t in tensors.items() if isinstance(t, torch.Tensor)]
    if not present:
        return
    if len({t.device for _, t in present}) == 1 and torch.isfinite(
            torch.cat([t.detach().reshape(-1) for _, t in present])).all():
        return
    for name, t in present:
        check_finite(name, t)


def check_width(name: str, tensor: torch.Tensor, expected: int, hint: str = "") -> None:
    if tensor.dim() < 2 or tensor.shape[-1] != expected:
        raise DistillationInputError(
            f"{name} must have shape (batch, {expected}), got {tuple(tensor.shape)}. {hint}".rstrip()
        )


def check_same_batch(**tensors: torch.Tensor | None) -> None:
    sizes = {name: t.shape[0] for name, t in tensors.items() if t is not None}
    if len(set(sizes.values())) > 1:
        listed = ", ".join(f"{n}={s}" for n, s in sizes.items())
        raise DistillationInputError(
            f"batch sizes differ ({listed}); teacher, student and label tensors must describe the same "
            "samples in the same order."
        )


def check_labels(labels: torch.Tensor, num_classes: int) -> None:
    if labels.dtype in (torch.float16, torch.float32, torch.float64, torch.bfloat16):
        raise DistillationInputError(f"labels must be integer class ids, got dtype {labels.dtype}.")
    if labels.numel() and (labels.min().item() < 0 or labels.max().item() >= num_classes):
        raise DistillationInputError(
            f"labels must lie in [0, {num_classes - 1}] for {num_classes} classes, got values in "
            f"[{labels.min().item()}, {labels.max().item()}]. Check the label column or num_classes."
        )


def check_world_size(num_processes: int) -> None:
    """Stops a process started as one of several (``WORLD_SIZE`` > 1, set by torchrun / accelerate launch) whose
    accelerator sees a single process: each would silently train its own copy of the run."""
    launched = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if launched > 1 and num_processes == 1:
        raise DistillationInputError(
            f"this process was started as one of WORLD_SIZE={launched} processes, but its accelerator sees a single "
            "process, so every process would train its own independent copy of the run. On a machine without GPUs, "
            "set ACCELERATE_USE_CPU=1 in the launch environment (or use_cpu=True / --use_cpu) so that the processes "
            "join over gloo; with GPUs, check that each process sees its GPU (CUDA_VISIBLE_DEVICES)."
        )
