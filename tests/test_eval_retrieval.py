"""Image <-> text retrieval recall against hand-computed values (2-D embeddings given by angles)."""

import pytest
import torch

from hf_cifd.checks import DistillationInputError
from hf_cifd.eval import flatten_captions, retrieval_recall, retrieval_recall_from_similarity

from helpers import EXPECTED, IMAGES, TEXT_TO_IMAGE, TEXTS, hand_similarity




def test_retrieval_recall_hand_computed():
    assert retrieval_recall(IMAGES, TEXTS, TEXT_TO_IMAGE, ks=(1, 2, 10)) == EXPECTED


def test_from_similarity_hand_computed():
    assert retrieval_recall_from_similarity(hand_similarity(), TEXT_TO_IMAGE, ks=(1, 2, 10)) == EXPECTED
    out = retrieval_recall_from_similarity(hand_similarity().tolist(), TEXT_TO_IMAGE.tolist(), ks=(1,))
    assert out == {"image_retrieval_recall@1": 60.0, "text_retrieval_recall@1": pytest.approx(200 / 3)}


def test_default_ks_keys():
    out = retrieval_recall(IMAGES, TEXTS, TEXT_TO_IMAGE)
    assert list(out) == [f"{d}_retrieval_recall@{k}" for d in ("image", "text") for k in (1, 5, 10)]


def test_any_caption_counts_for_text_retrieval():
    # I0 has two captions; only its second one (T1) is its nearest text. Drop T1 -> I0 misses at @1.
    keep = [0, 2, 3, 4]
    out = retrieval_recall(IMAGES, TEXTS[keep], TEXT_TO_IMAGE[keep], ks=(1, 2))
    # I0 now: T0 60, T2 100, T4 110, T3 160 -> T0 rank 0 still! (T1 was the only closer one)
    # I1: T2 rank 0; I2: T3 rank 0, T4 rank 1 -> R@1 = 2/3
    assert out["text_retrieval_recall@1"] == pytest.approx(200 / 3)
    # text -> image for T0, T2, T3, T4: ranks 1, 0, 1, 0 -> 50 %
    assert out["image_retrieval_recall@1"] == 50.0


def test_ties_are_broken_towards_lower_index():
    # Two identical images, each with one identical caption: only the lower index wins each tie.
    images = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    texts = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    out = retrieval_recall(images, texts, torch.tensor([0, 1]), ks=(1, 2))
    assert out == {"image_retrieval_recall@1": 50.0, "image_retrieval_recall@2": 100.0,
                   "text_retrieval_recall@1": 50.0, "text_retrieval_recall@2": 100.0}


def test_flatten_captions():
    texts, mapping = flatten_captions(["a cat\nthe cat sits\n", ["a dog", " the dog "], "a bird"])
    assert texts == ["a cat", "the cat sits", "a dog", "the dog", "a bird"]
    assert mapping.tolist() == [0, 0, 1, 1, 2] and mapping.dtype == torch.long


def test_empty_captions_are_errors_naming_the_sample():
    with pytest.raises(DistillationInputError, match="sample 1 \\(key 'b'\\) has an empty caption list"):
        flatten_captions(["a cat", [], "a bird"], keys=["a", "b", "c"])
    with pytest.raises(DistillationInputError, match="sample 0 has an empty caption list"):
        flatten_captions(["  \n"])
    with pytest.raises(DistillationInputError, match="sample 0 caption 1 is empty"):
        flatten_captions(["a cat\n\nthe cat"])
    with pytest.raises(DistillationInputError, match="sample 1 caption 0 is empty"):
        flatten_captions([["x"], [""]])


def test_image_without_caption_is_an_error():
    with pytest.raises(DistillationInputError, match="1 image\\(s\\) have no caption \\(image index 1\\)"):
        retrieval_recall(IMAGES, TEXTS[:3], torch.tensor([0, 0, 2]))


def test_size_errors():
    with pytest.raises(DistillationInputError, match="text_to_image has 4 entries but there are 5 texts"):
        retrieval_recall(IMAGES, TEXTS, TEXT_TO_IMAGE[:4])
    with pytest.raises(DistillationInputError, match="share the embedding dim"):
        retrieval_recall(IMAGES, torch.ones(5, 3), TEXT_TO_IMAGE)
    with pytest.raises(DistillationInputError, match="only 3 images"):
        retrieval_recall(IMAGES, TEXTS, torch.tensor([0, 0, 1, 2, 3]))
    with pytest.raises(DistillationInputError, match="integer ids"):
        retrieval_recall(IMAGES, TEXTS, TEXT_TO_IMAGE.float())
    with pytest.raises(DistillationInputError, match="non-finite"):
        retrieval_recall_from_similarity(torch.full((5, 3), float("nan")), TEXT_TO_IMAGE)
