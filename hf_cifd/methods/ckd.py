"""Comparative KD (Xu et al.; github.com/alextxu/ckd) and its reduced-teacher-inference (budget) mode.

* Method ``ckd``: ``lambda_ce * CE + ckd_weight * (MSE(d_s, d_t) + MSE(d_s, d_y))`` on the logits of sample pairs
  (``d = out_i - out_j``; ``d_y`` from one-hot labels), plus ``ckd_weight * ckd_embedding_weight * MSE(d_s, d_t)``
  on the embeddings (the student's embedding mapped to the teacher's width by the container's projector / IBM
  decoder) when ``ckd_embedding_weight > 0``. The loss itself is :func:`hf_cifd.losses.comparative_kd_loss`.
* Add-on: ``ckd_addon=True`` adds the same CKD terms (named ``ckd_*``) to any other teacher method (KD, CIFD, ...).
* Pairs: every in-batch pair, or, in budget mode, the pool tuples the batch was built from (``batch["ckd_pair"]``).
* Budget mode (``teacher_call_budget=N``): :class:`TeacherCallBudget` picks N training samples (seeded), runs the
  teacher ONCE on each through the teacher-output cache (:func:`hf_cifd.data.cache.cache_teacher_outputs`) and
  trains on the N samples only, with their fresh augmentations (the dataset's transforms run again at every
  read) and the cached teacher outputs. :class:`PairPoolSampler` holds a fixed pool of up to ``ckd_pool_size``
  (100k) pairs drawn from ALL pairs of the subset, and yields both members of each pair into the same batch, so a
  pair's partner is read (and the student run on it) even though an ordinary shuffled batch would not hold it:
  the pairs are cross-batch. An epoch is one pass over the pool, as in the reference ``CKDSample`` dataset.
  The trainer counts teacher calls (``trainer.teacher_calls``, log key ``teacher_calls``) and refuses to run the
  teacher again: a run never exceeds its budget. Evaluation in budget mode reports the student's CE only.
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any, Callable, Mapping

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from .. import losses
from ..checks import DistillationInputError
from .base import Method, ce_loss, register_method

logger = logging.getLogger(__name__)

PAIR_KEY = "ckd_pair"


# ----------------------------------------------------------------------------------------------------------------
# loss terms
# ----------------------------------------------------------------------------------------------------------------


def batch_pairs(batch: Mapping[str, Any], n: int, device=None) -> torch.Tensor | None:
    """The (P, 2) row pairs of a batch: rows sharing a ``ckd_pair`` id (budget mode), else all in-batch pairs."""
    ids = batch.get(PAIR_KEY)
    if ids is not None:
        ids = torch.as_tensor(ids).to(device)
        order = torch.argsort(ids, stable=True)
        sorted_ids = ids[order]
        first = torch.nonzero(sorted_ids[1:] == sorted_ids[:-1]).flatten()
        if first.numel() == 0:
            return None
        return torch.stack([order[first], order[first + 1]], dim=1)
    if n < 2:
        return None
    return losses.all_pairs(n).to(device)


def ckd_terms(config, student, teacher, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Weighted CKD terms on logits (vs teacher and labels) and, if enabled, on the matched embeddings."""
    terms: dict[str, torch.Tensor] = {}
    ref = student.logits if student.logits is not None else next(iter(student.encoded.embeddings.values()))
    pairs = batch_pairs(batch, ref.shape[0], ref.device)
    if pairs is None or teacher is None:
        return terms
    weight = config.ckd_weight
    if student.logits is not None and teacher.logits is not None:
        labels = batch.get("labels")
        logit_terms = losses.comparative_kd_loss(student.logits, teacher.logits, pairs, labels=labels,
                                                 num_classes=student.logits.shape[-1] if labels is not None else None)
        terms.update({k: weight * v for k, v in logit_terms.items()})
    emb_weight = getattr(config, "ckd_embedding_weight", 0.0)
    if emb_weight > 0:
        multi = len(teacher.embeddings) > 1
        for modality, target in teacher.embeddings.items():
            pred = student.matched.get(modality)
            if pred is None:
                pred = student.encoded.embeddings.get(modality)
            if pred is None:
                continue
            name = f"ckd_{modality}_embedding" if multi else "ckd_embedding"
            term = losses.comparative_kd_loss(pred, target, pairs)["ckd_teacher"]
            terms[name] = weight * emb_weight * term
    return terms


@register_method
class ComparativeKD(Method):
    """Comparative KD: lambda_CE * CE + the CKD terms (see the module docstring)."""

    name = "ckd"

    def __init__(self, config):
        super().__init__(config)
        # The container maps the student embedding to the teacher's width only when the embedding term is on.
        self.matches_embeddings = getattr(config, "ckd_embedding_weight", 0.0) > 0

    def loss_terms(self, student, teacher, rdms, batch, extra):
        terms = {"ce": self.config.lambda_ce * ce_loss(self.config, student.logits, batch["labels"])}
        terms.update(ckd_terms(self.config, student, teacher, batch))
        return terms


