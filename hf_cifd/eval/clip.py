"""Zero-shot classification and image<->text retrieval of a CLIP model (the driver around :mod:`hf_cifd.eval`).

:func:`evaluate_clip` is what ``hf-cifd eval`` calls; :class:`CLIPEvaluator` is the same thing as a callable
``evaluator(model) -> metrics`` for :class:`~hf_cifd.trainer.DistillationTrainer` (``evaluator=...``), whose
``evaluate()`` then logs the metrics as ``eval_*`` at every evaluation.

Datasets: any iterable of dict samples (a ``datasets`` Dataset / IterableDataset, a list), a local directory of
webdataset shards (``*.tar``, e.g. :mod:`hf_cifd.data.shapes` or a downloaded ``clip-benchmark/wds_*`` snapshot,
with its ``classnames.txt`` / ``zeroshot_classification_templates.txt``), or a Hub id (``clip-benchmark/wds_imagenet1k``,
``clip-benchmark/wds_flickr30k``; streamed, ``split="test"``). Columns: image ``image``/``jpg``/``png``/``webp``,
label ``label``/``cls``, captions ``text``/``txt`` (several captions joined by newlines, or a list).

Bad input: an image that fails to decode is skipped and counted (``*_skipped_undecodable``); a retrieval sample with
no caption is skipped with its image and counted (``retrieval_skipped_no_caption``) or, with ``on_bad="raise"``, any
of these raises; class names that do not match the dataset's label count raise :class:`DistillationInputError`.
"""

from __future__ import annotations

import glob
import logging
import os
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch

from ..adapters.open_clip import decode_image
from ..checks import DistillationInputError
from .classification import zero_shot_accuracy
from .retrieval import flatten_captions, retrieval_recall
from .zero_shot import encode_in_batches, load_classnames_and_templates, zero_shot_classifier

logger = logging.getLogger(__name__)

IMAGE_KEYS = ("image", "jpg", "jpeg", "png", "webp")
LABEL_KEYS = ("label", "labels", "cls")
TEXT_KEYS = ("text", "txt", "caption", "captions")


def _pick(sample: Mapping[str, Any], keys: Sequence[str], what: str):
    for k in keys:
        if k in sample:
            return sample[k]
    raise DistillationInputError(f"a sample has no {what} column (looked for {list(keys)}; it has {sorted(sample)}).")


def open_eval_dataset(source, split: str = "test"):
    """An iterable of samples from a dataset object, a local webdataset directory / shard list, or a Hub id."""
    if source is None or not isinstance(source, (str, os.PathLike, list, tuple)) or (
            isinstance(source, (list, tuple)) and source and not isinstance(source[0], str)):
        return source
    import datasets

    if isinstance(source, (list, tuple)):
        return datasets.load_dataset("webdataset", data_files={"test": list(source)}, split="test", streaming=True)
    if os.path.isdir(source):
        shards = sorted(glob.glob(os.path.join(source, "*.tar")))
        if not shards:
            raise DistillationInputError(f"{source!r} holds no webdataset shards (*.tar).")
        return datasets.load_dataset("webdataset", data_files={"test": shards}, split="test", streaming=True)
    return datasets.load_dataset(str(source), split=split, streaming=True)


def _captions(value) -> list[str]:
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if value is None:
        return []
    parts = value.strip().split("\n") if isinstance(value, str) else list(value)
    return [p.strip() for p in parts if isinstance(p, str) and p.strip()]


