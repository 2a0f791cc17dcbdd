"""Acceptance 5 (zero-shot and retrieval metrics vs hand-computed values on tiny fixed embeddings) and 6 (bad input:
empty caption list, undecodable image, class names not matching the label count) through the CLIP evaluation driver."""

from __future__ import annotations

import io

import pytest
import torch
from PIL import Image

from hf_cifd.checks import DistillationInputError
from hf_cifd.eval.clip import CLIPEvaluator, evaluate_clip

# Image i is a 1x1 image whose red value is i; its embedding is IMG[i]. Text embeddings are looked up by string.
IMG = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.2]])
TXT = {"cat": [1.0, 0.1], "dog": [0.1, 1.0], "bird": [-1.0, 0.0],
       "c0": [1.0, 0.0], "c0b": [0.0, -1.0], "c1": [1.0, 0.05], "c2": [0.7, 0.7], "c3": [-1.0, 0.3]}
VOCAB = sorted(TXT)


class FakeCLIP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        self.txt = torch.tensor([TXT[w] for w in VOCAB])

    def encode_image(self, x):
        return IMG[x.long()]

    def encode_text(self, ids):
        return self.txt[ids.long()]


def image(i: int) -> Image.Image:
    return Image.new("RGB", (1, 1), (i, 0, 0))


def preprocess(img):
    return torch.tensor(img.getpixel((0, 0))[0])


def tokenizer(texts):
    return torch.tensor([VOCAB.index(t) for t in texts])


def test_zero_shot_and_retrieval_match_hand_computed_values():
    # Zero-shot: classes cat (0), dog (1), bird (2); one template "{c}" -> classifier columns = normalised TXT.
    # Image 0 [1,0]: cos cat .995, dog .0995, bird -1 -> cat (label 0: hit). Image 1 [0,1]: dog (label 1: hit).
    # Image 2 [1,1]: cat .774 vs dog .774 -> tie on cos: cat (1.1/sqrt(2.02)) == dog -> lower id cat; label 1: miss,
    # top-2 hit. Image 3 [-1,.2]: bird (label 2: hit). top1 = 3/4 = 75 %, top2 = 100 %.
    zs = [{"image": image(i), "label": lab} for i, lab in enumerate([0, 1, 1, 2])]
    # Retrieval: image 0 has captions c0, c0b; image 1: c1; image 2: c2; image 3: c3.
    rt = [{"image": image(0), "text": "c0\nc0b"}, {"image": image(1), "text": ["c1"]},
          {"image": image(2), "text": "c2"}, {"image": image(3), "text": "c3"}]
    out = evaluate_clip(FakeCLIP(), preprocess, tokenizer, zs, rt, classnames=["cat", "dog", "bird"], templates=["{c}"])
    assert out["zeroshot_top1"] == pytest.approx(75.0)
    assert out["zeroshot_top5"] == pytest.approx(100.0)  # k clipped to the 3 classes
    assert out["zeroshot_chance_top1"] == pytest.approx(100 / 3)
    # Text -> image (cosine): c0 [1,0] -> img0 (1.0) ok; c0b [0,-1] -> best img3 (-.196)... img0 is 0.0 > img3? cos
    # with img0 = 0, img1 = -1, img2 = -.707, img3 = -.196 -> img0 rank 1 ok; c1 [1,.05] -> img0 (.9988) vs img1
    # (.05): miss at R@1, img2 (.742) second, img1 third -> rank 3; c2 [.7,.7] -> img2 ok; c3 [-1,.3] -> img3 ok.
    # image_retrieval R@1 = 4/5 = 80, R@5 = 100.
    assert out["image_retrieval_recall@1"] == pytest.approx(80.0)
    assert out["image_retrieval_recall@5"] == pytest.approx(100.0)
    # Image -> text: img0 best text c0 (1.0) ok; img1 [0,1]: c2 .707, c3 .287, c1 .05 -> c1 rank 3: miss;
    # img2 [1,1]: c2 (1.0) ok; img3: c3 ok -> R@1 = 75, R@5 = 100.
    assert out["text_retrieval_recall@1"] == pytest.approx(75.0)
    assert out["text_retrieval_recall@5"] == pytest.approx(100.0)
    assert out["retrieval_num_images"] == 4 and out["retrieval_num_texts"] == 5
    assert out["retrieval_skipped_no_caption"] == 0 and out["zeroshot_skipped_undecodable"] == 0


