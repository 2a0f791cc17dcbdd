"""Any ``nn.Module`` whose forward returns ``(embedding, logits)``.

If the module also has a ``head`` (or ``fc`` / ``classifier``) linear layer mapping the embedding to the logits,
the IBM's noisy embedding is fed through it during training, as in the paper's Fig. 8.
"""

from __future__ import annotations

import json
import os

from torch import nn

from .base import Encoded, ModelAdapter

_HEAD_NAMES = ("head", "fc", "classifier")


class PlainAdapter(ModelAdapter):
    """The fallback of :func:`adapter_for` when no library adapter matches."""

    library = "torch"
    spec_prefix = "cnn"

    @staticmethod
    def load(name, pretrained=False, num_classes=None, *, image_size=None, in_channels=None):
        """The paper's simple CNNs (:class:`hf_cifd.models.SimpleCNN`): a Table 8 name ("cnn10", "cnn2", ...;
        random init) or a directory / Hub repo written by ``save_pretrained`` (a trained model)."""
        from ..checks import DistillationInputError
        from ..models import TABLE8, SimpleCNN

        if name in TABLE8:
            if pretrained:
                raise DistillationInputError(
                    f"there are no published weights for the Table 8 CNN {name!r}: give the directory of a trained one "
                    "(cnn:/path/to/model, written by save_pretrained) or train it first (pretrained=False).")
            kwargs = {} if image_size is None else {"input_size": image_size}
            if in_channels is not None:
                kwargs["in_channels"] = in_channels
            return SimpleCNN.from_table8(name, num_classes=100 if num_classes is None else num_classes, **kwargs)
        model = SimpleCNN.from_pretrained(name)
        if in_channels is not None and in_channels != model.in_channels:
            raise DistillationInputError(f"{name} takes {model.in_channels}-channel images, not in_channels={in_channels}.")
        if num_classes is not None and model.num_classes != num_classes:
            raise DistillationInputError(f"{name} predicts {model.num_classes} classes, not num_classes={num_classes}.")
        return model

    @staticmethod
    def matches(model: nn.Module) -> bool:
        return isinstance(model, nn.Module)

    def _head_layer(self, model) -> nn.Linear | None:
        for name in _HEAD_NAMES:
            layer = getattr(model, name, None)
            if isinstance(layer, nn.Linear):
                return layer
        return None

    def embedding_dims(self, model):
        dim = getattr(model, "embed_dim", None) or getattr(model, "num_features", None)
        head = self._head_layer(model)
        if dim is None and head is not None:
            dim = head.in_features
        if dim is None:
            raise ValueError(
                f"{type(model).__name__} returns (embedding, logits) but its embedding width is unknown: give it "
                "an `embed_dim` attribute or a `head`/`fc`/`classifier` nn.Linear."
            )
        return {"image": int(dim)}

    def num_classes(self, model):
        n = getattr(model, "num_classes", None)
        head = self._head_layer(model)
        return n if n is not None else (head.out_features if head is not None else None)

    def encode(self, model, batch, prefix=""):
        out = model(self.inputs(batch, "pixel_values", prefix))
        if not (isinstance(out, (tuple, list)) and len(out) == 2):
            raise TypeError(f"{type(model).__name__}.forward must return (embedding, logits), got {type(out).__name__}.")
        embedding, logits = out
        return Encoded(embeddings={"image": embedding.flatten(1)}, logits=logits)

    def head(self, model, embedding):
        layer = self._head_layer(model)
        return layer(embedding) if layer is not None else None

    def image_transform(self, model, train):
        """Resize to ``model.input_size`` (default 32), CIFAR-style crop/flip when training, ``model.mean``/``std``
        normalisation (default ImageNet's)."""
        from torchvision import transforms as T

        size = getattr(model, "input_size", 32)
        mean = getattr(model, "mean", (0.485, 0.456, 0.406))
        std = getattr(model, "std", (0.229, 0.224, 0.225))
        steps = [T.Resize(size), T.CenterCrop(size)]
        if train:
            steps += [T.RandomCrop(size, padding=size // 8), T.RandomHorizontalFlip()]
        if getattr(model, "in_channels", 3) == 1:
            steps.append(T.Grayscale())
            mean, std = mean[:1], std[:1]
        return T.Compose([*steps, T.ToTensor(), T.Normalize(mean, std)])

    def save(self, model, output_dir):
        from huggingface_hub import PyTorchModelHubMixin
        from safetensors.torch import save_model

        if isinstance(model, PyTorchModelHubMixin):  # e.g. SimpleCNN: config.json of init args, Cls.from_pretrained(dir)
            model.save_pretrained(output_dir)
            return
        os.makedirs(output_dir, exist_ok=True)
        save_model(model, os.path.join(output_dir, "model.safetensors"))
        with open(os.path.join(output_dir, "config.json"), "w") as f:
            json.dump({"class": f"{type(model).__module__}.{type(model).__qualname__}",
                       "init_args": getattr(model, "config", None)}, f, indent=2, default=str)
