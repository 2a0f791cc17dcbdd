"""open_clip models (``open_clip.CLIP`` / ``CustomTextCLIP``): task "clip", modalities "image" and "text".

Embeddings: ``encode(model, batch)`` returns the UNNORMALISED features (``encode_image(x, normalize=False)`` /
``encode_text(ids, normalize=False)``, i.e. after the towers' projections, before L2 normalisation) and
``logit_scale = model.logit_scale.exp()``. The IBM adds its U(-0.5, 0.5) noise to these raw features (noise on unit
vectors would swamp them); every CLIP loss L2-normalises its inputs itself. A teacher-output cache therefore also
stores raw teacher features, and the RDMs are trained on them.

Creating models: :func:`create_openclip` wraps ``open_clip.create_model_and_transforms`` for a built-in name (with a
``pretrained`` tag), ``hf-hub:org/repo``, ``local-dir:PATH`` or a model_cfg dict, and records the model_cfg on the
model (``model.hf_cifd_model_cfg``) so that :meth:`OpenCLIPAdapter.save` can write open_clip's own format:
``open_clip_config.json`` ({"model_cfg", "preprocess_cfg"}) + ``open_clip_model.safetensors`` (+ the tokenizer files
of an HF tokenizer; open_clip's default BPE tokenizer ships with open_clip and needs none), loadable with
``open_clip.create_model_and_transforms("local-dir:PATH")`` without hf_cifd.

Data: :class:`OpenCLIPPairProcessor` builds, per (image, caption) sample, the student's AND the teacher's inputs
(each with its own image size / mean / std and tokenizer / context length).
"""

from __future__ import annotations

import copy
import json
import os
import random
import tempfile
from typing import Any, Callable, Mapping

import torch
from torch import nn

from ..checks import DistillationInputError
from .base import Encoded, ModelAdapter, register_adapter

CONFIG_NAME = "open_clip_config.json"
WEIGHTS_NAME = "open_clip_model.safetensors"


def _unwrap(model: nn.Module) -> nn.Module:
    while hasattr(model, "module") and isinstance(model.module, nn.Module) and not hasattr(model, "encode_image"):
        model = model.module
    return model


def _raw_features(net: nn.Module, images: torch.Tensor, tokens: torch.Tensor):
    """Unnormalised image and text features and the exponentiated scale (shape () also when held as (1,))."""
    return (net.encode_image(images, normalize=False), net.encode_text(tokens, normalize=False),
            net.logit_scale.exp().reshape(()))


def _read_local_cfg(path: str) -> dict:
    with open(os.path.join(path, CONFIG_NAME), encoding="utf-8") as f:
        return json.load(f)["model_cfg"]


def create_openclip(
    model: str | Mapping[str, Any],
    pretrained: str | None = None,
    *,
    preprocess_cfg: Mapping[str, Any] | None = None,
    **kwargs,
):
    """``(model, preprocess_train, preprocess_val, tokenizer)`` for an open_clip model.

    ``model``: a built-in name ("ViT-L-14", with ``pretrained`` a tag such as "openai" or "datacomp_xl_s13b_b90k",
    or a checkpoint file), "hf-hub:org/repo", "local-dir:PATH", or a model_cfg dict ({"embed_dim", "vision_cfg",
    "text_cfg", ...}; randomly initialised, ``preprocess_cfg`` may set "mean"/"std"/"interpolation"...). Other
    keyword arguments go to ``open_clip.create_model_and_transforms``. The model_cfg and tokenizer are recorded on
    the model for :meth:`OpenCLIPAdapter.save`.
    """
    import open_clip

    if isinstance(model, Mapping):
        cfg = copy.deepcopy(dict(model))
        for key in ("embed_dim", "vision_cfg", "text_cfg"):
            if key not in cfg:
                raise DistillationInputError(f"an open_clip model_cfg needs {key!r}; got keys {sorted(cfg)}.")
        with tempfile.TemporaryDirectory() as tmp:
            with open(os.path.join(tmp, CONFIG_NAME), "w") as f:
                json.dump({"model_cfg": cfg, "preprocess_cfg": dict(preprocess_cfg or {})}, f)
            net, pre_train, pre_val = open_clip.create_model_and_transforms(f"local-dir:{tmp}", **kwargs)
            tokenizer = open_clip.get_tokenizer(f"local-dir:{tmp}")
    else:
        if preprocess_cfg:
            kwargs["force_preprocess_cfg"] = dict(preprocess_cfg)
        net, pre_train, pre_val = open_clip.create_model_and_transforms(model, pretrained=pretrained, **kwargs)
        tokenizer = open_clip.get_tokenizer(model)
        if model.startswith("local-dir:"):
            cfg = _read_local_cfg(model[len("local-dir:"):])
        elif model.startswith("hf-hub:"):
            from open_clip.factory import _get_hf_config

            cfg = _get_hf_config(model[len("hf-hub:"):])["model_cfg"]
        else:
            cfg = open_clip.get_model_config(model)
        cfg = copy.deepcopy(cfg)
        if kwargs.get("force_image_size") is not None:
            cfg["vision_cfg"]["image_size"] = kwargs["force_image_size"]
        if kwargs.get("force_context_length") is not None:
            cfg["text_cfg"]["context_length"] = kwargs["force_context_length"]
        if kwargs.get("force_quick_gelu"):
            cfg["quick_gelu"] = True
    net.hf_cifd_model_cfg = cfg
    net.hf_cifd_tokenizer = tokenizer
    net.hf_cifd_transforms = (pre_train, pre_val)
    return net, pre_train, pre_val, tokenizer


