"""Datasets for classification and image-text distillation, streamed from the Hub or read from local files.

:func:`load_image_dataset` wraps ``datasets.load_dataset`` (``streaming=True`` for the real runs). Everything per
record -- image decoding, RGB conversion, validation, the student's and the teacher's transforms, tokenisation -- is
done by a :class:`RecordProcessor` inside ``IterableDataset.map`` (streaming) or ``__getitem__`` (map-style), i.e. in
the DataLoader workers, never in the training process.

Bad records and how their counts get back
-----------------------------------------
Undecodable/missing images, empty or missing captions, missing labels and images smaller than ``min_image_size`` are
skipped (a batched ``map`` may return fewer rows than it received) and counted by reason inside the worker. Worker
processes cannot share Python objects, so the counts travel *in band*: every emitted sample carries its worker's id,
the worker's stream position and cumulative counters (``_worker``, ``_pos``, ``_counts``); :func:`collate` folds them
into ``batch["stream_state"]`` and :class:`~hf_cifd.data.stats.StreamTracker` keeps the latest value per worker in
the training process (summing workers, then processes with ``torch.distributed``). Each bad record is also logged
(first ``log_first`` per worker, then every 1000th) and, when ``bad_records_dir`` is given, appended to a per-rank,
per-worker JSONL file (``read_bad_records`` merges them), which also covers bad records after the last good one.

The ceiling (``max_bad_fraction``, default 1%) is checked in each worker on its own counts once it has seen
``min_records_for_ceiling`` records, and raises :class:`DistillationInputError` (re-raised by the DataLoader in the
training process). The overall bad fraction is a weighted mean of the workers' fractions, so whenever the global rate
is above the ceiling at least one worker's rate is too: per-worker checking never misses a global violation.

Sharding
--------
The streamed dataset stays a ``datasets.IterableDataset``: accelerate (Trainer or ``accelerator.prepare``) gives each
process whole source shards (``IterableDataset.shard``) when ``n_shards >= num_processes``, and ``datasets`` splits a
process's shards among its DataLoader workers. Do not call ``split_dataset_by_node`` on top of that. Use at least
``num_processes * num_workers`` source shards (tar files) so no worker idles.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch

from ..checks import DistillationInputError

logger = logging.getLogger(__name__)

TASKS = ("classification", "image-text")
BAD_REASONS = ("missing_image", "undecodable_image", "image_too_small", "missing_label", "empty_caption")

# Column layouts of the Hub datasets the recipes use (overridable by explicit column arguments).
PRESETS: dict[str, dict[str, Any]] = {
    "pixparse/cc12m-wds": {"task": "image-text", "image": "jpg", "text": "txt", "key": "__key__"},
    "pixparse/cc3m-wds": {"task": "image-text", "image": "jpg", "text": "txt", "key": "__key__"},
    "timm/imagenet-1k-wds": {"task": "classification", "image": "jpg", "label": "cls", "key": "__key__"},
    "ILSVRC/imagenet-1k": {"task": "classification", "image": "image", "label": "label", "key": None},
    "webdataset": {"image": "jpg", "label": "cls", "text": "txt", "key": "__key__"},
    "imagefolder": {"task": "classification", "image": "image", "label": "label", "key": None},
}


@dataclass
class Columns:
    image: str
    label: str | None = None
    text: str | None = None
    key: str | None = None


def resolve_columns(path: str, task: str, image_column=None, label_column=None, text_column=None,
                    key_column=None) -> Columns:
    preset = PRESETS.get(path, {})
    image = image_column or preset.get("image") or "image"
    key = key_column if key_column is not None else preset.get("key", "__key__")
    if task == "classification":
        return Columns(image=image, label=label_column or preset.get("label") or "label", key=key)
    return Columns(image=image, text=text_column or preset.get("text") or "txt", key=key)


class BadRecord(Exception):
    def __init__(self, reason: str, detail: str = ""):
        super().__init__(reason)
        self.reason = reason
        self.detail = detail


def _decode_image(value, min_size: int | None):
    from PIL import Image

    if value is None:
        raise BadRecord("missing_image")
    if isinstance(value, Image.Image):
        img = value
    else:
        data = None
        if isinstance(value, Mapping):
            data = value.get("bytes")
            if data is None and value.get("path"):
                try:
                    with open(value["path"], "rb") as f:
                        data = f.read()
                except OSError as e:
                    raise BadRecord("missing_image", str(e)) from None
        elif isinstance(value, (bytes, bytearray, memoryview)):
            data = bytes(value)
        else:
            try:
                import numpy as np

                if isinstance(value, np.ndarray):
                    img = Image.fromarray(value)
                    data = False
            except Exception:
                pass
        if data is None or (data is not False and len(data) == 0):
            raise BadRecord("missing_image")
        if data is not False:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    img = Image.open(io.BytesIO(data))
                    img.load()
            except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError, ...
                raise BadRecord("undecodable_image", f"{type(e).__name__}: {e}") from None
    converted = False
    if img.mode != "RGB":
        if img.mode in ("P", "LA", "PA") or (img.mode == "RGBA"):
            img = img.convert("RGBA")
        img = img.convert("RGB")
        converted = True
    if min_size and min(img.size) < min_size:
        raise BadRecord("image_too_small", f"{img.size[0]}x{img.size[1]} < {min_size}")
    return img, converted


def _tokens(tokenizer: Callable, text: str) -> torch.Tensor:
    out = tokenizer(text)
    if isinstance(out, Mapping) or (hasattr(out, "keys") and "input_ids" in out.keys()):
        out = out["input_ids"]
    out = torch.as_tensor(out)
    if out.dim() == 2 and out.shape[0] == 1:
        out = out[0]
    return out.long()


def _default_transform(img):
    import numpy as np

    arr = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy())
    return arr.permute(2, 0, 1).float().div_(255.0)


class RecordProcessor:
    """Turns raw records into batch-contract samples (picklable; runs in DataLoader workers).

    Used as a batched ``IterableDataset.map`` function with ``with_indices=True`` (the indices are the worker-local
    positions in the raw stream, which make exact resumption possible: see :mod:`hf_cifd.data.stats`) or per record
    via :meth:`process_one` for map-style datasets.
    """

    def __init__(self, *, task: str, columns: Columns, transform: Callable | None = None,
                 teacher_transform: Callable | None = None, tokenizer: Callable | None = None,
                 teacher_tokenizer: Callable | None = None, view: Callable | None = None,
                 min_image_size: int | None = None,
                 max_bad_fraction: float = 0.01, min_records_for_ceiling: int = 1000,
                 bad_records_dir: str | None = None, log_first: int = 10):
        if task not in TASKS:
            raise DistillationInputError(f"task must be one of {TASKS}, got {task!r}.")
        if not (0.0 <= max_bad_fraction <= 1.0):
            raise DistillationInputError(f"max_bad_fraction must be in [0, 1], got {max_bad_fraction!r}.")
        self.task = task
        self.columns = columns
        if view is not None and (transform is not None or teacher_transform is not None):
            raise DistillationInputError(
                "give either view= (one shared view, each model's own finishing: hf_cifd.data.views.SharedView) or "
                "transform= / teacher_transform=, not both.")
        self.view = view
        self.transform = transform or _default_transform
        self.teacher_transform = teacher_transform if teacher_transform is not transform else None
        self.tokenizer = tokenizer
        self.teacher_tokenizer = teacher_tokenizer if teacher_tokenizer is not tokenizer else None
        self.min_image_size = min_image_size
        self.max_bad_fraction = max_bad_fraction
        self.min_records_for_ceiling = min_records_for_ceiling
        self.bad_records_dir = bad_records_dir
        self.log_first = log_first
        self.resume_positions: dict[int, int] = {}
        self._reset()

    def _reset(self):
        self.counts = {"seen": 0, "converted_to_rgb": 0, **{r: 0 for r in BAD_REASONS}}
        self._last_index = -1

    @staticmethod
    def _worker() -> tuple[int, int]:
        info = torch.utils.data.get_worker_info()
        return (info.id, info.num_workers) if info is not None else (0, 0)

    # -- per record --------------------------------------------------------------------------------------------
    def _key(self, record: Mapping[str, Any], index: int | None) -> str:
        col = self.columns.key
        if col and record.get(col) is not None:
            return str(record[col])
        image = record.get(self.columns.image)
        if isinstance(image, Mapping):
            if image.get("path"):
                return str(image["path"])
            if image.get("bytes"):
                return "sha1:" + hashlib.sha1(image["bytes"]).hexdigest()[:20]
        if index is not None:
            return str(index)
        raise DistillationInputError(
            f"cannot derive a sample key: no key column {col!r} and the image has no path; pass key_column=..."
        )

    def process_one(self, record: Mapping[str, Any], index: int | None = None) -> dict[str, Any] | None:
        """The sample for ``record``, or None when it is bad (counted, logged, ceiling checked)."""
        self.counts["seen"] += 1
        key = None
        try:
            key = self._key(record, index)
            sample = self._build(record, key)
        except BadRecord as bad:
            self._bad(bad, key)
            return None
        self._check_ceiling()
        return sample

    def _build(self, record: Mapping[str, Any], key: str) -> dict[str, Any]:
        c = self.columns
        if self.task == "classification":
            label = record.get(c.label)
            try:
                ok = label is not None and not isinstance(label, (bool, str)) and int(label) == label and int(label) >= 0
            except (TypeError, ValueError):
                ok = False
            if not ok:
                raise BadRecord("missing_label", repr(label))
        else:
            text = record.get(c.text)
            if isinstance(text, bytes):
                text = text.decode("utf-8", "replace")
            if not isinstance(text, str) or not text.strip():
                raise BadRecord("empty_caption", repr(text)[:40])
        img, converted = _decode_image(record.get(c.image), self.min_image_size)
        if converted:
            self.counts["converted_to_rgb"] += 1
        if self.view is not None:  # one random geometry, each model's own resize + normalisation
            student, teacher = self.view(img)
            sample: dict[str, Any] = {"pixel_values": student}
            if teacher is not None:
                sample["teacher_pixel_values"] = teacher
        else:
            sample = {"pixel_values": self.transform(img)}
            if self.teacher_transform is not None:
                sample["teacher_pixel_values"] = self.teacher_transform(img)
        if self.task == "classification":
            sample["labels"] = int(label)
        else:
            sample["text"] = text
            if self.tokenizer is not None:
                sample["input_ids"] = _tokens(self.tokenizer, text)
            if self.teacher_tokenizer is not None:
                sample["teacher_input_ids"] = _tokens(self.teacher_tokenizer, text)
        sample["sample_key"] = key
        return sample

    def _bad(self, bad: BadRecord, key: str | None) -> None:
        self.counts[bad.reason] += 1
        n = self.counts[bad.reason]
        worker, _ = self._worker()
        if n <= self.log_first or n % 1000 == 0:
            logger.warning("skipping bad record %s (%s%s) [worker %d: %d %s so far]", key, bad.reason,
                           f": {bad.detail}" if bad.detail else "", worker, n, bad.reason)
        if self.bad_records_dir:
            os.makedirs(self.bad_records_dir, exist_ok=True)
            rank = int(os.environ.get("RANK", "0"))
            path = os.path.join(self.bad_records_dir, f"bad-records-rank{rank}-worker{worker}.jsonl")
            with open(path, "a") as f:
                f.write(json.dumps({"key": key, "reason": bad.reason, "detail": bad.detail[:200]}) + "\n")
        self._check_ceiling()

    def bad_total(self) -> int:
        return sum(self.counts[r] for r in BAD_REASONS)

    def _check_ceiling(self) -> None:
        seen, bad = self.counts["seen"], self.bad_total()
        if seen >= self.min_records_for_ceiling and bad > self.max_bad_fraction * seen:
            by_reason = {r: self.counts[r] for r in BAD_REASONS if self.counts[r]}
            raise DistillationInputError(
                f"too many bad records: {bad} of {seen} records seen by one data worker are bad "
                f"({bad / seen:.1%} > max_bad_fraction={self.max_bad_fraction:.1%}); by reason: {by_reason}. Check "
                "the column names (image/label/text) and the data files; raise max_bad_fraction to accept this."
            )

    # -- batched IterableDataset.map ----------------------------------------------------------------------------
    def __call__(self, batch: Mapping[str, list], indices: list[int]) -> dict[str, list]:
        if indices and indices[0] <= self._last_index:  # a new pass over the stream (num_workers=0: same object)
            self._reset()
        if indices:
            self._last_index = indices[-1]
        worker, _ = self._worker()
        start = self.resume_positions.get(worker, 0)
        names = list(batch)
        out: dict[str, list] = {}
        rows = []
        for j, idx in enumerate(indices):
            if idx < start:  # consumed before the checkpoint we resume from: skip without decoding
                continue
            record = {name: batch[name][j] for name in names}
            sample = self.process_one(record)
            if sample is None:
                continue
            sample["_worker"] = worker
            sample["_pos"] = idx + 1
            sample["_counts"] = dict(self.counts)
            rows.append(sample)
        keys = list(rows[0]) if rows else self._output_keys()
        for k in keys:
            out[k] = [r.get(k) for r in rows]
        return out

    def _output_keys(self) -> list[str]:
        keys = ["pixel_values"]
        if self.teacher_transform is not None or (self.view is not None and not getattr(self.view, "same", False)):
            keys.append("teacher_pixel_values")
        if self.task == "classification":
            keys.append("labels")
        else:
            keys.append("text")
            if self.tokenizer is not None:
                keys.append("input_ids")
            if self.teacher_tokenizer is not None:
                keys.append("teacher_input_ids")
        return keys + ["sample_key", "_worker", "_pos", "_counts"]


class MapStyleImageDataset(torch.utils.data.Dataset):
    """Map-style counterpart: ``__getitem__`` decodes and transforms one record (``None`` when bad)."""

    def __init__(self, records, processor: RecordProcessor):
        self.records = records
        self.processor = processor

    def __len__(self):
        return len(self.records)

    def __getitem__(self, i):
        sample = self.processor.process_one(self.records[int(i)], index=int(i))
        if sample is not None:
            sample["_worker"] = self.processor._worker()[0]
            sample["_pos"] = -1
            sample["_counts"] = dict(self.processor.counts)
        return sample


def load_image_dataset(
    path: str,
    *,
    task: str | None = None,
    data_files=None,
    split: str = "train",
    streaming: bool = True,
    image_column: str | None = None,
    label_column: str | None = None,
    text_column: str | None = None,
    key_column: str | None = None,
    transform: Callable | None = None,
    teacher_transform: Callable | None = None,
    tokenizer: Callable | None = None,
    teacher_tokenizer: Callable | None = None,
    view: Callable | None = None,
    shuffle_buffer: int | None = None,
    seed: int = 0,
    max_samples: int | None = None,
    min_image_size: int | None = None,
    max_bad_fraction: float = 0.01,
    min_records_for_ceiling: int = 1000,
    bad_records_dir: str | None = None,
    map_batch_size: int = 16,
    dataset=None,
    **load_kwargs,
):
    """A dataset of batch-contract samples for ``task`` ("classification" or "image-text").

    ``path`` is a Hub id (``pixparse/cc12m-wds``, ``timm/imagenet-1k-wds``, ``ILSVRC/imagenet-1k``) or a builder
    (``webdataset``, ``imagefolder``, ``parquet``) with ``data_files``. ``streaming=True`` returns a
    ``datasets.IterableDataset`` (pass it to Trainer / ``accelerator.prepare`` as is; use :func:`collate`);
    ``streaming=False`` a map-style :class:`MapStyleImageDataset` (bad records are ``None``, dropped by
    :func:`collate`). ``transform`` / ``teacher_transform`` map a PIL RGB image to a tensor (``teacher_transform``
    None = shared, no ``teacher_pixel_values``); ``view`` instead maps it to ``(student, teacher or None)`` from ONE
    random view (:class:`hf_cifd.data.views.SharedView`: what a teacher / student pair with different preprocessing
    needs, so both describe the same crop); ``tokenizer`` / ``teacher_tokenizer`` map a caption to token ids.
    ``shuffle_buffer``: seeded shuffle of the shard order and of a buffer of that many records (streaming).
    ``dataset``: an already loaded ``datasets`` dataset to use instead of calling ``load_dataset``.
    """
    import datasets

    preset = PRESETS.get(path, {})
    task = task or preset.get("task")
    if task not in TASKS:
        raise DistillationInputError(
            f"task must be one of {TASKS} (no default for {path!r}), got {task!r}: pass task='classification' "
            "(image + label columns) or task='image-text' (image + caption columns)."
        )
    if max_samples is not None and (not isinstance(max_samples, int) or max_samples <= 0):
        raise DistillationInputError(f"max_samples must be a positive int or None, got {max_samples!r}.")
    cols = resolve_columns(path, task, image_column, label_column, text_column, key_column)
    if dataset is None:
        kwargs = dict(load_kwargs)
        if data_files is not None:
            kwargs["data_files"] = data_files
        ds = datasets.load_dataset(path, split=split, streaming=streaming, **kwargs)
    else:
        ds = dataset
    names = ds.column_names
    if names is not None:
        needed = [cols.image] + ([cols.label] if task == "classification" else [cols.text])
        missing = [c for c in needed if c not in names]
        if missing:
            raise DistillationInputError(
                f"{path}: column(s) {missing} not found; the dataset has {names}. Pass image_column=, "
                f"{'label_column=' if task == 'classification' else 'text_column='} (and key_column=) to match."
            )
        if cols.key and cols.key not in names:
            cols.key = None
    features = getattr(ds, "features", None)
    if features is not None and isinstance(features.get(cols.image), datasets.Image):
        ds = ds.cast_column(cols.image, datasets.Image(decode=False))  # we decode (and catch errors) ourselves
    processor = RecordProcessor(task=task, columns=cols, transform=transform, teacher_transform=teacher_transform,
                                tokenizer=tokenizer, teacher_tokenizer=teacher_tokenizer, view=view,
                                min_image_size=min_image_size, max_bad_fraction=max_bad_fraction,
                                min_records_for_ceiling=min_records_for_ceiling, bad_records_dir=bad_records_dir)
    if isinstance(ds, datasets.IterableDataset):
        if shuffle_buffer:
            ds = ds.shuffle(seed=seed, buffer_size=int(shuffle_buffer))
        if max_samples is not None:
            ds = ds.take(max_samples)
        ds = ds.map(processor, batched=True, batch_size=map_batch_size, with_indices=True,
                    remove_columns=names if names is not None else None)
        ds.hf_cifd_processor = processor
        return ds
    if max_samples is not None:
        ds = ds.select(range(min(max_samples, len(ds))))
    return MapStyleImageDataset(ds, processor)


def find_processor(dataset) -> RecordProcessor | None:
    """The :class:`RecordProcessor` inside a dataset built by :func:`load_image_dataset` (also after ``shard``,
    ``shuffle``, accelerate's wrapping), or None."""
    seen = set()
    stack = [dataset]
    while stack:
        obj = stack.pop()
        if obj is None or id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, RecordProcessor):
            return obj
        for attr in ("hf_cifd_processor", "processor", "function", "_ex_iterable", "ex_iterable", "dataset",
                     "base_dataset"):
            stack.append(getattr(obj, attr, None))
    return None


def read_bad_records(directory: str) -> dict[str, dict[str, str]]:
    """Merged per-worker bad-record logs: ``{key: {"reason": ..., "detail": ...}}`` (deduplicated)."""
    out: dict[str, dict[str, str]] = {}
    if not os.path.isdir(directory):
        return out
    for name in sorted(os.listdir(directory)):
        if name.startswith("bad-records-") and name.endswith(".jsonl"):
            with open(os.path.join(directory, name)) as f:
                for line in f:
                    if line.strip():
                        rec = json.loads(line)
                        out[str(rec["key"])] = {"reason": rec["reason"], "detail": rec.get("detail", "")}
    return out