def test_bad_input_counted_or_raised(tmp_path):
    bad_bytes = {"bytes": b"not an image at all", "path": None}
    buf = io.BytesIO()
    image(1).save(buf, format="PNG")
    rt = [{"image": image(0), "text": "c0"}, {"image": {"bytes": buf.getvalue()}, "text": "c1"},
          {"image": image(2), "text": ""},  # empty caption list: skipped WITH its image, counted
          {"image": image(3), "text": []},
          {"image": bad_bytes, "text": "c3"}]  # undecodable: skipped, counted
    ev = CLIPEvaluator(preprocess, tokenizer, retrieval_dataset=rt)
    out = ev(FakeCLIP())
    assert out["retrieval_skipped_no_caption"] == 2
    assert out["retrieval_skipped_undecodable"] == 1
    assert out["retrieval_num_images"] == 2 and out["retrieval_num_texts"] == 2
    # The metric is over the kept pairs only: c0 -> img0, c1 [1,.05] vs img0 [1,0] (.9988) and img1 [0,1] (.05): miss.
    assert out["image_retrieval_recall@1"] == pytest.approx(50.0)
    with pytest.raises(DistillationInputError, match="empty caption"):
        CLIPEvaluator(preprocess, tokenizer, retrieval_dataset=rt, on_bad="raise")
    with pytest.raises(DistillationInputError, match="undecodable"):
        CLIPEvaluator(preprocess, tokenizer, retrieval_dataset=[rt[0], rt[4]], on_bad="raise")

    zs = [{"image": image(0), "label": 0}, {"image": bad_bytes, "label": 1}, {"image": image(1), "label": 1}]
    out = CLIPEvaluator(preprocess, tokenizer, zs, classnames=["cat", "dog"], templates=["{c}"])(FakeCLIP())
    assert out["zeroshot_skipped_undecodable"] == 1 and out["zeroshot_num_images"] == 2
    assert out["zeroshot_top1"] == pytest.approx(100.0)

    # Class names that do not match the label count: a file with 2 names for a 3-class dataset ...
    names = tmp_path / "classnames.txt"
    names.write_text("cat\ndog\n")
    with pytest.raises(DistillationInputError, match="class"):
        CLIPEvaluator(preprocess, tokenizer, zs, classnames=str(names), templates=["{c}"], num_classes=3)
    # ... a label beyond the class names ...
    with pytest.raises(DistillationInputError, match="class-names"):
        CLIPEvaluator(preprocess, tokenizer, zs + [{"image": image(2), "label": 2}], classnames=str(names),
                      templates=["{c}"])
    # ... and a datasets ClassLabel with another count than the names given.
    import datasets

    ds = datasets.Dataset.from_dict({"image": [image(0)], "label": [0]}, features=datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b", "c"])}))
    with pytest.raises(DistillationInputError, match="3 classes"):
        CLIPEvaluator(preprocess, tokenizer, ds, classnames=["cat", "dog"], templates=["{c}"])


def test_shapes_webdataset_files_and_classnames(tmp_path):
    from hf_cifd.data import shapes

    paths = shapes.write_webdataset(str(tmp_path), 30, seed=0, shard_size=16, captions_per_image=2)
    assert len(paths) == 2
    names = (tmp_path / "classnames.txt").read_text().splitlines()
    assert len(names) == 24 and names[0] == "red circle"
    import datasets

    rows = list(datasets.load_dataset("webdataset", data_files={"train": paths}, split="train", streaming=True))
    assert len(rows) == 30
    for r in rows[:5]:
        caps = r["txt"].split("\n")
        assert len(caps) == 2 and all(names[int(r["cls"])] in c for c in caps)


def test_evaluator_streams_images_in_batches_and_keeps_none():
    class Recording(FakeCLIP):
        def __init__(self):
            super().__init__()
            self.image_batches = []

        def encode_image(self, x):
            self.image_batches.append(x.shape[0])
            return super().encode_image(x)

    zs = [{"image": image(i % 4), "label": i % 3} for i in range(10)]
    rt = [{"image": image(i % 4), "text": f"c{i % 4}"} for i in range(7)]
    ev = CLIPEvaluator(preprocess, tokenizer, zs, rt, classnames=["cat", "dog", "bird"], templates=["{c}"],
                       batch_size=4)
    # No decoded image is kept between evaluations: only labels, captions and keys.
    assert not any(isinstance(v, torch.Tensor) and v.dtype.is_floating_point for v in vars(ev).values())
    model = Recording()
    first = ev(model)
    assert model.image_batches == [4, 4, 2, 4, 3]  # 10 zero-shot then 7 retrieval images, 4 at a time
    assert ev(model) == first  # a second pass re-reads the same samples
    shuffled = CLIPEvaluator(preprocess, tokenizer, zs, classnames=["cat", "dog", "bird"], templates=["{c}"])
    zs.reverse()  # the dataset now yields another order than the evaluator read
    with pytest.raises(DistillationInputError, match="same order"):
        shuffled(FakeCLIP())
