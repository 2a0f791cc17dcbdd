"""transformers image-classification models (``AutoModelForImageClassification``)."""

from __future__ import annotations

from torch import nn

from .base import Encoded, ModelAdapter, register_adapter


@register_adapter
class TransformersAdapter(ModelAdapter):
    library = "transformers"
    spec_prefix = "hf"

    @staticmethod
    def load(name, pretrained=False, num_classes=None, *, image_size=None):
        """``AutoModelForImageClassification`` from a Hub id or directory: its weights (``pretrained``; a new head
        when ``num_classes`` differs) or its config with random init. ``image_size`` sets ``config.image_size``
        (models that have one, e.g. ViT)."""
        from transformers import AutoConfig, AutoModelForImageClassification

        kwargs = {} if num_classes is None else {"num_labels": num_classes}
        if image_size:
            kwargs["image_size"] = image_size
        if pretrained:
            return AutoModelForImageClassification.from_pretrained(name, ignore_mismatched_sizes=True, **kwargs)
        return AutoModelForImageClassification.from_config(AutoConfig.from_pretrained(name, **kwargs))

    @staticmethod
    def matches(model: nn.Module) -> bool:
        from transformers import PreTrainedModel

        return isinstance(model, PreTrainedModel) and hasattr(model, "classifier") and hasattr(model, "config")

    def _hidden(self, model) -> int:
        head = model.classifier
        linear = head if isinstance(head, nn.Linear) else next(m for m in head.modules() if isinstance(m, nn.Linear))
        return linear.in_features

    def embedding_dims(self, model):
        return {"image": self._hidden(model)}

    def num_classes(self, model):
        return model.config.num_labels

    def encode(self, model, batch, prefix=""):
        x = self.inputs(batch, "pixel_values", prefix)
        # The pooled features the classifier sees: base model output -> pooler_output (CNNs, ViT-with-pooling)
        # or the CLS token (ViT-style models whose head reads sequence_output[:, 0]).
        base = getattr(model, model.base_model_prefix)
        out = base(pixel_values=x)
        pooled = getattr(out, "pooler_output", None)
        if pooled is None:
            pooled = out.last_hidden_state[:, 0]
        pooled = pooled.flatten(1)
        return Encoded(embeddings={"image": pooled}, logits=self.head(model, pooled))

    def head(self, model, embedding):
        return model.classifier(embedding)

    def save(self, model, output_dir):
        model.save_pretrained(output_dir, safe_serialization=True)
