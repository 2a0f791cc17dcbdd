"""Acceptance 2: a streaming DistillationTrainer run (2 DataLoader workers, shuffle buffer) is SIGKILLed after k steps and
resumed from its last checkpoint: the steps before the checkpoint plus the resumed steps are exactly the batches of an
uninterrupted run (same keys, same order, no repeats, nothing skipped), across the epoch boundary."""

import glob
import json
import os
import subprocess
import sys
import time

import pytest
import torch

from data_scripts.fixtures import kill_tree, write_wds
from data_scripts.train_stream import BATCH, WORKERS, build_dataset
from hf_cifd.data import StreamTracker, collate

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, "data_scripts", "train_stream.py")


def _lines(path):
    with open(path) as f:
        return [r for r in (json.loads(line) for line in f if line.strip()) if "step" in r]


def _reference(wds_dir, epochs=2):
    """The batches of an uninterrupted run: the same dataset through a plain DataLoader, epoch by epoch."""
    ds = build_dataset(wds_dir)
    out, trackers = [], []
    for epoch in range(epochs):
        ds.set_epoch(epoch)
        tracker = StreamTracker()
        loader = torch.utils.data.DataLoader(ds, batch_size=BATCH, num_workers=WORKERS, collate_fn=collate)
        for batch in loader:
            tracker.observe(batch)
            out.append((epoch, batch["sample_key"]))
        trackers.append(tracker.counts())
    return out, trackers


@pytest.mark.slow
def test_killed_streaming_trainer_resumes_without_repeats_or_gaps(tmp_path):
    data = write_wds(str(tmp_path / "wds"), n_shards=6, per_shard=10, task="classification", corrupt=(3,),
                     empty_caption=(), missing_label=(6,))
    wds, out, log1, log2 = str(tmp_path / "wds"), str(tmp_path / "run"), str(tmp_path / "k1"), str(tmp_path / "k2")
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    first = subprocess.Popen([sys.executable, SCRIPT, wds, out, log1, "--sleep", "0.3"], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 180
    while not (os.path.exists(log1) and any(r["step"] >= 7 for r in _lines(log1))):
        assert first.poll() is None, first.stdout.read().decode()[-4000:]
        assert time.time() < deadline
        time.sleep(0.05)
    kill_tree(first.pid)  # SIGKILL mid-training (between checkpoint-6 and checkpoint-8)
    first.wait()
    ckpts = sorted(int(p.rsplit("-", 1)[1]) for p in glob.glob(os.path.join(out, "checkpoint-*")))
    last = ckpts[-1]
    assert 6 <= last < 16 and os.path.exists(os.path.join(out, f"checkpoint-{last}", "stream_state_rank0.json"))

    second = subprocess.run([sys.executable, SCRIPT, wds, out, log2, "--resume"], env=env, capture_output=True,
                            text=True, timeout=300)
    assert second.returncode == 0, second.stdout[-2000:] + second.stderr[-4000:]

    before = [r for r in _lines(log1) if r["step"] <= last]  # steps after the checkpoint are redone by design
    after = _lines(log2)
    assert [r["step"] for r in before] == list(range(1, last + 1))
    assert [r["step"] for r in after] == list(range(last + 1, 17))
    steps = before + after
    reference, ref_counts = _reference(wds)
    assert [(r["epoch"], r["keys"]) for r in steps] == [(e, k) for e, k in reference[:16]]
    epoch0 = [k for r in steps if r["epoch"] == 0 for k in r["keys"]]
    assert sorted(epoch0) == sorted(data["good"]) and len(epoch0) == len(set(epoch0)) == 48
    assert any(r["epoch"] == 1 for r in after)  # the resumed run crossed into the next data epoch
    # the bad-record counters survive the kill: epoch 0 is complete in the resumed run's state
    with open(log2) as f:
        ends = [r for r in (json.loads(line) for line in f) if "epoch_end" in r]
    assert ends[0]["epoch_end"] == 0 and ends[0]["counts"] == ref_counts[0]
    assert (ends[0]["counts"]["seen"], ends[0]["counts"]["undecodable_image"], ends[0]["counts"]["missing_label"]) == (
        60, 6, 6)