class WithComparativeKD(Method):
    """Any method plus the CKD terms (``ckd_addon=True``)."""

    def __init__(self, inner: Method):
        super().__init__(inner.config)
        self.inner = inner
        for attr in ("name", "task", "uses_teacher", "uses_rdms", "uses_assistants", "needs_labels"):
            setattr(self, attr, getattr(inner, attr))
        self.matches_embeddings = inner.matches_embeddings or getattr(inner.config, "ckd_embedding_weight", 0.0) > 0

    def extra_modules(self, student_dims, teacher_dims):
        return self.inner.extra_modules(student_dims, teacher_dims)

    def loss_terms(self, student, teacher, rdms, batch, extra):
        terms = dict(self.inner.loss_terms(student, teacher, rdms, batch, extra))
        terms.update(ckd_terms(self.config, student, teacher, batch))
        return terms


def with_ckd_addon(method: Method, config) -> Method:
    """Wraps ``method`` with the CKD add-on when ``config.ckd_addon`` is set (no-op for ``ckd`` itself)."""
    if not getattr(config, "ckd_addon", False) or method.name == "ckd":
        return method
    if not method.uses_teacher:
        raise DistillationInputError(f"ckd_addon compares student and teacher outputs; method {method.name!r} has no teacher.")
    return WithComparativeKD(method)


def student_only_terms(config, student, batch) -> dict[str, torch.Tensor]:
    """Budget-mode evaluation: the teacher may not run on evaluation samples, so the eval loss is the CE."""
    if student.logits is None or "labels" not in batch:
        ref = next(iter(student.encoded.embeddings.values()))
        return {"ce": ref.sum() * 0.0}
    return {"ce": config.lambda_ce * ce_loss(config, student.logits, batch["labels"])}


# ----------------------------------------------------------------------------------------------------------------
# budget mode: subset, pair pool, sampler, collator
# ----------------------------------------------------------------------------------------------------------------


class BudgetSubset(Dataset):
    """The N budget samples of a map-style dataset. Index ``i`` -> sample ``indices[i]``; index ``(i, pair_id)``
    (what :class:`PairPoolSampler` yields) also tags the sample with ``ckd_pair = pair_id``. Samples without a
    ``sample_key`` get ``"idx<original index>"`` (the teacher-cache join key)."""

    def __init__(self, dataset, indices):
        self.dataset = dataset
        self.indices = [int(i) for i in indices]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, item):
        pair_id = None
        if isinstance(item, (tuple, list)):
            item, pair_id = item
        original = self.indices[int(item)]
        sample = self.dataset[original]
        if not isinstance(sample, Mapping):
            raise DistillationInputError(
                f"budget mode needs dict samples (the batch contract: pixel_values, labels, ...), got "
                f"{type(sample).__name__}.")
        sample = dict(sample)
        sample.setdefault("sample_key", f"idx{original}")
        if pair_id is not None:
            sample[PAIR_KEY] = int(pair_id)
        return sample