def set_model_cfg(model: nn.Module, model_cfg: Mapping[str, Any], tokenizer=None) -> nn.Module:
    """Records the model_cfg (and tokenizer) of a model built without :func:`create_openclip`, for saving."""
    model.hf_cifd_model_cfg = copy.deepcopy(dict(model_cfg))
    if tokenizer is not None:
        model.hf_cifd_tokenizer = tokenizer
    return model


@register_adapter
class OpenCLIPAdapter(ModelAdapter):
    task = "clip"
    modalities = ("image", "text")
    library = "open_clip"
    spec_prefix = "open_clip"

    @staticmethod
    def load(name, pretrained=False, num_classes=None, *, image_size=None, in_channels=None):
        """``"ViT-L-14@openai"`` (a built-in architecture and its pretrained tag, loaded when ``pretrained``),
        ``"hf-hub:org/repo"`` or ``"local-dir:PATH"`` via :func:`create_openclip`; its transforms and tokenizer are
        kept on the model (``image_transform``, ``tokenizer``)."""
        arch, _, tag = name.partition("@")
        if pretrained and not tag and not arch.startswith(("hf-hub:", "local-dir:")):
            raise DistillationInputError(
                f"open_clip:{name} names no pretrained weights: add the tag, e.g. open_clip:{arch}@openai "
                "(open_clip.list_pretrained() lists them), or set pretrained to false for random init.")
        if in_channels not in (None, 3):
            raise DistillationInputError(f"open_clip models take RGB images: in_channels={in_channels} is not supported.")
        kwargs = {} if image_size is None else {"force_image_size": image_size}
        return create_openclip(arch, tag if pretrained and tag else None, **kwargs)[0]

    @staticmethod
    def matches(model: nn.Module) -> bool:
        model = _unwrap(model)
        return (type(model).__module__.startswith("open_clip.") and hasattr(model, "encode_image")
                and hasattr(model, "encode_text") and hasattr(model, "logit_scale"))

    def embedding_dims(self, model):
        model = _unwrap(model)
        image = getattr(model.visual, "output_dim", None)
        proj = getattr(model, "text_projection", None)
        if isinstance(proj, nn.Linear):
            text = proj.out_features
        elif isinstance(proj, torch.Tensor):
            text = proj.shape[1]
        else:
            text = getattr(getattr(model, "text", None), "output_dim", None)
        if image is None or text is None:
            raise DistillationInputError(f"cannot read the embedding widths of {type(model).__name__}.")
        return {"image": int(image), "text": int(text)}

    def encode(self, model, batch, prefix=""):
        net = _unwrap(model)
        images = self.inputs(batch, "pixel_values", prefix)
        tokens = self.inputs(batch, "input_ids", prefix)
        if images.shape[0] != tokens.shape[0]:
            raise DistillationInputError(
                f"the batch has {images.shape[0]} images but {tokens.shape[0]} captions ({prefix or 'student'} inputs); "
                "CLIP training needs one caption per image."
            )
        # Through the root module's __call__: ZeRO-3 gathers the root's own parameters (text_projection, logit_scale...)
        # in its forward hooks, and again for the backward, only when its forward runs.
        net.forward = _raw_features.__get__(net)
        try:
            image, text, scale = net(images, tokens)
        finally:
            del net.forward
        return Encoded(embeddings={"image": image, "text": text}, logit_scale=scale)

    def prepare_for_deepspeed(self, model):
        """Holds open_clip's 0-dim parameters (``logit_scale``, ``logit_bias``), which DeepSpeed 0.19 cannot shard or
        checkpoint, as shape (1,): open_clip only uses them in broadcasting products. :meth:`save` writes them back
        with shape (), so the export loads with plain open_clip."""
        net = _unwrap(model)
        scalars = [n for n, p in net.named_parameters() if p.dim() == 0]
        for name in scalars:
            module, _, attr = name.rpartition(".")
            param = getattr(net.get_submodule(module), attr)
            param.data = param.data.reshape(1)
        net.hf_cifd_scalar_params = sorted(set(getattr(net, "hf_cifd_scalar_params", ())) | set(scalars))

    def image_transform(self, model, train):
        transforms = getattr(_unwrap(model), "hf_cifd_transforms", None)
        if transforms is None:
            raise DistillationInputError("this open_clip model was not created by create_openclip: pass its "
                                         "preprocess transforms explicitly.")
        return transforms[0 if train else 1]

    @staticmethod
    def tokenizer(model):
        """The model's tokenizer (recorded by :func:`create_openclip`)."""
        return getattr(_unwrap(model), "hf_cifd_tokenizer", None)

    def save(self, model, output_dir):
        from safetensors.torch import save_file

        net = _unwrap(model)
        cfg = getattr(net, "hf_cifd_model_cfg", None)
        if cfg is None:
            raise DistillationInputError(
                "this open_clip model carries no model_cfg, so open_clip_config.json cannot be written: create it with "
                "hf_cifd.adapters.open_clip.create_openclip(...) or record it with set_model_cfg(model, cfg)."
            )
        import open_clip

        os.makedirs(output_dir, exist_ok=True)
        pp = dict(open_clip.get_model_preprocess_cfg(net))
        if "size" in pp and isinstance(pp["size"], tuple):
            pp["size"] = list(pp["size"])
        state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
        for name in getattr(net, "hf_cifd_scalar_params", ()):
            state[name] = state[name].reshape(())  # held as (1,) for DeepSpeed; open_clip's shape is ()
        save_file(state, os.path.join(output_dir, WEIGHTS_NAME))
        with open(os.path.join(output_dir, CONFIG_NAME), "w") as f:
            json.dump({"model_cfg": cfg, "preprocess_cfg": pp}, f, indent=2)
        tokenizer = getattr(net, "hf_cifd_tokenizer", None)
        if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
            tokenizer.save_pretrained(output_dir)


