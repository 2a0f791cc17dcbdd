"""Local `evaluate` metric modules: load them by name from this package (works offline)."""

from __future__ import annotations

import os

from hf_cifd.checks import DistillationInputError

METRICS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "metrics")
METRIC_NAMES = ("accuracy", "zero_shot_accuracy", "retrieval_recall")


def metric_path(name: str) -> str:
    """Local directory of the metric module ``name`` (pass it to ``evaluate.load``)."""
    if name not in METRIC_NAMES:
        raise DistillationInputError(f"unknown hf_cifd metric {name!r}; available: {', '.join(METRIC_NAMES)}.")
    return os.path.join(METRICS_DIR, name)


def load_metric(name: str, **kwargs):
    """``evaluate.load(metric_path(name), **kwargs)``: no Hub access needed (works with HF_HUB_OFFLINE=1)."""
    path = metric_path(name)
    import evaluate  # lazy: importing evaluate pulls in datasets

    return evaluate.load(path, **kwargs)
