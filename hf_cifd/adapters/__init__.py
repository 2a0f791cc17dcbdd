"""Model-library adapters: the only place that knows timm, transformers and open_clip.

``adapter_for(model)`` tries the registered library adapters in order and falls back to
:class:`PlainAdapter` (any module returning ``(embedding, logits)``).
"""

from .base import Encoded, ModelAdapter, adapter_for, register_adapter
from .open_clip import OpenCLIPAdapter  # registered first: lookup order = registration order
from .plain import PlainAdapter
from .timm import TimmAdapter
from .transformers import TransformersAdapter
from .specs import load_model, split_spec

__all__ = ["Encoded", "ModelAdapter", "adapter_for", "register_adapter", "OpenCLIPAdapter", "PlainAdapter", "TimmAdapter", "TransformersAdapter",
           "load_model", "split_spec"]
