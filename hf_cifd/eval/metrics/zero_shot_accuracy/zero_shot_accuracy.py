"""Zero-shot top-k accuracy (percent) from per-class scores, via ``hf_cifd.eval.topk_accuracy``."""

import datasets
import evaluate

from hf_cifd.eval import topk_accuracy

_DESCRIPTION = (
    "Zero-shot (or any) top-k classification accuracy in percent. A sample is a top-k hit when its reference "
    "class is among the k highest-scoring classes (ties broken towards the lower class id)."
)
_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `list` of `float`): per-sample class scores, shape (N, C), e.g.
        ``normalize(image_embeds) @ zero_shot_classifier(...)`` (or logits).
    references (`list` of `int`): true class ids in [0, C).
    topk (`tuple` of `int`, default (1, 5)): the k values; k > C is clipped to C (100%, with a warning).
    num_classes (`int`, optional): expected C; a mismatch raises DistillationInputError.
Returns:
    zeroshot_top{k} (`float`): percent, one key per k.
Examples:
    >>> metric = hf_cifd.eval.load_metric("zero_shot_accuracy")
    >>> metric.compute(predictions=[[0.9, 0.1], [0.8, 0.2]], references=[0, 1], topk=(1,))
    {'zeroshot_top1': 50.0}
"""
_CITATION = ""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class ZeroShotAccuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Sequence(datasets.Value("float32")), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, predictions, references, topk=(1, 5), num_classes=None):
        return topk_accuracy(predictions, references, topk=topk, num_classes=num_classes)