def build_pair_pool(n: int, pool_size: int = 100_000, seed: int = 0) -> torch.Tensor:
    """A fixed pool of distinct unordered pairs (i < j) of ``range(n)``: all ``n(n-1)/2`` pairs when they fit in
    ``pool_size``, else ``pool_size`` pairs drawn uniformly (seeded) from all of them. Shape (P, 2), row-major."""
    if n < 2:
        raise DistillationInputError(f"comparative pairs need at least 2 samples, got {n}.")
    total = n * (n - 1) // 2
    if total <= pool_size:
        return losses.all_pairs(n)
    rng = np.random.default_rng(seed)
    chosen: set[int] = set()
    while len(chosen) < pool_size:
        need = pool_size - len(chosen)
        i = rng.integers(0, n, size=2 * need)
        j = rng.integers(0, n, size=2 * need)
        keep = i != j
        lo, hi = np.minimum(i[keep], j[keep]), np.maximum(i[keep], j[keep])
        for code in (lo.astype(np.int64) * n + hi)[: 2 * need]:
            chosen.add(int(code))
            if len(chosen) == pool_size:
                break
    codes = np.array(sorted(chosen), dtype=np.int64)
    return torch.from_numpy(np.stack([codes // n, codes % n], axis=1))


class PairPoolSampler(Sampler):
    """Yields ``(index, pair_id)`` for both members of each pool pair, pair after pair, in a seeded per-epoch
    order; with an even batch size every batch holds whole pairs. One epoch = the pool, shuffled, trimmed to a
    multiple of ``pairs_per_step`` (the pairs of one global step: batch_size * world_size / 2) so that
    accelerate's per-process sharding never splits or pads a pair; a pool smaller than one step is repeated."""

    def __init__(self, pool: torch.Tensor, pairs_per_step: int = 1, seed: int = 0):
        if pairs_per_step < 1:
            raise DistillationInputError(f"pairs_per_step must be >= 1, got {pairs_per_step}.")
        self.pool = pool.long()
        self.pairs_per_step = int(pairs_per_step)
        self.seed = int(seed)
        self.epoch = 0
        p = len(self.pool)
        self.pairs_per_epoch = max(p - p % self.pairs_per_step, self.pairs_per_step)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def epoch_pairs(self, epoch: int | None = None) -> torch.Tensor:
        """The (pairs_per_epoch, 2) pairs of an epoch, in order."""
        epoch = self.epoch if epoch is None else epoch
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        reps = math.ceil(self.pairs_per_epoch / len(self.pool))
        order = torch.cat([torch.randperm(len(self.pool), generator=g) for _ in range(reps)])[: self.pairs_per_epoch]
        return self.pool[order]

    def __iter__(self):
        base = self.epoch * self.pairs_per_epoch
        for k, (i, j) in enumerate(self.epoch_pairs().tolist()):
            yield (i, base + k)
            yield (j, base + k)

    def __len__(self) -> int:
        return 2 * self.pairs_per_epoch


class BudgetCollator:
    """Training batches (samples tagged with ``ckd_pair``) are joined with the budget cache; evaluation batches
    are collated as usual (the teacher never sees them)."""

    def __init__(self, cache, collate_fn: Callable):
        from ..data.cache import CachedTeacherCollator

        self.base = collate_fn
        self.cached = CachedTeacherCollator(cache, collate_fn)

    def __call__(self, samples):
        if samples and isinstance(samples[0], Mapping) and PAIR_KEY in samples[0]:
            return self.cached(samples)
        return self.base(samples)


class TeacherCallBudget:
    """Budget mode state: the subset indices, the pool and sampler, the cache. Built from the config by the trainer
    (checks run before anything expensive: a budget larger than the dataset is an error)."""

    def __init__(self, config, train_dataset):
        n = int(config.teacher_call_budget)
        if train_dataset is None or not (hasattr(train_dataset, "__len__") and hasattr(train_dataset, "__getitem__")):
            raise DistillationInputError(
                "teacher_call_budget needs a map-style training dataset (with __len__ and __getitem__): the N budget "
                "samples are picked from it and re-read with fresh augmentations every epoch.")
        size = len(train_dataset)
        if n > size:
            raise DistillationInputError(
                f"teacher_call_budget={n} is larger than the training dataset ({size} samples): the teacher runs at "
                f"most once per sample. Use a budget <= {size}.")
        if n < 2:
            raise DistillationInputError(f"teacher_call_budget must be >= 2 (CKD compares pairs), got {n}.")
        if config.per_device_train_batch_size % 2:
            raise DistillationInputError(
                f"budget mode builds batches from whole pairs: per_device_train_batch_size must be even, got "
                f"{config.per_device_train_batch_size}.")
        self.budget = n
        self.seed = config.ckd_seed if config.ckd_seed is not None else config.seed
        rng = np.random.default_rng(self.seed)
        self.indices = np.sort(rng.choice(size, size=n, replace=False)).tolist()
        self.dataset = BudgetSubset(train_dataset, self.indices)
        self.pool = build_pair_pool(n, config.ckd_pool_size, self.seed)
        self.pool_size = config.ckd_pool_size
        self.cache = None
        self.cache_dir = os.path.join(config.output_dir, f"teacher_budget_cache-n{n}-seed{self.seed}")

    def sampler(self, per_device_batch_size: int, world_size: int) -> PairPoolSampler:
        return PairPoolSampler(self.pool, per_device_batch_size * world_size // 2, self.seed)

    def run_teacher(self, teacher, adapter, collate_fn, accelerator, batch_size: int) -> int:
        """Runs the teacher once on each budget sample into the cache; returns this process's share of the calls
        (the whole count on the main process, 0 elsewhere, so that the logged sum is the true total)."""
        from ..data.cache import TeacherCache, cache_teacher_outputs

        report = cache_teacher_outputs(teacher, self.dataset, self.cache_dir, adapter=adapter, collate_fn=collate_fn,
                                       batch_size=batch_size, dtype="float32", accelerator=accelerator, progress=False)
        self.cache = TeacherCache(self.cache_dir)
        if len(self.cache) != self.budget:
            raise DistillationInputError(
                f"the budget cache {self.cache_dir} holds {len(self.cache)} samples, not the {self.budget} budget "
                "samples: it was written by another run; delete it or use another output_dir.")
        if report.teacher_calls > self.budget:  # impossible by construction; a hard stop all the same
            raise DistillationInputError(f"the teacher ran {report.teacher_calls} times, over the budget {self.budget}.")
        logger.info("teacher_call_budget: %d samples, %d teacher calls, %d pool pairs", self.budget,
                    report.teacher_calls, len(self.pool))
        return report.teacher_calls if accelerator is None or accelerator.is_main_process else 0

    def collator(self, collate_fn: Callable) -> BudgetCollator:
        return BudgetCollator(self.cache, collate_fn)
