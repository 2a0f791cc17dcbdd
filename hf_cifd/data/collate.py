"""Collation into the batch contract (see :mod:`hf_cifd.adapters.base`).

Samples are dicts produced by :class:`hf_cifd.data.loading.RecordProcessor` (or any dataset following the contract).
``None`` samples (bad records of a map-style dataset) are dropped. Keys starting with ``_`` are stream metadata
(worker id, stream position, bad-record counters); they are folded into one ``batch["stream_state"]`` entry
``{worker_id: {"pos": int, "counts": {...}}}`` holding, per DataLoader worker, the latest values seen in this
batch. :class:`hf_cifd.data.stats.StreamTracker` consumes it in the main process (counting and resumption).
"""

from __future__ import annotations

import numbers
from typing import Any, Sequence

import torch

from ..checks import DistillationInputError

STREAM_STATE_KEY = "stream_state"


def _stack(key: str, values: list[Any]) -> Any:
    first = values[0]
    if isinstance(first, torch.Tensor):
        shapes = {tuple(v.shape) for v in values}
        if len(shapes) > 1:
            raise DistillationInputError(
                f"samples have different shapes under {key!r}: {sorted(shapes)[:4]}. The transforms must produce a "
                "fixed size (e.g. Resize + CenterCrop / RandomResizedCrop) and tokenizers a fixed context length."
            )
        return torch.stack(values)
    if isinstance(first, str):
        return list(values)
    if isinstance(first, bool) or isinstance(first, numbers.Integral):
        return torch.tensor(values, dtype=torch.long)
    if isinstance(first, numbers.Real):
        return torch.tensor(values, dtype=torch.float32)
    if isinstance(first, (list, tuple)) and first and isinstance(first[0], numbers.Integral):
        return torch.tensor(values, dtype=torch.long)
    return list(values)


def collate(samples: Sequence[dict[str, Any] | None]) -> dict[str, Any]:
    """Stacks tensors, turns ints into a long tensor, keeps strings (``sample_key``, ``text``) as lists."""
    stream_state: dict[int, dict[str, Any]] = {}
    kept = []
    for s in samples:
        if s is None:
            continue
        if "_worker" in s:
            stream_state[int(s["_worker"])] = {"pos": int(s["_pos"]), "counts": dict(s["_counts"])}
        kept.append(s)
    batch: dict[str, Any] = {}
    if kept:
        keys = [k for k in kept[0] if not k.startswith("_")]
        for key in keys:
            try:
                values = [s[key] for s in kept]
            except KeyError:
                raise DistillationInputError(
                    f"some samples lack {key!r} (present in the first sample of the batch); every sample must "
                    "carry the same keys."
                ) from None
            batch[key] = _stack(key, values)
    if "label" in batch and "labels" not in batch:  # HF datasets' usual column name; the batch contract's is labels
        batch["labels"] = batch.pop("label")
    if stream_state:
        batch[STREAM_STATE_KEY] = stream_state
    return batch


def drop_stream_state(batch: dict[str, Any]) -> dict[str, Any]:
    """Removes the stream metadata (e.g. before calling a model with ``**batch``)."""
    batch.pop(STREAM_STATE_KEY, None)
    return batch
