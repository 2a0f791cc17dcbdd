"""Outputs of frozen RDMs for every sample of a teacher-output cache, computed once before training.

While a student trains, its RDMs are frozen and in eval mode (the bottleneck rounds, no noise): their outputs are a
deterministic function of the teacher embedding. With a teacher-output cache that embedding is fixed per sample, so
recomputing 3 RDM forwards every step repeats the same work each epoch; for small students it costs more than the
student itself. :func:`compute_rdm_outputs` runs each RDM once over the cache and stores, per RDM, the reconstruction
(and logits) in row order of the teacher cache, as ``.npy`` files read by memory map (page cache, not process memory,
holds them at ImageNet scale). :class:`CachedRDMCollator` adds them to each batch as ``rdm_<modality>_<n>_embedding``
/ ``rdm_<modality>_<n>_logits``, which the trainer reads instead of running the RDMs.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from ..checks import DistillationInputError
from .cache import TeacherCache

_TEACHER_EMBEDDING = "teacher_{}_embedding"


def rdm_field(modality: str, index: int, kind: str) -> str:
    """Batch field of RDM ``index`` of ``modality``: kind "embedding" (X^) or "logits"."""
    return f"rdm_{modality}_{index}_{kind}"


class RDMOutputTable:
    """Per-RDM outputs aligned with a :class:`TeacherCache`'s rows; picklable (DataLoader workers reopen the files)."""

    def __init__(self, cache: TeacherCache, directory: str, fields: Sequence[str]):
        self.cache, self.directory, self.fields = cache, directory, list(fields)
        self._arrays: dict[str, np.ndarray] | None = None

    def __getstate__(self):
        return {"cache": self.cache, "directory": self.directory, "fields": self.fields}

    def __setstate__(self, state):
        self.__init__(state["cache"], state["directory"], state["fields"])

    def _open(self) -> dict[str, np.ndarray]:
        if self._arrays is None:
            self._arrays = {f: np.load(os.path.join(self.directory, f + ".npy"), mmap_mode="r") for f in self.fields}
        return self._arrays

    def get(self, keys: Sequence[str]) -> dict[str, torch.Tensor]:
        rows, missing = self.cache._lookup(list(keys))
        if missing:
            raise self.cache._missing_error(missing, len(keys))
        return {f: torch.from_numpy(np.ascontiguousarray(a[rows])) for f, a in self._open().items()}


@torch.no_grad()
def compute_rdm_outputs(
    rdms: Mapping[str, Sequence[nn.Module]],
    cache: TeacherCache,
    directory: str,
    *,
    device: torch.device | str = "cpu",
    batch_size: int = 1024,
    context: Callable[[], Any] = contextlib.nullcontext,
) -> RDMOutputTable:
    """Runs every RDM (as it is: call ``.eval()`` first) once over the cached teacher embeddings, in the teacher
    cache's row order, and writes ``<field>.npy`` (float32) under ``directory``. ``context`` wraps each forward (the
    trainer passes its autocast context, so the values equal those of the per-step path)."""
    keys, n = cache.keys, len(cache)
    writers: dict[str, np.ndarray] = {}
    for start in range(0, n, batch_size):
        chunk = keys[start:start + batch_size]
        for modality, modules in rdms.items():
            name = _TEACHER_EMBEDDING.format(modality)
            if name not in cache.fields:
                raise DistillationInputError(
                    f"the teacher cache {cache.path} has no {name!r} for the {modality} RDMs; its fields: "
                    f"{sorted(cache.fields)}.")
            x = cache.get(chunk, [name])[name].to(device)
            for i, rdm in enumerate(modules):
                with context():
                    out = rdm(x, with_rate=False)
                for kind, value in (("embedding", out.embedding), ("logits", out.logits)):
                    if value is None:
                        continue
                    field = rdm_field(modality, i, kind)
                    if field not in writers:
                        writers[field] = np.lib.format.open_memmap(
                            os.path.join(directory, field + ".npy"), mode="w+", dtype=np.float32,
                            shape=(n, value.shape[-1]))
                    writers[field][start:start + len(chunk)] = value.float().cpu().numpy()
    for array in writers.values():
        array.flush()
    return RDMOutputTable(cache, directory, sorted(writers))


class CachedRDMCollator:
    """Wraps a collate fn that yields ``sample_key`` (e.g. :class:`CachedTeacherCollator`): adds each RDM's cached
    outputs to the batch."""

    def __init__(self, table: RDMOutputTable, collate_fn: Callable):
        self.table, self.collate_fn = table, collate_fn

    def __call__(self, samples):
        batch = self.collate_fn(samples)
        batch.update(self.table.get(batch["sample_key"]))
        return batch


def cached_rdm_outputs(batch: Mapping[str, Any], rdms: Mapping[str, Sequence[nn.Module]]) -> dict[str, list] | None:
    """``{modality: [RDMOutput, ...]}`` from the fields :class:`CachedRDMCollator` put in ``batch``; None when absent.
    Cached outputs carry no rate and no latent (the student loss reads neither); an RDM without reconstruction has
    logits only."""
    from ..modules import RDMOutput

    def cached(m: str) -> bool:
        return rdm_field(m, 0, "embedding") in batch or rdm_field(m, 0, "logits") in batch

    if not any(mods for mods in rdms.values()) or any(mods and not cached(m) for m, mods in rdms.items()):
        return None
    return {m: [RDMOutput(embedding=batch.get(rdm_field(m, i, "embedding")), rate=None, latent=None,
                          logits=batch.get(rdm_field(m, i, "logits"))) for i in range(len(mods))]
            for m, mods in rdms.items()}


def temporary_rdm_cache_dir() -> tempfile.TemporaryDirectory:
    """Where a run keeps its RDM outputs (deleted with the returned object; honours ``TMPDIR``)."""
    return tempfile.TemporaryDirectory(prefix="hf_cifd_rdm_outputs_")
