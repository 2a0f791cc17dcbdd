"""Distillation methods, looked up by (task, name) from ``DistillationConfig.method``."""

from .base import Method, StudentOutput, build_method, register_method
from . import classification  # noqa: F401  (registers the classification methods)

__all__ = ["Method", "StudentOutput", "build_method", "register_method"]
