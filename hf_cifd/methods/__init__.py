"""Distillation methods, looked up by (task, name) from ``DistillationConfig.method``."""

from .base import Method, StudentOutput, build_method, register_method
from . import classification  # noqa: F401  (registers the classification methods)
from . import ckd  # noqa: F401  (Comparative KD "ckd" + add-on + teacher-call budget; InDistill: methods.indistill)
from . import clip  # noqa: F401  (registers the CLIP methods, task "clip")

__all__ = ["Method", "StudentOutput", "build_method", "register_method"]
