"""Image <-> text retrieval recall@k (percent), via ``hf_cifd.eval.retrieval_recall_from_similarity``."""

import datasets
import evaluate

from hf_cifd.eval import retrieval_recall_from_similarity

_DESCRIPTION = (
    "Image<->text retrieval recall@k in percent from a text x image similarity matrix (one row per caption). "
    "image_retrieval_recall@k: % of captions whose image is among the k most similar images. "
    "text_retrieval_recall@k: % of images with any of their captions among the k most similar captions."
)
_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `list` of `float`): one row per caption: its similarity to every image, shape (T, N),
        e.g. ``normalize(text_embeds) @ normalize(image_embeds).T``.
    references (`list` of `int`): for each caption, the index of its image (several captions may share one);
        every image needs at least one caption.
    ks (`tuple` of `int`, default (1, 5, 10)): the k values.
Returns:
    image_retrieval_recall@k, text_retrieval_recall@k (`float`): percent.
Examples:
    >>> metric = hf_cifd.eval.load_metric("retrieval_recall")
    >>> metric.compute(predictions=[[0.9, 0.1], [0.2, 0.8]], references=[0, 1], ks=(1,))
    {'image_retrieval_recall@1': 100.0, 'text_retrieval_recall@1': 100.0}
"""
_CITATION = ""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class RetrievalRecall(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Sequence(datasets.Value("float32")), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, predictions, references, ks=(1, 5, 10)):
        return retrieval_recall_from_similarity(predictions, references, ks=ks)
