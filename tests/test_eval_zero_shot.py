"""Zero-shot classifier construction, class-name/template loading and zero-shot accuracy, checked against
hand-computed values."""

import math
import warnings

import pytest
import torch

from hf_cifd.checks import DistillationInputError
from hf_cifd.eval import (
    load_classnames_and_templates,
    topk_accuracy,
    zero_shot_accuracy,
    zero_shot_classifier,
)

# Classifier columns: class 0 at 0 deg, class 1 at 90, class 2 at 180, class 3 at 270 (2-D unit vectors).
CLASSIFIER = torch.tensor([[1.0, 0.0, -1.0, 0.0], [0.0, 1.0, 0.0, -1.0]])
# Images (deliberately not unit length). Class order by score, worked out by hand:
#   img0 (3, 0.3):    scores c0=1,  c1=.1, c2=-1, c3=-.1  -> c0 c1 c3 c2; label 0 -> rank 0
#   img1 (0.2, 1):    scores c0=.2, c1=1,  c2=-.2, c3=-1  -> c1 c0 c2 c3; label 0 -> rank 1
#   img2 (-2, -0.6):  scores c0=-1, c1=-.3, c2=1, c3=.3   -> c2 c3 c1 c0; label 1 -> rank 2
#   img3 (0.1, -1):   scores c0=.1, c1=-1, c2=-.1, c3=1   -> c3 c0 c2 c1; label 1 -> rank 3
IMAGES = torch.tensor([[3.0, 0.3], [0.2, 1.0], [-2.0, -0.6], [0.1, -1.0]])
LABELS = torch.tensor([0, 0, 1, 1])


def test_zero_shot_accuracy_hand_computed():
    out = zero_shot_accuracy(IMAGES, CLASSIFIER, LABELS, topk=(1, 2, 3))
    assert out == {"zeroshot_top1": 25.0, "zeroshot_top2": 50.0, "zeroshot_top3": 75.0}


def test_default_keys_and_topk_clipped_to_num_classes():
    with pytest.warns(UserWarning, match="clipped to 4"):
        out = zero_shot_accuracy(IMAGES, CLASSIFIER, LABELS)
    # top-5 with 4 classes is clipped to top-4: every label is somewhere in the 4 classes.
    assert out == {"zeroshot_top1": 25.0, "zeroshot_top5": 100.0}


def test_image_embeddings_are_normalised_inside():
    # Scaling one image does not change anything; labels all 2: image 2 is the only top-1 hit.
    scaled = IMAGES * torch.tensor([[10.0], [0.01], [5.0], [1.0]])
    out = zero_shot_accuracy(scaled, CLASSIFIER, torch.tensor([2, 2, 2, 2]), topk=(1,))
    assert out == {"zeroshot_top1": 25.0}


def test_topk_accuracy_on_hand_scores_matches():
    scores = torch.tensor([[1.0, 0.1, -1.0, -0.1], [0.2, 1.0, -0.2, -1.0], [-1.0, -0.3, 1.0, 0.3], [0.1, -1.0, -0.1, 1.0]])
    assert topk_accuracy(scores, LABELS, topk=(1, 2, 3)) == {"zeroshot_top1": 25.0, "zeroshot_top2": 50.0, "zeroshot_top3": 75.0}
    # numpy / list inputs work too
    assert topk_accuracy(scores.numpy(), LABELS.tolist(), topk=(2,)) == {"zeroshot_top2": 50.0}


def test_ties_go_to_lower_class_id():
    # Two identical columns (a duplicated class name, as ImageNet's "missile"): class 0 wins the tie.
    clf = torch.tensor([[1.0, 1.0], [0.0, 0.0]])
    out = zero_shot_accuracy(torch.tensor([[1.0, 0.0], [1.0, 0.0]]), clf, torch.tensor([0, 1]), topk=(1, 2))
    assert out == {"zeroshot_top1": 50.0, "zeroshot_top2": 100.0}


def _fake_text_model():
    # Each prompt maps to a fixed, NOT unit-length vector.
    table = {
        "a cat": [3.0, 0.0, 0.0],
        "a photo of cat": [0.0, 4.0, 0.0],
        "a dog": [0.0, 0.0, 2.0],
        "a photo of dog": [1.0, 1.0, 0.0],
    }
    vocab = list(table)
    vectors = torch.tensor([table[p] for p in vocab])
    calls = []

    def tokenizer(texts):
        return torch.tensor([vocab.index(t) for t in texts])

    def encode_text(ids):
        calls.append(ids.tolist())
        return vectors[ids]

    return tokenizer, encode_text, calls


@pytest.mark.parametrize("batch_size", [1, 3, 256])
def test_templated_classifier_equals_hand_average(batch_size):
    tokenizer, encode_text, calls = _fake_text_model()
    templates = ["a {c}", lambda c: f"a photo of {c}"]  # strings and callables mixed
    clf = zero_shot_classifier(encode_text, tokenizer, ["cat", "dog"], templates, batch_size=batch_size, device="cpu")
    r = 1 / math.sqrt(2)
    # cat: mean((1,0,0), (0,1,0)) = (.5,.5,0) -> (r, r, 0)
    # dog: mean((0,0,1), (r,r,0)) = (r/2, r/2, 1/2), norm sqrt(1/8+1/8+1/4) = r -> (1/2, 1/2, r)
    expected = torch.tensor([[r, 0.5], [r, 0.5], [0.0, r]])
    assert clf.shape == (3, 2)
    torch.testing.assert_close(clf, expected)
    assert all(len(c) <= batch_size for c in calls)
    assert sorted(i for c in calls for i in c) == [0, 1, 2, 3]  # each prompt encoded exactly once


