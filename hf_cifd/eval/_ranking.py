"""Shared ranking core for zero-shot accuracy and retrieval recall (internal).

Every metric in :mod:`hf_cifd.eval` reduces to "at which position does the correct candidate land when the
candidates are sorted by score?". Ranks here come from a *stable* descending sort: a candidate is placed
after every candidate with a strictly higher score and after every candidate with the *same* score and a
lower index. Ties are therefore resolved deterministically (lower index first), which is what
``torch.topk``/``argmax`` do in practice, so the numbers agree with open_clip and clip_benchmark, and two
runs never disagree because of tie order.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from hf_cifd.checks import DistillationInputError, check_finite

#: rows of a score matrix processed at once (bounds memory for e.g. 25k x 5k COCO similarities).
CHUNK_ROWS = 1024


def as_tensor(name: str, value, *, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Convert a list / numpy array / tensor to a CPU tensor, with a clear error if that is impossible."""
    if isinstance(value, torch.Tensor):
        t = value.detach()
    else:
        try:
            if isinstance(value, np.ndarray) and value.dtype == object:
                value = np.stack([np.asarray(v) for v in value]) if len(value) else np.zeros((0,))
            t = torch.as_tensor(np.asarray(value))
        except (TypeError, ValueError) as err:
            raise DistillationInputError(
                f"{name} must be a tensor, numpy array or (nested) list of numbers with a regular shape; "
                f"could not convert it ({err})."
            ) from err
    t = t.cpu()
    if dtype is not None:
        t = t.to(dtype)
    return t


def as_index_tensor(name: str, value) -> torch.Tensor:
    """A 1-D int64 tensor of ids; floats (e.g. a float label column) are rejected, not truncated."""
    t = as_tensor(name, value)
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise DistillationInputError(f"{name} must hold integer ids, got dtype {t.dtype}.")
    if t.dim() != 1:
        raise DistillationInputError(f"{name} must be 1-D (one id per sample), got shape {tuple(t.shape)}.")
    return t.long()


def check_ks(name: str, ks: Sequence[int]) -> tuple[int, ...]:
    if isinstance(ks, int):
        ks = (ks,)
    ks = tuple(ks)
    if not ks or not all(isinstance(k, (int, np.integer)) and not isinstance(k, bool) and k >= 1 for k in ks):
        raise DistillationInputError(f"{name} must be a non-empty sequence of integers >= 1, got {ks!r}.")
    return tuple(int(k) for k in ks)


def l2_normalize(name: str, x: torch.Tensor) -> torch.Tensor:
    """Row-wise L2 normalisation in float32; a zero row is an error (it would become NaN, or tie everything)."""
    x = x.float()
    check_finite(name, x)
    norms = x.norm(dim=-1, keepdim=True)
    zero = (norms.squeeze(-1) == 0).nonzero().flatten()
    if zero.numel():
        raise DistillationInputError(
            f"{name} has {zero.numel()} all-zero row(s) (first at index {zero[0].item()}); an all-zero "
            "embedding cannot be normalised. Check the encoder output for those samples."
        )
    return x / norms


def stable_rank(scores: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """0-based position of column ``target[i]`` in row ``i`` of ``scores`` under a stable descending sort.

    ``scores`` is (B, M), ``target`` is (B,) int64. Rank 0 means "first"; "top-k hit" is ``rank < k``.
    """
    s = scores.gather(1, target[:, None])
    higher = (scores > s).sum(dim=1)
    cols = torch.arange(scores.shape[1], device=scores.device)
    tied_before = ((scores == s) & (cols[None, :] < target[:, None])).sum(dim=1)
    return higher + tied_before


def best_positive_rank(scores: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """Rank (as in :func:`stable_rank`) of the best-placed positive column of each row.

    ``positive`` is a (B, M) bool mask with at least one True per row (the caller checks that). The
    best-placed positive is the highest-scoring one (the lowest index among equal scores), i.e. the first
    positive met when walking down the sorted list, so "any positive in the top k" is ``rank < k``.
    """
    masked = scores.masked_fill(~positive, float("-inf"))
    target = masked.argmax(dim=1)  # first maximal index on ties
    return stable_rank(scores, target)


def recall_percent(ranks: torch.Tensor, ks: Sequence[int]) -> dict[int, float]:
    """Percentage of ranks < k for each k (k larger than the candidate count simply gives 100%)."""
    n = ranks.numel()
    return {k: 100.0 * (ranks < k).sum().item() / n for k in ks}
