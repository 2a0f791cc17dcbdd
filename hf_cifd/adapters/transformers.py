"""transformers image-classification models (``AutoModelForImageClassification``)."""

from __future__ import annotations

from torch import nn

from .base import Encoded, ModelAdapter, register_adapter


@register_adapter
class TransformersAdapter(ModelAdapter):
    library = "transformers"
    spec_prefix = "hf"

    @staticmethod
    def load(name, pretrained=False, num_classes=None, *, image_size=None, in_channels=None):
        """``AutoModelForImageClassification`` from a Hub id or directory: its weights (``pretrained``; a new head
        when ``num_classes`` differs) or its config with random init. ``image_size`` sets ``config.image_size``
        (models that have one, e.g. ViT)."""
        from transformers import AutoConfig, AutoImageProcessor, AutoModelForImageClassification

        kwargs = {} if num_classes is None else {"num_labels": num_classes}
        if image_size:
            kwargs["image_size"] = image_size
        if in_channels is not None:
            kwargs["num_channels"] = in_channels
        if pretrained:
            model = AutoModelForImageClassification.from_pretrained(name, ignore_mismatched_sizes=True, **kwargs)
        else:
            model = AutoModelForImageClassification.from_config(AutoConfig.from_pretrained(name, **kwargs))
        try:
            model.hf_cifd_image_processor = AutoImageProcessor.from_pretrained(name)
        except (OSError, ValueError) as e:  # a config-only folder / repo: transforms must then be passed explicitly
            model.hf_cifd_image_processor = None
            model.hf_cifd_processor_error = f"{type(e).__name__}: {e}"
        if model.hf_cifd_image_processor is not None and image_size:
            _resize_processor(model.hf_cifd_image_processor, image_size)
        return model

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

    @staticmethod
    def image_processor(model):
        """The model's ``AutoImageProcessor`` (kept by :meth:`load`, else read from ``config._name_or_path``)."""
        processor = getattr(model, "hf_cifd_image_processor", None)
        if processor is None and not hasattr(model, "hf_cifd_image_processor"):
            from transformers import AutoImageProcessor

            try:
                processor = AutoImageProcessor.from_pretrained(model.config._name_or_path)
            except (OSError, ValueError):
                processor = None
            model.hf_cifd_image_processor = processor
        return processor

    def image_transform(self, model, train):
        """torchvision transforms from the model's image processor (size, crop, mean / std), as in transformers'
        image-classification example: RandomResizedCrop + flip for training, Resize + CenterCrop for evaluation."""
        from torchvision import transforms as T

        processor = self.image_processor(model)
        if processor is None:
            from ..checks import DistillationInputError

            raise DistillationInputError(
                f"{model.config._name_or_path or type(model).__name__} has no image processor "
                f"({getattr(model, 'hf_cifd_processor_error', 'preprocessor_config.json not found')}): save one with "
                "AutoImageProcessor(...).save_pretrained(<model dir>) or pass transforms explicitly.")
        size = processor.size or {}
        if "shortest_edge" in size:
            resize = crop = size["shortest_edge"]
        else:
            resize = crop = (size["height"], size["width"])
        crop_size = getattr(processor, "crop_size", None)
        if getattr(processor, "do_center_crop", False) and crop_size:
            crop = (crop_size["height"], crop_size["width"])
        normalize = T.Normalize(processor.image_mean, processor.image_std)
        if train:
            steps = [T.RandomResizedCrop(crop), T.RandomHorizontalFlip()]
        else:
            steps = [T.Resize(resize), T.CenterCrop(crop)]
        return T.Compose([T.Lambda(_rgb), *steps, T.ToTensor(), normalize])

    def save(self, model, output_dir):
        """``save_pretrained`` (safetensors) + the image processor, so that
        ``pipeline("image-classification", model=output_dir)`` works."""
        model.save_pretrained(output_dir, safe_serialization=True)
        processor = self.image_processor(model)
        if processor is not None:
            processor.save_pretrained(output_dir)


def _rgb(image):
    return image.convert("RGB") if hasattr(image, "convert") else image


def _resize_processor(processor, image_size: int) -> None:
    """Makes the processor produce ``image_size`` inputs (the recipes' ``--image_size``)."""
    if "shortest_edge" in (processor.size or {}):
        processor.size = {"shortest_edge": image_size}
    else:
        processor.size = {"height": image_size, "width": image_size}
    if getattr(processor, "crop_size", None):
        processor.crop_size = {"height": image_size, "width": image_size}