def test_classifier_without_tokenizer_gets_raw_strings():
    seen = []

    def encode_text(texts):
        seen.extend(texts)
        return torch.tensor([[1.0, 0.0] if "cat" in t else [0.0, 2.0] for t in texts])

    clf = zero_shot_classifier(encode_text, None, ["cat", "dog"], ["a {c}.", "the {}"])
    assert seen == ["a cat.", "the cat", "a dog.", "the dog"]
    torch.testing.assert_close(clf, torch.tensor([[1.0, 0.0], [0.0, 1.0]]))


def test_template_without_placeholder_is_rejected():
    tokenizer, encode_text, _ = _fake_text_model()
    with pytest.raises(DistillationInputError, match="no '\\{c\\}' placeholder"):
        zero_shot_classifier(encode_text, tokenizer, ["cat"], ["a photo"])


def test_classifier_bad_encoder_output():
    with pytest.raises(DistillationInputError, match="one row per input"):
        zero_shot_classifier(lambda t: torch.ones(1, 2), None, ["cat", "dog"], ["a {c}"], batch_size=4)
    with pytest.raises(DistillationInputError, match="all-zero"):
        zero_shot_classifier(lambda t: torch.zeros(len(t), 2), None, ["cat"], ["a {c}"])


def test_load_from_clip_benchmark_files(tmp_path):
    (tmp_path / "classnames.txt").write_text("cat\ndog\nbird\n\n")  # trailing blank lines are fine
    (tmp_path / "zeroshot_classification_templates.txt").write_text("a photo of a {c}.\n\na {c}.\n")
    names, templates = load_classnames_and_templates(dataset=str(tmp_path), num_classes=3)
    assert names == ["cat", "dog", "bird"]
    assert templates == ["a photo of a {c}.", "a {c}."]
    names2, templates2 = load_classnames_and_templates(tmp_path / "classnames.txt", tmp_path / "zeroshot_classification_templates.txt")
    assert (names2, templates2) == (names, templates)


def test_class_names_count_mismatch_is_an_error(tmp_path):
    (tmp_path / "classnames.txt").write_text("cat\ndog\nbird\n")
    with pytest.raises(DistillationInputError, match="3 class names .* dataset has 10 classes"):
        load_classnames_and_templates(tmp_path / "classnames.txt", num_classes=10)
    # a classifier built from 3 names used on labels up to 9
    with pytest.raises(DistillationInputError, match="only 3 classes .* class-names count does not match"):
        zero_shot_accuracy(torch.eye(3), torch.eye(3), torch.tensor([0, 1, 9]))
    with pytest.raises(DistillationInputError, match="3 classes but num_classes=4"):
        zero_shot_accuracy(torch.eye(3), torch.eye(3), torch.tensor([0, 1, 2]), num_classes=4)


def test_bad_files(tmp_path):
    (tmp_path / "c.txt").write_text("cat\n\ndog\n")
    with pytest.raises(DistillationInputError, match="blank line at line 2"):
        load_classnames_and_templates(tmp_path / "c.txt")
    (tmp_path / "t.txt").write_text("a {c}.\na photo.\n")
    with pytest.raises(DistillationInputError, match="line 2 .* no '\\{c\\}'"):
        load_classnames_and_templates(templates_path=tmp_path / "t.txt")
    with pytest.raises(DistillationInputError, match="does not exist"):
        load_classnames_and_templates(tmp_path / "missing.txt")
    with pytest.raises(DistillationInputError, match="neither a local directory"):
        load_classnames_and_templates(dataset="clip-benchmark/wds_cars")


def test_defaults_are_open_clip_imagenet():
    names, templates = load_classnames_and_templates(num_classes=1000)
    assert len(names) == 1000 and names[0] == "tench"
    assert len(templates) == 80 and templates[0]("cat") == "a bad photo of a cat."
    names2, _ = load_classnames_and_templates(dataset="clip-benchmark/wds_imagenet1k")
    assert names2 == names


def test_shape_and_size_errors():
    with pytest.raises(DistillationInputError, match="looks transposed"):
        zero_shot_accuracy(torch.ones(2, 3), torch.ones(4, 3), torch.tensor([0, 1]))
    with pytest.raises(DistillationInputError, match="2 samples but labels has 3"):
        zero_shot_accuracy(torch.ones(2, 3), torch.ones(3, 4), torch.tensor([0, 1, 2]))
    with pytest.raises(DistillationInputError, match="integer ids"):
        zero_shot_accuracy(torch.ones(2, 3), torch.ones(3, 4), torch.tensor([0.0, 1.0]))
    with pytest.raises(DistillationInputError, match="all-zero"):
        zero_shot_accuracy(torch.zeros(2, 3), torch.ones(3, 4), torch.tensor([0, 1]))
    with pytest.raises(DistillationInputError, match="integers >= 1"):
        zero_shot_accuracy(IMAGES, CLASSIFIER, LABELS, topk=(0,))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no clipping warning when every k <= C
        zero_shot_accuracy(IMAGES, CLASSIFIER, LABELS, topk=(1, 4))
