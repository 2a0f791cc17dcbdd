"""Getting the teacher's outputs for a batch: from cached fields when the batch has them, else by running the
frozen teacher once (no grad), counting every sample it sees."""

from __future__ import annotations

import contextlib
from typing import Any, Mapping

import torch
from torch import nn

from .adapters import Encoded, ModelAdapter, adapter_for
from .checks import DistillationInputError

_PREFIX, _SUFFIX = "teacher_", "_embedding"


def embedding_fields(fields: Mapping[str, Any]) -> dict[str, Any]:
    """``{"teacher_image_embedding": v, "teacher_logits": w}`` -> ``{"image": v}``: the per-modality embedding entries
    of a batch or of a cache's field widths."""
    return {k[len(_PREFIX):-len(_SUFFIX)]: v for k, v in fields.items() if k.startswith(_PREFIX) and k.endswith(_SUFFIX)}


def cached_teacher_outputs(batch: Mapping[str, Any]) -> Encoded | None:
    """The ``teacher_<m>_embedding`` / ``teacher_logits`` fields a teacher-output cache put in the batch."""
    embeddings = embedding_fields(batch)
    if not embeddings:
        return None
    return Encoded(embeddings=embeddings, logits=batch.get("teacher_logits"), logit_scale=batch.get("teacher_logit_scale"))


class TeacherRunner:
    """Calls a frozen teacher through its adapter; ``calls`` counts the samples it was run on (this process)."""

    def __init__(self, model: nn.Module | None, adapter: ModelAdapter | None = None):
        self.model = model
        self.adapter = adapter or (adapter_for(model) if model is not None else None)
        self.calls = 0

    def _precision(self):
        """Autocast to a half-precision teacher's dtype (casts the float inputs the adapter feeds it), else nothing."""
        param = next((p for p in self.model.parameters() if p.is_floating_point()), None)
        if param is None or param.dtype not in (torch.bfloat16, torch.float16):
            return contextlib.nullcontext()
        return torch.autocast(param.device.type, dtype=param.dtype)

    def __call__(self, batch: Mapping[str, Any]) -> Encoded:
        cached = cached_teacher_outputs(batch)
        if cached is not None:
            return cached
        if self.model is None:
            raise DistillationInputError(
                "the batch has no cached teacher outputs and no teacher model was given: pass the teacher, or a "
                "teacher-output cache that covers every sample."
            )
        with torch.no_grad(), self._precision():
            out = self.adapter.encode(self.model, batch, prefix=_PREFIX)
        self.calls += next(iter(out.embeddings.values())).shape[0]
        return out
