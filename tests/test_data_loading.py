"""Loading, decoding, transforms, bad-record accounting and collation (hf_cifd.data.loading / collate)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from data_scripts.fixtures import teacher_transform, tensor_transform, tokenizer, write_wds
from hf_cifd.checks import DistillationInputError
from hf_cifd.data import (
    StreamTracker,
    collate,
    find_processor,
    load_image_dataset,
    read_bad_records,
)


def _loader(ds, num_workers=0, batch_size=4):
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, num_workers=num_workers, collate_fn=collate)


def _drain(loader):
    tracker, keys, batches = StreamTracker(), [], []
    for batch in loader:
        tracker.observe(batch)
        keys.extend(batch["sample_key"])
        batches.append(batch)
    return keys, tracker, batches


def test_image_text_stream_skips_and_counts_bad_records(tmp_path):
    data = write_wds(str(tmp_path / "wds"), n_shards=4, per_shard=10, corrupt=(3,), empty_caption=(5, 8), gray=(1,))
    ds = load_image_dataset("webdataset", task="image-text", data_files={"train": data["files"]}, streaming=True,
                            transform=tensor_transform, teacher_transform=teacher_transform, tokenizer=tokenizer,
                            teacher_tokenizer=tokenizer, bad_records_dir=str(tmp_path / "bad"))
    keys, tracker, batches = _drain(_loader(ds, num_workers=2))
    assert sorted(keys) == sorted(data["good"]) and len(keys) == len(set(keys)) == 28
    counts = tracker.counts()
    assert counts["seen"] == 40
    assert counts["undecodable_image"] == 4 and counts["empty_caption"] == 8
    assert counts["converted_to_rgb"] == 4  # the grayscale JPEGs are kept, converted to RGB
    assert read_bad_records(str(tmp_path / "bad")) == {
        k: {"reason": r, "detail": read_bad_records(str(tmp_path / "bad"))[k]["detail"]} for k, r in data["bad"].items()
    }
    b = batches[0]
    assert b["pixel_values"].shape[1:] == (3, 8, 8) and b["pixel_values"].dtype == torch.float32
    assert torch.allclose(b["teacher_pixel_values"], b["pixel_values"] * 2 - 1)
    # the teacher tokenizer is the same callable: no duplicate teacher_input_ids
    assert b["input_ids"].shape[1:] == (6,) and "teacher_input_ids" not in b
    assert isinstance(b["text"], list) and b["text"][0].startswith("a photo number")
    assert isinstance(b["sample_key"], list) and all(isinstance(k, str) for k in b["sample_key"])
    assert "stream_state" not in b  # observed (popped) by the tracker


def test_classification_stream_labels_min_size_and_shared_transform(tmp_path):
    data = write_wds(str(tmp_path / "wds"), n_shards=2, per_shard=10, task="classification", corrupt=(2,),
                     empty_caption=(), missing_label=(4,), small=(7,), size=16)
    ds = load_image_dataset("webdataset", task="classification", data_files={"train": data["files"]},
                            transform=tensor_transform, min_image_size=8)
    keys, tracker, batches = _drain(_loader(ds))
    assert sorted(keys) == sorted(data["good"])
    c = tracker.counts()
    assert (c["undecodable_image"], c["missing_label"], c["image_too_small"]) == (2, 2, 2)
    labels = torch.cat([b["labels"] for b in batches])
    assert labels.dtype == torch.long
    expected = {f"s{s:02d}_{i:04d}": (s * 10 + i) % 5 for s in range(2) for i in range(10)}
    assert labels.tolist() == [expected[k] for k in keys]
    assert "teacher_pixel_values" not in batches[0]  # teacher transform None = shared


def test_bad_record_ceiling_aborts_through_dataloader_workers(tmp_path):
    data = write_wds(str(tmp_path / "wds"), n_shards=2, per_shard=20, corrupt=(3, 9), empty_caption=())
    ds = load_image_dataset("webdataset", task="image-text", data_files={"train": data["files"]},
                            transform=tensor_transform, max_bad_fraction=0.05, min_records_for_ceiling=10)
    with pytest.raises(DistillationInputError, match=r"too many bad records: 2 of 1\d records .*undecodable_image"):
        _drain(_loader(ds, num_workers=2))
    # the same data passes with a ceiling above its 10% bad rate
    ok = load_image_dataset("webdataset", task="image-text", data_files={"train": data["files"]},
                            transform=tensor_transform, max_bad_fraction=0.2, min_records_for_ceiling=10)
    assert len(_drain(_loader(ok, num_workers=2))[0]) == 36


def test_seeded_shuffle_buffer_epochs_and_max_samples(tmp_path):
    data = write_wds(str(tmp_path / "wds"), n_shards=4, per_shard=8, corrupt=(), empty_caption=())
    kw = dict(task="image-text", data_files={"train": data["files"]}, transform=tensor_transform, shuffle_buffer=16)

    def order(seed, epoch=0, **extra):
        ds = load_image_dataset("webdataset", seed=seed, **kw, **extra)
        ds.set_epoch(epoch)
        return _drain(_loader(ds))[0]

    a, b, c, e1 = order(0), order(0), order(1), order(0, epoch=1)
    assert a == b and sorted(a) == sorted(data["good"])
    assert a != c and sorted(c) == sorted(a)
    assert e1 != a and sorted(e1) == sorted(a)
    limited = order(0, max_samples=10)
    assert len(limited) == 10 and len(set(limited)) == 10


def test_parquet_map_style_and_streaming_ilsvrc_layout(tmp_path):
    import datasets
    from data_scripts.fixtures import jpeg_bytes

    images = [{"bytes": jpeg_bytes(i), "path": f"n0144_{i}.JPEG"} for i in range(12)]
    images[4] = {"bytes": b"broken", "path": "n0144_4.JPEG"}
    labels = [i % 3 for i in range(12)]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")})
    datasets.Dataset.from_dict({"image": images, "label": labels}, features=features).to_parquet(
        str(tmp_path / "train.parquet"))
    common = dict(task="classification", data_files={"train": str(tmp_path / "train.parquet")},
                  transform=tensor_transform, cache_dir=str(tmp_path / "hf_cache"))
    stream = load_image_dataset("parquet", streaming=True, **common)
    keys, tracker, _ = _drain(_loader(stream))
    assert keys == [f"n0144_{i}.JPEG" for i in range(12) if i != 4]  # key = the image path (no key column)
    assert tracker.counts()["undecodable_image"] == 1

    mapped = load_image_dataset("parquet", streaming=False, **common)
    assert len(mapped) == 12 and mapped[4] is None
    batch = collate([mapped[i] for i in range(6)])
    assert batch["sample_key"] == [f"n0144_{i}.JPEG" for i in (0, 1, 2, 3, 5)]
    assert batch["labels"].tolist() == [0, 1, 2, 0, 2]
    assert find_processor(mapped) is mapped.processor and find_processor(stream) is not None


def test_input_errors(tmp_path):
    data = write_wds(str(tmp_path / "wds"), n_shards=1, per_shard=4, corrupt=(), empty_caption=())
    with pytest.raises(DistillationInputError, match=r"column\(s\) \['label'\] not found.*label_column="):
        load_image_dataset("webdataset", task="classification", data_files={"train": data["files"]},
                           label_column="label")
    with pytest.raises(DistillationInputError, match="task must be one of"):
        load_image_dataset("webdataset", data_files={"train": data["files"]})
    with pytest.raises(DistillationInputError, match="different shapes under 'pixel_values'"):
        collate([{"pixel_values": torch.zeros(3, 4, 4)}, {"pixel_values": torch.zeros(3, 5, 5)}])


def test_hub_presets_keep_the_real_code_path(monkeypatch):
    """The Hub ids go through datasets.load_dataset(id, streaming=True) with the documented columns."""
    import datasets

    calls = {}

    def fake_load(path, split=None, streaming=None, **kw):
        calls.update(path=path, split=split, streaming=streaming)
        raise RuntimeError("offline")

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    with pytest.raises(RuntimeError):
        load_image_dataset("pixparse/cc12m-wds")
    assert calls == {"path": "pixparse/cc12m-wds", "split": "train", "streaming": True}
    from hf_cifd.data.loading import resolve_columns

    assert resolve_columns("pixparse/cc12m-wds", "image-text").__dict__ == {"image": "jpg", "label": None,
                                                                            "text": "txt", "key": "__key__"}
    assert resolve_columns("timm/imagenet-1k-wds", "classification").label == "cls"
    assert resolve_columns("ILSVRC/imagenet-1k", "classification").__dict__ == {"image": "image", "label": "label",
                                                                              "text": None, "key": None}
