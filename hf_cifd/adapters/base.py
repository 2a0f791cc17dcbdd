"""The common interface between the trainer and a model library.

An adapter is a stateless "how to call this kind of model" object: every method takes the model as its first
argument, so the trainer can call it on the (possibly DDP / DeepSpeed wrapped) module it owns.

Batch contract (what data collators produce and the trainer consumes):

==========================  ===========================================================================
``pixel_values``            student image inputs, (N, 3, H, W)
``teacher_pixel_values``    teacher image inputs when the teacher's transform differs (else pixel_values)
``input_ids``               student token ids (CLIP), (N, L)
``teacher_input_ids``       teacher token ids (CLIP), when the teacher's tokenizer differs
``labels``                  class ids (classification), (N,)
``sample_key``              list of N strings identifying the samples (teacher-output cache join key)
``teacher_<m>_embedding``   cached teacher embedding of modality m ("image", "text"), (N, D)
``teacher_logits``          cached teacher logits (classification), (N, C)
==========================  ===========================================================================
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch
from torch import nn

from ..checks import DistillationInputError


@dataclass
class Encoded:
    """What a model produced for a batch: one embedding per modality, plus logits / a CLIP logit scale."""

    embeddings: dict[str, torch.Tensor]
    logits: torch.Tensor | None = None
    logit_scale: torch.Tensor | None = None
    extras: dict[str, Any] = field(default_factory=dict)


class ModelAdapter:
    """Base class. ``task`` is "classification" or "clip"; ``modalities`` names the embeddings it produces."""

    task: str = "classification"
    modalities: tuple[str, ...] = ("image",)
    library: str = "torch"
    spec_prefix: str | None = None  # "<prefix>:<name>" model specs this adapter's ``load`` creates (hf_cifd.pipeline)

    @staticmethod
    def matches(model: nn.Module) -> bool:
        raise NotImplementedError

    @staticmethod
    def load(name: str, pretrained: bool = False, num_classes: int | None = None, *,
             image_size: int | None = None, in_channels: int | None = None) -> nn.Module:
        """Creates a classifier of this library: ``name`` as the library spells it, ``pretrained`` weights or random
        init, a head of ``num_classes`` classes, ``image_size`` overriding the model's input resolution (and hence
        its transforms) where the library allows it, ``in_channels`` the input channels (None: the model's own)."""
        raise NotImplementedError

    def embedding_dims(self, model: nn.Module) -> dict[str, int]:
        raise NotImplementedError

    def num_classes(self, model: nn.Module) -> int | None:
        return None

    def encode(self, model: nn.Module, batch: Mapping[str, Any], prefix: str = "") -> Encoded:
        """Runs the model on its inputs in ``batch`` (keys with ``prefix``, e.g. "teacher_", first)."""
        raise NotImplementedError

    def head(self, model: nn.Module, embedding: torch.Tensor) -> torch.Tensor | None:
        """Logits from an embedding (used to feed the IBM's noisy embedding to the classifier), or None when
        the model cannot be split there."""
        return None

    def image_transform(self, model: nn.Module, train: bool) -> Callable:
        """PIL image -> input tensor, as the model's library prescribes (train: with augmentation)."""
        raise NotImplementedError(f"{type(self).__name__} has no image transform: pass transforms explicitly.")

    def save(self, model: nn.Module, output_dir: str) -> None:
        """Writes the model in its own library's format (loadable without hf_cifd)."""
        raise NotImplementedError

    def prepare_for_deepspeed(self, model: nn.Module) -> None:
        """Makes ``model`` acceptable to a DeepSpeed engine, in place. DeepSpeed 0.19 cannot hold 0-dim parameters;
        adapters whose library only uses them in broadcasting operations hold them as shape (1,) (and restore shape
        () on export); here they are refused by name."""
        scalars = [n for n, p in model.named_parameters() if p.dim() == 0]
        if scalars:
            raise DistillationInputError(
                f"DeepSpeed cannot train a model with 0-dim parameters ({', '.join(scalars)} of {type(model).__name__}):"
                " reshape them to (1,) before training, or train without DeepSpeed (DDP).")

    @staticmethod
    def inputs(batch: Mapping[str, Any], name: str, prefix: str = "") -> Any:
        """``batch[prefix + name]`` if present, else ``batch[name]`` (teacher and student share inputs)."""
        if prefix and prefix + name in batch:
            return batch[prefix + name]
        if name not in batch:
            raise KeyError(f"the batch has no {name!r} (keys: {sorted(batch)}); check the data collator.")
        return batch[name]


_REGISTRY: list[type[ModelAdapter]] = []


def register_adapter(cls: type[ModelAdapter]) -> type[ModelAdapter]:
    _REGISTRY.append(cls)
    return cls


def adapter_for(model: nn.Module) -> ModelAdapter:
    """Picks the adapter for ``model`` (timm, transformers, open_clip, or a plain module)."""
    for cls in _REGISTRY:
        if cls.matches(model):
            return cls()
    if isinstance(model, nn.Module):
        from .plain import PlainAdapter

        return PlainAdapter()
    raise TypeError(
        f"no adapter knows {type(model).__name__}: pass a timm model, a transformers image-classification "
        "model, an open_clip model, or an nn.Module returning (embedding, logits) (see hf_cifd.adapters)."
    )
