"""Teacher-output cache: values, key join, errors, resumption, and a 2-process kill/resume (acceptance 3)."""

import glob
import json
import os
import signal
import subprocess
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch

from data_scripts.fixtures import kill_tree, make_teacher, tensor_transform, write_wds
from hf_cifd.checks import DistillationInputError
from hf_cifd.data import (
    CachedTeacherCollator,
    TeacherCache,
    cache_teacher_outputs,
    collate,
    load_image_dataset,
)

HERE = os.path.dirname(os.path.abspath(__file__))


class MapDataset(torch.utils.data.Dataset):
    """n samples with deterministic pixels; index 7 is a bad record (None)."""

    def __init__(self, n=50):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        if i == 7:
            return None
        g = torch.Generator().manual_seed(i)
        return {"pixel_values": torch.rand(3, 8, 8, generator=g), "labels": i % 5, "sample_key": f"img-{i:04d}"}


def _live(teacher, samples):
    with torch.no_grad():
        e, logits = teacher(torch.stack([s["pixel_values"] for s in samples]))
    return e, logits


def _raw_by_key(path):
    """{key: bytes of every field's stored row} read straight from the Arrow shards (bitwise comparison)."""
    import pyarrow as pa
    import pyarrow.ipc as ipc

    out = {}
    for f in glob.glob(os.path.join(path, "shards", "*.arrow")):
        t = ipc.open_file(pa.memory_map(f)).read_all()
        cols = [c for c in t.column_names if c != "sample_key"]
        arrays = {c: t.column(c).combine_chunks().flatten().to_numpy().reshape(t.num_rows, -1) for c in cols}
        for i, k in enumerate(t.column("sample_key").to_pylist()):
            assert k not in out
            out[k] = b"".join(arrays[c][i].tobytes() for c in sorted(cols))
    return out


def test_cache_values_match_live_teacher_and_reader_api(tmp_path):
    teacher, ds = make_teacher(0), MapDataset(50)
    report = cache_teacher_outputs(teacher, ds, str(tmp_path / "c16"), batch_size=8, shard_size=16, progress=False)
    assert report.teacher_calls == 49 and report.num_samples == 49 and report.skipped_records == 1
    assert report.written_shards == 4 and report.skipped_shards == 0
    assert report.fields == {"teacher_image_embedding": 16, "teacher_logits": 5}
    assert report.bytes_per_sample >= (16 + 5) * 2
    assert "for 12M samples" in report.summary()
    assert teacher.training  # the caller's train/eval mode is restored
    cache = TeacherCache(str(tmp_path / "c16"))
    assert len(cache) == 49 and cache.fields == report.fields
    assert set(cache.keys) == {f"img-{i:04d}" for i in range(50) if i != 7}
    assert "img-0003" in cache and "img-0007" not in cache
    assert cache.info["dtype"] == "float16" and cache.info["num_samples"] == 49
    assert cache.info["teacher"].endswith("TinyTeacher")
    keys = ["img-0042", "img-0001", "img-0017"]
    got = cache.get(keys)
    e, logits = _live(teacher, [ds[int(k[-4:])] for k in keys])
    assert got["teacher_image_embedding"].dtype == torch.float32
    torch.testing.assert_close(got["teacher_image_embedding"], e, atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(got["teacher_logits"], logits, atol=2e-3, rtol=2e-3)
    # fp32 caches are exact
    cache_teacher_outputs(teacher, ds, str(tmp_path / "c32"), dtype="float32", progress=False)
    got32 = TeacherCache(str(tmp_path / "c32")).get(keys)
    torch.testing.assert_close(got32["teacher_logits"], logits, atol=1e-6, rtol=1e-6)


def test_missing_keys_give_a_clear_error(tmp_path):
    cache_teacher_outputs(make_teacher(0), MapDataset(20), str(tmp_path / "c"), shard_size=8, progress=False)
    cache = TeacherCache(str(tmp_path / "c"))
    with pytest.raises(DistillationInputError) as err:
        cache.get(["img-0001", "img-0007", "nope", "img-0002"])
    msg = str(err.value)
    assert "no entry for 2 of 4 sample key(s)" in msg and "['img-0007', 'nope']" in msg
    assert "cache-teacher" in msg and "same dataset" in msg
    with pytest.raises(DistillationInputError, match="no entry for 1 of 3"):
        cache.check_covers(["img-0001", "img-0003", "img-0099"])
    cache.check_covers([f"img-{i:04d}" for i in range(20) if i != 7])
    with pytest.raises(DistillationInputError, match="not a teacher cache"):
        TeacherCache(str(tmp_path / "nothing"))
    with pytest.raises(DistillationInputError, match="dtype='float16'.*dtype='float32'"):
        cache_teacher_outputs(make_teacher(0), MapDataset(20), str(tmp_path / "c"), shard_size=8, dtype="float32",
                              progress=False)


def test_resume_recomputes_only_missing_shards_bitwise(tmp_path):
    teacher, ds = make_teacher(0), MapDataset(50)
    full = str(tmp_path / "full")
    cache_teacher_outputs(teacher, ds, full, batch_size=8, shard_size=16, progress=False)
    part = str(tmp_path / "part")
    cache_teacher_outputs(teacher, ds, part, batch_size=8, shard_size=16, progress=False, max_samples=50)
    os.remove(os.path.join(part, "shards", "shard-000001.arrow"))  # as if the run died while writing it
    open(os.path.join(part, "shards", ".shard-000001.arrow.tmp-r0-123"), "wb").write(b"partial")
    report = cache_teacher_outputs(teacher, ds, part, batch_size=8, shard_size=16, progress=False)
    assert report.skipped_shards == 3 and report.written_shards == 1
    assert report.teacher_calls == 16  # only shard 1 (indices 16..31) ran through the teacher again
    assert not glob.glob(os.path.join(part, "shards", ".*tmp*"))
    assert _raw_by_key(part) == _raw_by_key(full)


def test_streamed_cache_and_collator_in_workers(tmp_path):
    data = write_wds(str(tmp_path / "wds"), n_shards=2, per_shard=10)
    ds = load_image_dataset("webdataset", task="image-text", data_files={"train": data["files"]},
                            transform=tensor_transform)
    teacher = make_teacher(1)
    out = str(tmp_path / "cache")
    report = cache_teacher_outputs(teacher, ds, out, batch_size=3, shard_size=5, progress=False)
    assert report.teacher_calls == 16 and report.num_samples == 16 and report.written_shards == 4
    assert sorted(TeacherCache(out).keys) == sorted(data["good"])
    os.remove(os.path.join(out, "shards", "shard-w1r0-000003.arrow"))
    again = cache_teacher_outputs(teacher, ds, out, batch_size=3, shard_size=5, progress=False)
    assert (again.skipped_shards, again.teacher_calls) == (3, 1)
    # join streamed samples with the cache inside 2 DataLoader workers (the reader is reopened in each worker)
    loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=2,
                                         collate_fn=CachedTeacherCollator(out, collate))
    n = 0
    for batch in loader:
        e, logits = teacher(batch["pixel_values"])
        torch.testing.assert_close(batch["teacher_image_embedding"], e.detach(), atol=2e-3, rtol=2e-3)
        torch.testing.assert_close(batch["teacher_logits"], logits.detach(), atol=2e-3, rtol=2e-3)
        n += len(batch["sample_key"])
    assert n == 16


