"""Issue 10: the teacher cache knows its teacher, checks every shard, repairs bad shards, refuses NaN outputs."""

import os

import pytest
import torch

from data_scripts.fixtures import make_teacher
from hf_cifd import DistillationConfig, DistillationTrainer
from hf_cifd.checks import DistillationInputError
from hf_cifd.data import TeacherCache, cache_teacher_outputs
from test_cache import MapDataset, _raw_by_key


class Student(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed, self.head = torch.nn.Linear(3 * 8 * 8, 6), torch.nn.Linear(6, 5)

    def forward(self, pixel_values):
        e = self.embed(pixel_values.flatten(1))
        return e, self.head(e)


def _cache(tmp_path, name="c", teacher=None, ds=None):
    out = str(tmp_path / name)
    cache_teacher_outputs(teacher or make_teacher(0), ds or MapDataset(40), out, batch_size=8, shard_size=16,
                          progress=False)
    return out


def test_cache_used_with_another_teacher_is_an_error(tmp_path):
    path = _cache(tmp_path)
    args = DistillationConfig(output_dir=str(tmp_path / "out"), method="kd", report_to=[], use_cpu=True, max_steps=1)
    ds = [s for s in (MapDataset(40)[i] for i in range(40)) if s is not None]
    with pytest.raises(DistillationInputError, match="was written by another teacher: .*TinyTeacher"):
        DistillationTrainer(Student(), make_teacher(1), args=args, train_dataset=ds, teacher_cache=path)
    DistillationTrainer(Student(), make_teacher(0), args=args, train_dataset=ds, teacher_cache=path)  # its own teacher
    with pytest.raises(DistillationInputError, match="was written with fingerprint="):
        cache_teacher_outputs(make_teacher(1), MapDataset(40), path, batch_size=8, shard_size=16, progress=False)


@pytest.mark.parametrize("damage", ["truncated", "bit-flipped"])
def test_damaged_shard_is_named_and_the_writer_repairs_it(tmp_path, damage):
    path = _cache(tmp_path)
    reference = _raw_by_key(path)
    shard = os.path.join(path, "shards", "shard-000001.arrow")
    with open(shard, "r+b") as f:
        if damage == "truncated":
            f.truncate(os.path.getsize(shard) - 100)
        else:
            f.seek(os.path.getsize(shard) // 2)
            byte = f.read(1)
            f.seek(-1, 1)
            f.write(bytes([byte[0] ^ 0x10]))
    expected = "is truncated or altered" if damage == "truncated" else "fails its SHA-256 checksum"
    with pytest.raises(DistillationInputError, match=rf"shard {shard} {expected}"):
        len(TeacherCache(path))
    report = cache_teacher_outputs(make_teacher(0), MapDataset(40), path, batch_size=8, shard_size=16, progress=False)
    assert report.written_shards == 1 and report.skipped_shards == 2 and report.teacher_calls == 16
    assert len(TeacherCache(path)) == 39 and _raw_by_key(path) == reference
    info = TeacherCache(path).info
    assert info["fingerprint"]["architecture"].endswith("TinyTeacher") and len(info["fingerprint"]["weights_sha256"]) == 64


def test_nonfinite_teacher_outputs_are_refused_at_write_time_naming_the_key(tmp_path):
    class Poisoned(MapDataset):
        def __getitem__(self, i):
            s = super().__getitem__(i)
            if i == 21:
                s["pixel_values"][0, 0, 0] = float("nan")
            return s

    with pytest.raises(DistillationInputError, match=r"teacher_image_embedding is non-finite .* \['img-0021'\]"):
        _cache(tmp_path, ds=Poisoned(40))
