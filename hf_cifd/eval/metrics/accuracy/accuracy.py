"""Top-1 classification accuracy (fraction in [0, 1]); an offline drop-in for the Hub ``accuracy`` metric."""

import datasets
import evaluate

from hf_cifd.eval import classification_accuracy

_DESCRIPTION = "Top-1 accuracy: the fraction of predicted class ids equal to the reference class ids."
_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `int`): predicted class ids (take the argmax of the logits first).
    references (`list` of `int`): true class ids.
Returns:
    accuracy (`float`): fraction in [0, 1].
Examples:
    >>> metric = hf_cifd.eval.load_metric("accuracy")
    >>> metric.compute(predictions=[0, 1, 1], references=[0, 1, 0])
    {'accuracy': 0.6666666666666666}
"""
_CITATION = ""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Accuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, predictions, references):
        return {"accuracy": classification_accuracy(predictions, references)}