def _finished_shards(cache_dir):
    """Shards with their checksum entry: the writer's last step, so these are the ones a resume may reuse."""
    shards = glob.glob(os.path.join(cache_dir, "shards", "*.arrow"))
    return [s for s in shards if os.path.exists(s[: -len(".arrow")] + ".sha256")]


def _launch(wds, out, report, sleep=0.0, also=()):
    # `accelerate launch --cpu` starts ONE process whatever --num_processes says (simple_launcher); --multi_gpu runs
    # torchrun with 2 processes, and the script's Accelerator(cpu=True) uses gloo on the CPU.
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--multi_gpu",
           os.path.join(HERE, "data_scripts", "cache_run.py"), wds, out, report, "--sleep", str(sleep)]
    cmd += ["--also", *also] if also else []
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TQDM_DISABLE="1")
    return subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


@pytest.mark.slow
def test_two_process_cache_killed_and_resumed_is_bitwise_identical(tmp_path):
    data = write_wds(str(tmp_path / "wds"), n_shards=4, per_shard=12, corrupt=(3,), empty_caption=(5,))
    wds = str(tmp_path / "wds")
    ref, cut = str(tmp_path / "ref"), str(tmp_path / "cut")
    cut_proc = _launch(wds, cut, str(tmp_path / "cut.json"), sleep=0.4)
    deadline = time.time() + 120
    while len(_finished_shards(cut)) < 2:
        assert cut_proc.poll() is None, cut_proc.stdout.read().decode()[-3000:]
        assert time.time() < deadline, "the slow cache run never wrote 2 shards"
        time.sleep(0.05)
    kill_tree(cut_proc.pid)  # a real SIGKILL of the launcher, torchrun and both workers
    cut_proc.wait()
    # The kill may land between a shard's rename and its checksum entry: that shard is unfinished and is redone.
    done_before = len(_finished_shards(cut))
    assert 2 <= done_before < 10  # 2 ranks x 20 good samples / shard_size 4 = 10 shards

    # resume the killed cache, then (same 2 processes) write an uninterrupted reference cache
    resume_proc = _launch(wds, cut, str(tmp_path / "resume.json"), also=(ref, str(tmp_path / "ref.json")))
    assert resume_proc.wait(timeout=120) == 0, resume_proc.stdout.read().decode()[-3000:]
    rep = json.load(open(tmp_path / "resume.json"))
    ref_rep = json.load(open(tmp_path / "ref.json"))
    assert ref_rep["teacher_calls"] == 40 and ref_rep["num_samples"] == 40
    assert rep["skipped_shards"] == done_before and rep["written_shards"] == 10 - done_before
    assert rep["teacher_calls"] == 40 - 4 * done_before  # finished shards were not recomputed
    assert rep["num_samples"] == 40
    names = sorted(os.path.basename(f) for f in glob.glob(os.path.join(cut, "shards", "*.arrow")))
    assert names == [f"shard-w2r{r}-{j:06d}.arrow" for r in range(2) for j in range(5)]  # each rank its own shards
    a, b = _raw_by_key(cut), _raw_by_key(ref)
    assert sorted(a) == sorted(data["good"])
    assert a == b  # bitwise, key by key

    # the cached values are the live teacher's (fp16 tolerance)
    teacher = make_teacher(0)
    ds = load_image_dataset("webdataset", task="image-text", data_files={"train": data["files"]},
                            transform=tensor_transform)
    batch = collate(list(ds.take(12)))
    cached = TeacherCache(cut).get(batch["sample_key"])
    e, logits = _live(teacher, [{"pixel_values": p} for p in batch["pixel_values"]])
    torch.testing.assert_close(cached["teacher_image_embedding"], e, atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(cached["teacher_logits"], logits, atol=2e-3, rtol=2e-3)