def _caption(text: Any, rng: random.Random | None) -> str:
    """One caption out of a string (several joined by newlines allowed) or a list of strings."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    options = [t.strip() for t in (text.split("\n") if isinstance(text, str) else list(text or [])) if isinstance(t, str)]
    options = [t for t in options if t]
    if not options:
        raise DistillationInputError(f"empty caption {text!r}")
    return options[0] if rng is None else rng.choice(options)


class OpenCLIPPairProcessor:
    """Per sample ``{"image": PIL, "text": str}`` -> the batch contract for a student AND a teacher.

    ``pixel_values`` / ``input_ids`` come from the student's preprocess / tokenizer, ``teacher_pixel_values`` /
    ``teacher_input_ids`` from the teacher's (omitted when no teacher processing is given). A sample whose image
    fails to decode or whose caption is empty returns None and is counted in ``skipped`` (``collate`` drops None).
    ``random_caption``: pick one of several captions at random (training); else the first.
    """

    def __init__(self, preprocess: Callable, tokenizer: Callable, teacher_preprocess: Callable | None = None,
                 teacher_tokenizer: Callable | None = None, *, image_key: str = "image", text_key: str = "text",
                 key_key: str | None = "sample_key", random_caption: bool = True, seed: int = 0,
                 view: Callable | None = None):
        self.view = view  # hf_cifd.data.views.SharedView: one crop for both models (replaces the two preprocesses)
        self.preprocess, self.tokenizer = preprocess, tokenizer
        self.teacher_preprocess, self.teacher_tokenizer = teacher_preprocess, teacher_tokenizer
        self.image_key, self.text_key, self.key_key = image_key, text_key, key_key
        self.rng = random.Random(seed) if random_caption else None
        self.skipped = {"undecodable_image": 0, "empty_caption": 0}

    def __call__(self, sample: Mapping[str, Any]) -> dict[str, Any] | None:
        try:
            text = _caption(sample.get(self.text_key), self.rng)
        except DistillationInputError:
            self.skipped["empty_caption"] += 1
            return None
        image = sample.get(self.image_key)
        try:
            image = decode_image(image)
        except Exception:
            self.skipped["undecodable_image"] += 1
            return None
        if self.view is not None:
            student_pixels, teacher_pixels = self.view(image)
        else:
            student_pixels = self.preprocess(image)
            teacher_pixels = self.teacher_preprocess(image) if self.teacher_preprocess is not None else None
        out = {"pixel_values": student_pixels, "input_ids": self.tokenizer([text])[0]}
        if teacher_pixels is not None:
            out["teacher_pixel_values"] = teacher_pixels
        if self.teacher_tokenizer is not None:
            out["teacher_input_ids"] = self.teacher_tokenizer([text])[0]
        if self.key_key and sample.get(self.key_key) is not None:
            out["sample_key"] = str(sample[self.key_key])
        return out


def decode_image(value: Any):
    """A PIL RGB image from a PIL image, raw bytes, or a datasets ``{"bytes", "path"}`` dict (raises on failure)."""
    import io

    from PIL import Image

    if isinstance(value, Image.Image):
        img = value
    elif isinstance(value, (bytes, bytearray)):
        img = Image.open(io.BytesIO(value))
    elif isinstance(value, Mapping) and (value.get("bytes") or value.get("path")):
        img = Image.open(io.BytesIO(value["bytes"])) if value.get("bytes") else Image.open(value["path"])
    else:
        raise DistillationInputError(f"not an image: {type(value).__name__}")
    img.load()
    return img.convert("RGB")