class CLIPEvaluator:
    """Callable ``evaluator(model) -> {"zeroshot_top1", "zeroshot_top5", "image_retrieval_recall@{1,5,10}",
    "text_retrieval_recall@{1,5,10}", counts...}`` over fixed evaluation data.

    Construction reads each dataset once to check it (labels, captions, undecodable images: counted or raised) and
    keeps only the labels and captions; every evaluation streams the images again in batches of ``batch_size``, so
    memory holds one batch of images plus the (N, D) embeddings, whatever the dataset size.

    Args:
        preprocess: the model's evaluation image transform (PIL -> tensor).
        tokenizer: the model's tokenizer (list of strings -> token ids).
        zeroshot_dataset / retrieval_dataset: see the module docstring (either may be None).
        classnames / templates: for zero-shot; default: from the dataset directory's files, the dataset's ClassLabel,
            or open_clip's ImageNet names and OpenAI templates (see ``hf_cifd.eval.load_classnames_and_templates``).
        num_classes: the dataset's label count when known (checked against the class names).
        on_bad: "skip" (count and skip bad samples) or "raise".
        max_samples: cap on samples read per dataset (None: all).
    """

    def __init__(self, preprocess: Callable, tokenizer: Callable, zeroshot_dataset=None, retrieval_dataset=None, *,
                 classnames: Sequence[str] | str | None = None, templates: Sequence | str | None = None,
                 num_classes: int | None = None, batch_size: int = 64, on_bad: str = "skip",
                 max_samples: int | None = None, split: str = "test"):
        if on_bad not in ("skip", "raise"):
            raise DistillationInputError(f"on_bad must be 'skip' or 'raise', got {on_bad!r}.")
        if zeroshot_dataset is None and retrieval_dataset is None:
            raise DistillationInputError("give a zeroshot_dataset and/or a retrieval_dataset to evaluate on.")
        self.preprocess, self.tokenizer, self.batch_size, self.on_bad = preprocess, tokenizer, batch_size, on_bad
        self.counts: dict[str, int] = {}
        self.zs_data = self.zs_labels = self.rt_data = None
        self.max_samples = max_samples
        if zeroshot_dataset is not None:
            source = zeroshot_dataset
            ds = open_eval_dataset(zeroshot_dataset, split)
            cn_path = classnames if isinstance(classnames, (str, os.PathLike)) else None
            tp_path = templates if isinstance(templates, (str, os.PathLike)) else None
            dir_source = source if isinstance(source, (str, os.PathLike)) and os.path.isdir(source) else None
            features_source = ds if getattr(ds, "features", None) else None
            if num_classes is None and features_source is not None:
                from datasets import ClassLabel

                labelled = [f for k, f in ds.features.items() if isinstance(f, ClassLabel)]
                num_classes = labelled[0].num_classes if len(labelled) == 1 else None
            if classnames is None or cn_path is not None or templates is None or tp_path is not None:
                names, temps = load_classnames_and_templates(
                    cn_path, tp_path, dataset=dir_source if dir_source else (
                        features_source if classnames is None and cn_path is None else None),
                    num_classes=num_classes if (classnames is None or cn_path is not None) else None)
                self.classnames = list(classnames) if classnames is not None and cn_path is None else names
                self.templates = list(templates) if templates is not None and tp_path is None else temps
            else:
                self.classnames, self.templates = list(classnames), list(templates)
            if num_classes is not None and len(self.classnames) != num_classes:
                raise DistillationInputError(
                    f"{len(self.classnames)} class names but the dataset has {num_classes} classes: the class-names "
                    "list does not belong to this dataset.")
            self.zs_data, self.zs_labels = ds, self._read_zeroshot(ds, max_samples)
        self.rt_texts = self.rt_owner = None
        if retrieval_dataset is not None:
            self.rt_data = open_eval_dataset(retrieval_dataset, split)
            self.rt_texts, self.rt_owner = self._read_retrieval(self.rt_data, max_samples)

    # -- reading -------------------------------------------------------------------------------------------------
    def _count(self, name: str, detail: str) -> None:
        if self.on_bad == "raise":
            raise DistillationInputError(detail)
        self.counts[name] = self.counts.get(name, 0) + 1
        logger.warning("skipping evaluation sample: %s", detail)

    def _image(self, sample, prefix: str):
        try:
            return self.preprocess(decode_image(_pick(sample, IMAGE_KEYS, "image")))
        except DistillationInputError as e:
            if "column" in str(e):
                raise
            self._count(f"{prefix}_skipped_undecodable", f"undecodable image in sample {sample.get('__key__', '?')}: {e}")
        except Exception as e:  # PIL's UnidentifiedImageError, truncated files, ...
            self._count(f"{prefix}_skipped_undecodable", f"undecodable image in sample {sample.get('__key__', '?')}: {e}")
        return None

    def _zeroshot_samples(self, ds: Iterable, max_samples):
        """``(image, label)`` per usable sample, in order; labels are checked, bad images counted or raised."""
        for i, sample in enumerate(ds):
            if max_samples is not None and i >= max_samples:
                break
            label = int(_pick(sample, LABEL_KEYS, "label"))
            if not 0 <= label < len(self.classnames):
                raise DistillationInputError(
                    f"label {label} of sample {sample.get('__key__', i)} is outside the {len(self.classnames)} class "
                    "names: the class-names file does not match this dataset's labels.")
            image = self._image(sample, "zeroshot")
            if image is not None:
                yield image, label

    def _read_zeroshot(self, ds: Iterable, max_samples):
        self.counts.setdefault("zeroshot_skipped_undecodable", 0)
        labels = [label for _, label in self._zeroshot_samples(ds, max_samples)]
        if not labels:
            raise DistillationInputError("no decodable images in the zero-shot dataset.")
        self.counts["zeroshot_num_images"] = len(labels)
        return torch.tensor(labels)

    def _retrieval_samples(self, ds: Iterable, max_samples):
        """``(image, captions, key)`` per usable sample, in order; bad samples counted or raised."""
        for i, sample in enumerate(ds):
            if max_samples is not None and i >= max_samples:
                break
            caps = _captions(_pick(sample, TEXT_KEYS, "caption"))
            key = str(sample.get("__key__", sample.get("key", i)))
            if not caps:
                self._count("retrieval_skipped_no_caption", f"sample {key} has an empty caption list")
                continue
            image = self._image(sample, "retrieval")
            if image is not None:
                yield image, caps, key

    def _read_retrieval(self, ds: Iterable, max_samples):
        self.counts.setdefault("retrieval_skipped_undecodable", 0)
        self.counts.setdefault("retrieval_skipped_no_caption", 0)
        captions, keys = [], []
        for _, caps, key in self._retrieval_samples(ds, max_samples):
            captions.append(caps)
            keys.append(key)
        if not captions:
            raise DistillationInputError("no usable (image, captions) samples in the retrieval dataset.")
        self.rt_keys = keys
        texts, owner = flatten_captions(captions, keys=keys)
        self.counts["retrieval_num_images"] = len(captions)
        self.counts["retrieval_num_texts"] = len(texts)
        return texts, owner

    def _encode_stream(self, samples: Iterable, encode: Callable, expected: list, what: str) -> torch.Tensor:
        """Embeddings of a stream's images, ``batch_size`` images in memory at a time; the samples' last fields
        (labels / keys) must be those read at construction."""
        feats, batch, seen = [], [], []
        for sample in samples:
            batch.append(sample[0])
            seen.append(sample[-1])
            if len(batch) == self.batch_size:
                feats.append(encode(torch.stack(batch)))
                batch = []
        if batch:
            feats.append(encode(torch.stack(batch)))
        if seen != expected:
            raise DistillationInputError(
                f"the {what} dataset gave other samples (or another order) than when the evaluator read it: pass a "
                "dataset that yields the same samples in the same order every time (no shuffling, not a one-shot "
                "iterator).")
        return torch.cat(feats)

    # -- evaluating ----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(self, model) -> dict[str, float]:
        net = getattr(model, "module", model)
        device = next(net.parameters()).device
        was_training = net.training
        net.eval()
        enc_img = lambda x: net.encode_image(x.to(device)).float()  # noqa: E731
        enc_txt = lambda t: net.encode_text(torch.as_tensor(t).to(device)).float()  # noqa: E731
        out: dict[str, float] = {}
        counts = dict(self.counts)  # the construction pass counted the bad samples; the re-reads skip them again
        try:
            if self.zs_data is not None:
                clf = zero_shot_classifier(enc_txt, self.tokenizer, self.classnames, self.templates,
                                           batch_size=self.batch_size, device=device)
                img = self._encode_stream(self._zeroshot_samples(self.zs_data, self.max_samples), enc_img,
                                          self.zs_labels.tolist(), "zero-shot")
                out.update(zero_shot_accuracy(img, clf, self.zs_labels, topk=(1, 5), num_classes=len(self.classnames)))
                out["zeroshot_chance_top1"] = 100.0 / len(self.classnames)
            if self.rt_data is not None:
                img = self._encode_stream(self._retrieval_samples(self.rt_data, self.max_samples), enc_img,
                                          self.rt_keys, "retrieval")
                txt = encode_in_batches(lambda t: enc_txt(self.tokenizer(list(t))), self.rt_texts, self.batch_size)
                out.update(retrieval_recall(img, txt, self.rt_owner, ks=(1, 5, 10)))
        finally:
            net.train(was_training)
            self.counts = counts
        out.update({k: float(v) for k, v in self.counts.items()})
        return out


def evaluate_clip(model, preprocess: Callable, tokenizer: Callable, zeroshot_dataset=None, retrieval_dataset=None,
                  classnames: Sequence[str] | str | None = None, templates: Sequence | str | None = None, *,
                  num_classes: int | None = None, batch_size: int = 64, on_bad: str = "skip",
                  max_samples: int | None = None, split: str = "test") -> dict[str, float]:
    """Zero-shot top-1/top-5 (%) and image<->text retrieval recall@1/5/10 (%) of an open_clip(-like) ``model``
    (anything with ``encode_image`` / ``encode_text``). See :class:`CLIPEvaluator` for the arguments."""
    evaluator = CLIPEvaluator(preprocess, tokenizer, zeroshot_dataset, retrieval_dataset, classnames=classnames,
                              templates=templates, num_classes=num_classes, batch_size=batch_size, on_bad=on_bad,
                              max_samples=max_samples, split=split)
    return evaluator(model)
