"""Models by id: ``"<library>:<name>"`` -> a model created by that library's adapter (``<Adapter>.load``).

==================================  =================================================================================
``timm:<name>``                     ``timm.create_model`` (``resnet34.a1_in1k``, ``hf-hub:org/repo``, ``local-dir:PATH``)
``hf:<hub id or dir>``              ``AutoModelForImageClassification`` (+ its ``AutoImageProcessor`` for transforms)
``open_clip:<name>[@<tag>]``        ``open_clip.create_model_and_transforms`` (``ViT-L-14@openai``, ``local-dir:PATH``)
``cnn:<Table 8 name or dir>``       :class:`hf_cifd.models.SimpleCNN` (``cnn10`` random init, or a trained directory)
==================================  =================================================================================
"""

from __future__ import annotations

from torch import nn

from ..checks import DistillationInputError


def _loaders() -> dict[str, type]:
    from . import OpenCLIPAdapter, PlainAdapter, TimmAdapter, TransformersAdapter

    return {cls.spec_prefix: cls for cls in (TimmAdapter, TransformersAdapter, OpenCLIPAdapter, PlainAdapter)}


SPEC_PREFIXES = ("timm", "hf", "open_clip", "cnn")


def split_spec(spec: str) -> tuple[str, str]:
    """``("timm", "resnet34.a1_in1k")`` from ``"timm:resnet34.a1_in1k"``; a clear error for anything else."""
    prefix, sep, name = str(spec).partition(":")
    if not sep or prefix not in SPEC_PREFIXES or not name:
        raise DistillationInputError(
            f"model spec {spec!r} must be '<library>:<name>' with library one of {SPEC_PREFIXES}, e.g. "
            "'timm:resnet34.a1_in1k', 'hf:microsoft/resnet-18', 'open_clip:ViT-L-14@openai', 'cnn:cnn10' or "
            "'cnn:/path/to/trained_cnn'.")
    return prefix, name


def load_model(spec: str, num_classes: int | None = None, pretrained: bool = False,
               image_size: int | None = None, in_channels: int | None = None) -> nn.Module:
    """The model named by ``spec`` (see the module docstring), created by its library's adapter; ``in_channels``
    (default: the model's own, 3 for RGB) e.g. 1 for grayscale inputs such as Fashion-MNIST."""
    prefix, name = split_spec(spec)
    return _loaders()[prefix].load(name, pretrained=pretrained, num_classes=num_classes, image_size=image_size,
                                   in_channels=in_channels)


__all__ = ["SPEC_PREFIXES", "load_model", "split_spec"]
