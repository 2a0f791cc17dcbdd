"""timm classifiers: embedding = forward_head(forward_features(x), pre_logits=True)."""

from __future__ import annotations

import torch
from torch import nn

from .base import Encoded, ModelAdapter, register_adapter


@register_adapter
class TimmAdapter(ModelAdapter):
    library = "timm"
    spec_prefix = "timm"

    @staticmethod
    def load(name, pretrained=False, num_classes=None, *, image_size=None, in_channels=None):
        """``timm.create_model(name, ...)``; ``name`` may carry a pretrained tag ("resnet34.a1_in1k") or be
        "hf-hub:org/repo" / "local-dir:PATH". ``image_size`` overlays ``input_size`` (and crop_pct 1) on the
        pretrained_cfg, so the data config, the transforms and the exported config.json all use it."""
        import timm

        kwargs = {} if num_classes is None else {"num_classes": num_classes}
        if in_channels is not None:
            kwargs["in_chans"] = in_channels  # timm adapts pretrained stem weights to the channel count
        if image_size:
            c = in_channels or 3
            kwargs["pretrained_cfg_overlay"] = {"input_size": (c, image_size, image_size), "crop_pct": 1.0,
                                                "test_input_size": (c, image_size, image_size), "test_crop_pct": 1.0}
        return timm.create_model(name, pretrained=pretrained, **kwargs)

    @staticmethod
    def matches(model: nn.Module) -> bool:
        return hasattr(model, "forward_features") and hasattr(model, "forward_head") and hasattr(model, "pretrained_cfg")

    def embedding_dims(self, model):
        return {"image": model.num_features}

    def num_classes(self, model):
        return model.num_classes or None

    def encode(self, model, batch, prefix=""):
        x = self.inputs(batch, "pixel_values", prefix)
        embedding = model.forward_head(model.forward_features(x), pre_logits=True)
        return Encoded(embeddings={"image": embedding}, logits=self.head(model, embedding))

    def head(self, model, embedding: torch.Tensor):
        return model.get_classifier()(embedding)

    def image_transform(self, model, train):
        from timm.data import create_transform, resolve_model_data_config

        return create_transform(**resolve_model_data_config(model), is_training=train)

    def save(self, model, output_dir):
        from timm.models import save_for_hf

        # config.json (architecture, num_classes, pretrained_cfg) + model.safetensors: timm's Hub format,
        # loadable with timm.create_model("local-dir:<dir>", pretrained=True) or "hf-hub:<repo>" after upload.
        save_for_hf(model, output_dir, safe_serialization=True)
