"""Input checks where data enters training: the same for every method, ``method="student"`` included.

* :func:`check_dataset` runs once, before training, on a map-style dataset: not empty, the fields the run needs, and
  (HF ``datasets.Dataset``) every stored label and numeric array column read in full from Arrow (no image decoded).
* :class:`CheckedCollator` wraps the collate fn: every batch, streamed or not, is checked on the CPU (in the
  DataLoader workers, so no device synchronisation): required fields present, float tensors finite, labels integer
  class ids in ``[0, num_classes)``.

Label policy: ``-100`` (PyTorch's "ignore_index") is rejected like any other label outside ``[0, num_classes)``:
the distillation losses (KD, CIFD, CKD, RDM heads) read every sample's label or none, so an "ignored" sample would be
ignored by some terms and not others. Drop unlabeled samples, or use a method without labels.
Every error is a :class:`~hf_cifd.checks.DistillationInputError` naming the sample key (or the row) and the fix.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np
import torch

from ..checks import DistillationInputError

_LABELS = ("labels", "label")


def _keys(batch: dict[str, Any], rows: Sequence[int]) -> list[str]:
    keys = batch.get("sample_key")
    if isinstance(keys, (list, tuple)) and len(keys) > max(rows, default=-1):
        return [str(keys[i]) for i in rows]
    return [f"row {i} of the batch (no sample_key field)" for i in rows]


def _label_error(where: list[str], values: list[int], num_classes: int | None) -> DistillationInputError:
    bound = f"[0, {num_classes})" if num_classes else "[0, num_classes)"
    ignore = (" -100 (PyTorch's ignore_index) is not supported: every loss term reads every label, so drop unlabeled "
              "samples (or use a method without labels)." if -100 in values else "")
    return DistillationInputError(
        f"label(s) {values[:5]} outside {bound} for sample(s) {where[:5]}.{ignore} Check the label column and the "
        "student's num_classes.")


def check_batch(batch: dict[str, Any], *, num_classes: int | None = None, required: Sequence[str] = ()) -> None:
    """Raises :class:`DistillationInputError` for a missing field, a non-finite float tensor or a bad label."""
    if not batch:
        return
    missing = [k for k in required if k not in batch]
    if missing:
        raise DistillationInputError(
            f"the batch has no {missing} field(s) (it has {sorted(batch)}); samples must carry them (the image "
            "transform writes pixel_values, the label column must be named 'labels' or 'label').")
    for name, value in batch.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point() and value.numel():
            finite = torch.isfinite(value.reshape(value.shape[0], -1) if value.dim() else value.reshape(1, 1))
            if not bool(finite.all()):
                rows = (~finite.all(dim=1)).nonzero().flatten().tolist()
                raise DistillationInputError(
                    f"{name} has non-finite values (NaN/inf) for sample(s) {_keys(batch, rows)[:5]}. Fix the record or "
                    "the transform producing it (e.g. a division by a zero std), or filter such samples out.")
    for name in _LABELS:
        labels = batch.get(name)
        if not isinstance(labels, torch.Tensor):
            continue
        if labels.is_floating_point() or labels.dtype == torch.bool:
            raise DistillationInputError(f"{name} must be integer class ids, got dtype {labels.dtype}.")
        flat = labels.reshape(-1)
        bad = (flat < 0) | (flat >= num_classes) if num_classes else flat < 0
        if bool(bad.any()):
            rows = bad.nonzero().flatten().tolist()
            raise _label_error(_keys(batch, rows), flat[bad].tolist(), num_classes)


class CheckedCollator:
    """Wraps a collate fn: every batch goes through :func:`check_batch` (picklable for DataLoader workers)."""

    def __init__(self, collate_fn: Callable, *, num_classes: int | None = None, required: Sequence[str] = ()):
        self.collate_fn, self.num_classes, self.required = collate_fn, num_classes, tuple(required)

    def __call__(self, samples):
        batch = self.collate_fn(samples)
        if isinstance(batch, dict):
            check_batch(batch, num_classes=self.num_classes, required=self.required)
        return batch

    def __getattr__(self, name):  # e.g. a wrapped CachedTeacherCollator's .cache
        if name in ("collate_fn", "num_classes", "required"):
            raise AttributeError(name)
        return getattr(self.collate_fn, name)


def _arrow_numeric(feature) -> bool:
    import datasets

    if isinstance(feature, (datasets.Array2D, datasets.Array3D, datasets.Array4D, datasets.Array5D)):
        return "float" in feature.dtype
    if isinstance(feature, datasets.Value):
        return "float" in feature.dtype
    inner = getattr(feature, "feature", None)
    return inner is not None and _arrow_numeric(inner)


def check_dataset(dataset, *, num_classes: int | None = None, needs_labels: bool = False,
                  chunk: int = 4096) -> None:
    """Before training, on a map-style dataset: empty -> error; an HF ``datasets.Dataset``'s label column and float
    columns are read in full (Arrow, chunked) so that a bad row fails now, not at step N. Other datasets: the per-batch
    checks of :class:`CheckedCollator` apply."""
    if dataset is None or not hasattr(dataset, "__len__"):
        return
    if len(dataset) == 0:
        raise DistillationInputError(
            "the training dataset is empty (0 samples): check the split, the data files and any filter/max_samples.")
    import datasets

    if not isinstance(dataset, datasets.Dataset):
        return
    features = dataset.features
    labels = next((c for c in _LABELS if c in features), None)
    if needs_labels and labels is None:
        return  # the trainer's field check names the missing label column
    numeric = [c for c, f in features.items() if _arrow_numeric(f)]
    columns = ([labels] if labels else []) + numeric
    if not columns:
        return
    keys = dataset["sample_key"] if "sample_key" in features else None
    raw = dataset.with_format("numpy", columns=columns)
    for start in range(0, len(dataset), chunk):
        part = raw[start:start + chunk]
        batch: dict[str, Any] = {c: torch.as_tensor(np.asarray(part[c])) for c in columns}
        batch["sample_key"] = (list(keys[start:start + chunk]) if keys is not None
                               else [f"row {i} of the dataset" for i in range(start, start + len(batch[columns[0]]))])
        if labels and labels != "labels":
            batch["labels"] = batch.pop(labels)
        check_batch(batch, num_classes=num_classes)
