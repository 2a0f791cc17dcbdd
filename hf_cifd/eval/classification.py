"""Classification metrics: plain accuracy and zero-shot top-k accuracy (percent)."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch

from hf_cifd.checks import DistillationInputError, check_finite
from hf_cifd.eval._ranking import (
    CHUNK_ROWS,
    as_index_tensor,
    as_tensor,
    check_ks,
    l2_normalize,
    recall_percent,
    stable_rank,
)


def classification_accuracy(predictions, references) -> float:
    """Top-1 accuracy as a fraction in [0, 1] (the convention of the Hub ``accuracy`` metric).

    ``predictions`` are predicted class ids (N,), or class scores/logits (N, C) whose argmax is taken
    (first index on ties); ``references`` are the true class ids (N,).
    """
    preds = as_tensor("predictions", predictions)
    if preds.dim() == 2:
        check_finite("predictions", preds.float())
        preds = preds.float().argmax(dim=1)
    preds = as_index_tensor("predictions", preds)
    refs = as_index_tensor("references", references)
    if preds.numel() != refs.numel():
        raise DistillationInputError(
            f"predictions has {preds.numel()} samples but references has {refs.numel()}; they must describe the "
            "same samples in the same order."
        )
    if preds.numel() == 0:
        raise DistillationInputError("accuracy of an empty evaluation set is undefined; got 0 samples.")
    return (preds == refs).sum().item() / preds.numel()


def _check_class_labels(labels: torch.Tensor, n_classes: int, num_classes: int | None, what: str) -> None:
    if num_classes is not None and num_classes != n_classes:
        raise DistillationInputError(
            f"{what} has {n_classes} classes but num_classes={num_classes}; the class-names list used to build "
            "the classifier does not match the dataset's label set."
        )
    if labels.numel() and (labels.min().item() < 0 or labels.max().item() >= n_classes):
        raise DistillationInputError(
            f"labels lie in [{labels.min().item()}, {labels.max().item()}] but {what} has only {n_classes} "
            f"classes (ids 0..{n_classes - 1}); the class-names count does not match the dataset's labels."
        )


def _topk_result(ranks: torch.Tensor, topk: tuple[int, ...], n_classes: int) -> dict[str, float]:
    too_big = [k for k in topk if k > n_classes]
    if too_big:
        warnings.warn(
            f"top-k with k={too_big} > {n_classes} classes: k is clipped to {n_classes}, so those accuracies are "
            "trivially 100%.",
            stacklevel=3,
        )
    return {f"zeroshot_top{k}": v for k, v in recall_percent(ranks, topk).items()}


def _check_samples(name: str, n: int, labels: torch.Tensor, metric: str) -> None:
    if n != labels.numel():
        raise DistillationInputError(
            f"{name} has {n} samples but labels has {labels.numel()}; they must describe the same samples."
        )
    if n == 0:
        raise DistillationInputError(f"{metric} of an empty evaluation set is undefined; got 0 samples.")


def topk_accuracy(scores, labels, topk: Sequence[int] = (1, 5), *, num_classes: int | None = None) -> dict[str, float]:
    """Top-k accuracy in percent from per-class scores.

    Args:
        scores: (N, C) class scores (logits or cosine similarities); higher is better.
        labels: (N,) true class ids in [0, C).
        topk: the k values; a k larger than C is clipped to C (so it gives 100%) with a warning.
        num_classes: if given, must equal C (guards against a class-names list of the wrong length).

    Returns:
        ``{"zeroshot_top{k}": percent}``. A sample counts as a top-k hit when its true class is among the
        k best-scoring classes, ties broken towards the lower class id (deterministic; same as argmax).
    """
    topk = check_ks("topk", topk)
    scores = as_tensor("scores", scores).float()
    labels = as_index_tensor("labels", labels)
    if scores.dim() != 2:
        raise DistillationInputError(f"scores must have shape (num_samples, num_classes), got {tuple(scores.shape)}.")
    _check_samples("scores", scores.shape[0], labels, "top-k accuracy")
    check_finite("scores", scores)
    _check_class_labels(labels, scores.shape[1], num_classes, "the score matrix")
    ranks = torch.cat([
        stable_rank(scores[i:i + CHUNK_ROWS], labels[i:i + CHUNK_ROWS]) for i in range(0, labels.numel(), CHUNK_ROWS)
    ])
    return _topk_result(ranks, topk, scores.shape[1])


def zero_shot_accuracy(
    image_embeds,
    classifier,
    labels,
    topk: Sequence[int] = (1, 5),
    *,
    num_classes: int | None = None,
) -> dict[str, float]:
    """Zero-shot top-k accuracy in percent.

    Args:
        image_embeds: (N, D) image embeddings (L2-normalised here; any scale is fine).
        classifier: (D, C) classifier from :func:`zero_shot_classifier` (used as is).
        labels: (N,) true class ids in [0, C).
        topk: the k values; a k larger than C is clipped to C (so it gives 100%) with a warning.
        num_classes: if given (e.g. the dataset's label count), must equal C: a class-names list of the wrong
            length raises :class:`DistillationInputError` rather than giving a silently wrong metric.

    Returns:
        ``{"zeroshot_top1": ..., "zeroshot_top5": ...}`` (one key per k), in percent. Same result as
        :func:`topk_accuracy` on ``normalize(image_embeds) @ classifier``.
    """
    topk = check_ks("topk", topk)
    images = as_tensor("image_embeds", image_embeds)
    clf = as_tensor("classifier", classifier).float()
    labels = as_index_tensor("labels", labels)
    if images.dim() != 2 or clf.dim() != 2:
        raise DistillationInputError(
            f"image_embeds must be (N, D) and classifier (D, C); got {tuple(images.shape)} and {tuple(clf.shape)}."
        )
    if clf.shape[0] != images.shape[1]:
        hint = " (it looks transposed: pass the (D, C) classifier)" if clf.shape[1] == images.shape[1] else ""
        raise DistillationInputError(
            f"classifier has shape {tuple(clf.shape)} but image embeddings have dim {images.shape[1]}; the classifier "
            f"must be (embed_dim, num_classes){hint}. Were the classifier and the images encoded by the same model?"
        )
    _check_samples("image_embeds", images.shape[0], labels, "zero-shot accuracy")
    check_finite("classifier", clf)
    _check_class_labels(labels, clf.shape[1], num_classes, "the zero-shot classifier (one column per class name)")
    images = l2_normalize("image_embeds", images)
    ranks = torch.cat([
        stable_rank(images[i:i + CHUNK_ROWS] @ clf, labels[i:i + CHUNK_ROWS]) for i in range(0, labels.numel(), CHUNK_ROWS)
    ])
    return _topk_result(ranks, topk, clf.shape[1])
