"""`hf-cifd cache-teacher` then `hf-cifd train-rdms`, through the installed console script, on local webdataset shards
read by the same streaming loader as the Hub datasets."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from hf_cifd.data import TeacherCache
from hf_cifd.data.shapes import write_webdataset


def _hf_cifd(*args, timeout=300):
    exe = shutil.which("hf-cifd", path=os.path.dirname(sys.executable)) or shutil.which("hf-cifd")
    cmd = [exe] if exe else [sys.executable, "-m", "hf_cifd.cli"]
    out = subprocess.run([*cmd, *map(str, args)], capture_output=True, text=True, timeout=timeout,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    return out


@pytest.mark.slow
def test_cache_teacher_then_train_rdms(tmp_path):
    shards = write_webdataset(str(tmp_path / "data"), 48, size=32, shard_size=24)
    cache = tmp_path / "cache"
    out = _hf_cifd("cache-teacher", "--teacher", "cnn:cnn2", "--no_pretrained", "--num_classes", "24", "--dataset", "webdataset",
                   "--data_files", *shards, "--label_column", "cls", "--output_dir", cache, "--batch_size", "16",
                   "--shard_size", "16", "--num_workers", "0")
    assert "48" in out.stdout  # the summary names the sample count
    reader = TeacherCache(str(cache))
    assert len(reader) == 48 and reader.fields == {"teacher_image_embedding": 256, "teacher_logits": 24}

    rdms = tmp_path / "rdms"
    out = _hf_cifd("train-rdms", "--cache", cache, "--output_dir", rdms, "--rates", "10", "1", "--hidden_dims", "16",
                   "16", "16", "--epochs", "2", "--batch_size", "16", "--eval_fraction", "0.25")
    metrics = json.loads((rdms / "rdm_metrics.json").read_text())
    assert [r["rate_weight"] for r in metrics["rdms"]] == [10.0, 1.0]
    # No labels in a cache: agreement with the teacher is reported instead of accuracy; the teacher never ran.
    assert all(r["accuracy"] is None and 0 <= r["teacher_agreement"] <= 100 for r in metrics["rdms"])
    assert metrics["teacher_calls"] == 0
    assert (rdms / "rd_curve.png").exists() and (rdms / "rdm-image-1" / "model.safetensors").exists()
