"""Evaluation for distilled models: zero-shot classification and image<->text retrieval.

Pure functions (tensors in, numbers out) plus ``evaluate`` metric modules that load from a local path::

    from hf_cifd.eval import load_metric
    load_metric("zero_shot_accuracy").compute(predictions=scores, references=labels)

Units: ``zero_shot_accuracy`` / ``topk_accuracy`` / ``retrieval_recall*`` return percentages (as in the
CLIP papers' tables); ``classification_accuracy`` and the ``accuracy`` metric module return a fraction in
[0, 1] (the Hub ``accuracy`` metric's convention). Importing this package imports only torch.
"""

from hf_cifd.eval.classification import classification_accuracy, topk_accuracy, zero_shot_accuracy
from hf_cifd.eval.loading import METRIC_NAMES, METRICS_DIR, load_metric, metric_path
from hf_cifd.eval.retrieval import flatten_captions, retrieval_recall, retrieval_recall_from_similarity
from hf_cifd.eval.zero_shot import (
    encode_in_batches,
    format_template,
    load_classnames_and_templates,
    read_classnames,
    read_templates,
    zero_shot_classifier,
)

__all__ = [
    "METRICS_DIR",
    "METRIC_NAMES",
    "classification_accuracy",
    "encode_in_batches",
    "flatten_captions",
    "format_template",
    "load_classnames_and_templates",
    "load_metric",
    "metric_path",
    "read_classnames",
    "read_templates",
    "retrieval_recall",
    "retrieval_recall_from_similarity",
    "topk_accuracy",
    "zero_shot_accuracy",
    "zero_shot_classifier",
]
