"""The evaluate metric modules load offline from the package and agree with the pure functions."""

import os

import pytest
import torch

from hf_cifd.checks import DistillationInputError
import hf_cifd.eval as E

# The hand-checked retrieval case of test_eval_retrieval.py (tests/helpers.py).
from helpers import EXPECTED, TEXT_TO_IMAGE, hand_similarity


@pytest.fixture(scope="module")
def metrics():
    os.environ["HF_HUB_OFFLINE"] = "1"
    import evaluate

    direct = evaluate.load(os.path.join(os.path.dirname(E.__file__), "metrics", "zero_shot_accuracy"))
    assert type(direct).__name__ == "ZeroShotAccuracy"
    return {name: E.load_metric(name) for name in E.METRIC_NAMES}


def test_accuracy_module(metrics):
    out = metrics["accuracy"].compute(predictions=[0, 1, 1, 2], references=[0, 1, 0, 2])
    assert out == {"accuracy": 0.75}
    assert E.classification_accuracy([0, 1, 1, 2], [0, 1, 0, 2]) == 0.75
    # logits are accepted by the pure function (argmax taken)
    assert E.classification_accuracy(torch.tensor([[2.0, 1.0], [0.0, 3.0]]), [1, 1]) == 0.5


def test_zero_shot_module(metrics):
    # same hand-checked scores as test_eval_zero_shot: ranks of the labels are 0, 1, 2, 3
    scores = [[1.0, 0.1, -1.0, -0.1], [0.2, 1.0, -0.2, -1.0], [-1.0, -0.3, 1.0, 0.3], [0.1, -1.0, -0.1, 1.0]]
    labels = [0, 0, 1, 1]
    expected = {"zeroshot_top1": 25.0, "zeroshot_top2": 50.0, "zeroshot_top3": 75.0}
    assert metrics["zero_shot_accuracy"].compute(predictions=scores, references=labels, topk=(1, 2, 3)) == expected
    assert E.topk_accuracy(scores, labels, topk=(1, 2, 3)) == expected
    with pytest.raises(DistillationInputError, match="num_classes=5"):
        metrics["zero_shot_accuracy"].compute(predictions=scores, references=labels, num_classes=5)


def test_retrieval_module_with_batches(metrics):
    m = metrics["retrieval_recall"]
    sim, mapping = hand_similarity(), TEXT_TO_IMAGE
    m.add_batch(predictions=sim[:2].tolist(), references=mapping[:2].tolist())
    m.add_batch(predictions=sim[2:].numpy(), references=mapping[2:].numpy())
    assert m.compute(ks=(1, 2, 10)) == EXPECTED
    assert E.retrieval_recall_from_similarity(sim, mapping, ks=(1, 2, 10)) == EXPECTED
    with pytest.raises(DistillationInputError, match="no caption"):
        m.compute(predictions=sim[:3].tolist(), references=[0, 0, 2], ks=(1,))


def test_unknown_metric_name():
    with pytest.raises(DistillationInputError, match="available: accuracy"):
        E.load_metric("bleu")
