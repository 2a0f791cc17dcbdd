"""Strict ``from_pretrained`` for hf_cifd's own Hub-mixin modules (RDMs, the paper's CNNs).

huggingface_hub's ``PyTorchModelHubMixin`` loads with ``strict=False`` and ignores config keys that ``__init__`` does
not take: a missing tensor would silently stay randomly initialised. Here a missing, unexpected or mis-shaped tensor,
or a config key the class does not know, is a :class:`~hf_cifd.checks.DistillationInputError` naming it.
``from_pretrained(path, strict=False)`` restores the lenient behaviour.
"""

from __future__ import annotations

import json
import os

from huggingface_hub import PyTorchModelHubMixin, constants

from ..checks import DistillationInputError


class StrictHubMixin(PyTorchModelHubMixin):
    @classmethod
    def _from_pretrained(cls, *, model_id: str, strict: bool = True, **kwargs):
        if strict:
            cls._check_config(model_id, kwargs)
        return super()._from_pretrained(model_id=model_id, strict=strict, **kwargs)

    @classmethod
    def _check_config(cls, model_id: str, kwargs) -> None:
        path = os.path.join(model_id, constants.CONFIG_NAME)
        if not os.path.isfile(path):
            try:
                from huggingface_hub import hf_hub_download

                path = hf_hub_download(model_id, constants.CONFIG_NAME, revision=kwargs.get("revision"),
                                       cache_dir=kwargs.get("cache_dir"), token=kwargs.get("token"),
                                       local_files_only=kwargs.get("local_files_only", False))
            except Exception:  # noqa: BLE001 - no config at all: the weights check below still applies
                return
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
        unknown = sorted(set(config) - set(cls._hub_mixin_init_parameters))
        if unknown:
            raise DistillationInputError(
                f"{path} has config key(s) {unknown} that {cls.__name__} does not take (it takes "
                f"{sorted(cls._hub_mixin_init_parameters)}): it was saved by another class or version. Load it with "
                "the class that saved it, or pass strict=False to ignore them.")

    @classmethod
    def _load_as_safetensor(cls, model, model_file: str, map_location: str, strict: bool):
        if strict:
            from safetensors import safe_open

            # Names only: the entropy model's CDF buffers are resized on load; torch names a real size mismatch.
            expected = set(model.state_dict())
            with safe_open(model_file, framework="pt") as f:
                found = set(f.keys())
            missing, unexpected = sorted(expected - found), sorted(found - expected)
            if missing or unexpected:
                parts = [f"{what} tensor(s) {names}" for what, names in (("missing", missing),
                                                                          ("unexpected", unexpected)) if names]
                raise DistillationInputError(
                    f"{model_file} does not match {cls.__name__} built from its config: {'; '.join(parts)}. The "
                    "weights and config.json come from different models (or the file is damaged); re-save the model "
                    "with save_pretrained, or pass strict=False to load what matches.")
        return super()._load_as_safetensor(model, model_file, map_location, strict)
