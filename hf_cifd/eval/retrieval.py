"""Image <-> text retrieval recall@k (percent), with any number of captions per image."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from hf_cifd.checks import DistillationInputError, check_finite
from hf_cifd.eval._ranking import (
    CHUNK_ROWS,
    as_index_tensor,
    as_tensor,
    best_positive_rank,
    check_ks,
    l2_normalize,
    recall_percent,
    stable_rank,
)


def flatten_captions(
    captions: Sequence[str | Sequence[str]],
    *,
    keys: Sequence[str] | None = None,
    sep: str = "\n",
) -> tuple[list[str], torch.Tensor]:
    """Flatten per-image captions into ``(texts, text_to_image)``.

    Each item of ``captions`` is either one string holding several captions joined by ``sep`` (as in
    ``clip-benchmark/wds_flickr30k``'s ``txt``: 5 captions joined by newlines; surrounding whitespace is
    stripped first) or a list of caption strings. ``text_to_image[j]`` is the index of the image that
    ``texts[j]`` describes.

    An image with no caption, or any empty/whitespace-only caption, raises
    :class:`DistillationInputError` naming the sample (by ``keys[i]``, e.g. the webdataset ``__key__``, when
    given): silently dropping it would change what recall means for that image.
    """
    if keys is not None and len(keys) != len(captions):
        raise DistillationInputError(f"keys has {len(keys)} entries but captions has {len(captions)}.")
    if len(captions) == 0:
        raise DistillationInputError("captions is empty: no images to evaluate retrieval on.")
    texts: list[str] = []
    owner: list[int] = []
    for i, item in enumerate(captions):
        name = f"sample {i}" + (f" (key {keys[i]!r})" if keys is not None else "")
        if isinstance(item, str):
            parts = item.strip().split(sep) if item.strip() else []
        elif isinstance(item, Sequence):
            parts = list(item)
        else:
            raise DistillationInputError(f"{name}: captions must be a string or a list of strings, got {type(item).__name__}.")
        if not parts:
            raise DistillationInputError(
                f"{name} has an empty caption list; every image needs at least one caption for retrieval. Fix the "
                "caption column or drop that sample (image and captions together)."
            )
        for j, text in enumerate(parts):
            if not isinstance(text, str) or not text.strip():
                raise DistillationInputError(
                    f"{name} caption {j} is empty ({text!r}); fix the caption column or drop that sample."
                )
            texts.append(text.strip())
            owner.append(i)
    return texts, torch.tensor(owner, dtype=torch.long)


def _check_mapping(text_to_image: torch.Tensor, num_texts: int, num_images: int) -> None:
    if text_to_image.numel() != num_texts:
        raise DistillationInputError(
            f"text_to_image has {text_to_image.numel()} entries but there are {num_texts} texts; it must give the "
            "image index of every text."
        )
    if num_texts == 0 or num_images == 0:
        raise DistillationInputError(f"retrieval needs at least one image and one text, got {num_images} and {num_texts}.")
    lo, hi = text_to_image.min().item(), text_to_image.max().item()
    if lo < 0 or hi >= num_images:
        raise DistillationInputError(
            f"text_to_image values lie in [{lo}, {hi}] but there are only {num_images} images (ids 0..{num_images - 1})."
        )
    counts = torch.bincount(text_to_image, minlength=num_images)
    missing = (counts == 0).nonzero().flatten().tolist()
    if missing:
        shown = ", ".join(map(str, missing[:10])) + (", ..." if len(missing) > 10 else "")
        raise DistillationInputError(
            f"{len(missing)} image(s) have no caption (image index {shown}); text retrieval recall is undefined for "
            "them. Drop those images (and their embeddings) or fix the caption data."
        )


def _recall(
    t2i_block: Callable[[int, int], torch.Tensor],
    i2t_block: Callable[[int, int], torch.Tensor],
    text_to_image: torch.Tensor,
    num_images: int,
    ks: tuple[int, ...],
) -> dict[str, float]:
    num_texts = text_to_image.numel()
    t2i = torch.cat([
        stable_rank(t2i_block(s, min(s + CHUNK_ROWS, num_texts)), text_to_image[s:s + CHUNK_ROWS])
        for s in range(0, num_texts, CHUNK_ROWS)
    ])
    i2t = []
    for s in range(0, num_images, CHUNK_ROWS):
        e = min(s + CHUNK_ROWS, num_images)
        positive = text_to_image[None, :] == torch.arange(s, e)[:, None]
        i2t.append(best_positive_rank(i2t_block(s, e), positive))
    out = {f"image_retrieval_recall@{k}": v for k, v in recall_percent(t2i, ks).items()}
    out.update({f"text_retrieval_recall@{k}": v for k, v in recall_percent(torch.cat(i2t), ks).items()})
    return out


def retrieval_recall_from_similarity(similarity, text_to_image, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Retrieval recall@k in percent from a (num_texts, num_images) similarity matrix.

    Same definitions as :func:`retrieval_recall` (which calls the same code on cosine similarities).
    """
    ks = check_ks("ks", ks)
    sim = as_tensor("similarity", similarity).float()
    mapping = as_index_tensor("text_to_image", text_to_image)
    if sim.dim() != 2:
        raise DistillationInputError(f"similarity must be (num_texts, num_images), got shape {tuple(sim.shape)}.")
    _check_mapping(mapping, sim.shape[0], sim.shape[1])
    check_finite("similarity", sim)
    return _recall(lambda s, e: sim[s:e], lambda s, e: sim[:, s:e].T, mapping, sim.shape[1], ks)


def retrieval_recall(image_embeds, text_embeds, text_to_image, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Image <-> text retrieval recall@k in percent (cosine similarity; embeddings L2-normalised here).

    Args:
        image_embeds: (N, D) image embeddings.
        text_embeds: (T, D) caption embeddings.
        text_to_image: (T,) int, the index of the image each caption describes (see :func:`flatten_captions`);
            an image may have several captions, and every image must have at least one (otherwise a
            :class:`DistillationInputError` names the images without captions).
        ks: the k values (a k at least the candidate count gives 100%).

    Returns:
        ``image_retrieval_recall@k``: text -> image, % of texts whose image is among the k most similar images;
        ``text_retrieval_recall@k``: image -> text, % of images with ANY of their captions among the k most
        similar texts. Ties are broken towards the lower index (deterministic).
    """
    ks = check_ks("ks", ks)
    images = as_tensor("image_embeds", image_embeds)
    texts = as_tensor("text_embeds", text_embeds)
    mapping = as_index_tensor("text_to_image", text_to_image)
    if images.dim() != 2 or texts.dim() != 2 or images.shape[1] != texts.shape[1]:
        raise DistillationInputError(
            f"image_embeds (N, D) and text_embeds (T, D) must share the embedding dim D; got {tuple(images.shape)} and "
            f"{tuple(texts.shape)}. Were both encoded by the same CLIP model?"
        )
    _check_mapping(mapping, texts.shape[0], images.shape[0])
    images = l2_normalize("image_embeds", images)
    texts = l2_normalize("text_embeds", texts)
    return _recall(lambda s, e: texts[s:e] @ images.T, lambda s, e: images[s:e] @ texts.T, mapping, images.shape[0], ks)
