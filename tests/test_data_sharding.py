"""Acceptance 1: 2 processes x 2 DataLoader workers under accelerate see every good key exactly once per epoch, and
every bad record is counted under its reason (in-band counters summed over workers and processes, and the per-worker
bad-record logs)."""

import json
import os
import subprocess
import sys
from collections import Counter

import pytest

from data_scripts.fixtures import write_wds
from hf_cifd.data import read_bad_records

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.mark.slow
def test_two_processes_two_workers_see_every_good_key_once_per_epoch(tmp_path):
    data = write_wds(str(tmp_path / "wds"), n_shards=8, per_shard=10, corrupt=(3,), empty_caption=(5, 8), gray=(1,))
    out = str(tmp_path / "out.json")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--multi_gpu",
           os.path.join(HERE, "data_scripts", "shard_run.py"), str(tmp_path / "wds"), str(tmp_path / "bad"), out]
    proc = subprocess.run(cmd, env=dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1"), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    result = json.load(open(out))
    assert result["num_processes"] == 2
    good = sorted(data["good"])
    assert len(good) == 56 and len(data["bad"]) == 24
    orders = []
    for epoch in result["epochs"]:
        per_rank = epoch["per_rank"]
        seen = Counter(k for r in per_rank for k in r["keys"])
        assert sorted(seen) == good, "a good key was lost or a bad one leaked"
        assert max(seen.values()) == 1, f"duplicated keys: {[k for k, c in seen.items() if c > 1]}"
        assert all(len(r["keys"]) > 0 and r["workers"] == [0, 1] for r in per_rank)  # 2 ranks x 2 busy workers
        assert not set(per_rank[0]["keys"]) & set(per_rank[1]["keys"])
        orders.append(per_rank[0]["keys"] + per_rank[1]["keys"])
    assert orders[0] != orders[1]  # the seeded shuffle changes with the epoch
    # counts summed over 2 processes x 2 workers: cumulative over the 2 epochs
    c1, c2 = result["epochs"][0]["counts"], result["epochs"][1]["counts"]
    expected = Counter(data["bad"].values())
    assert {r: c1[r] for r in expected} == dict(expected) == {"undecodable_image": 8, "empty_caption": 16}
    assert c1["seen"] == 80 and c1["converted_to_rgb"] == 8
    assert c2["seen"] == 160 and c2["undecodable_image"] == 16 and c2["empty_caption"] == 32
    logged = read_bad_records(str(tmp_path / "bad"))
    assert {k: v["reason"] for k, v in logged.items()} == data["bad"]
    assert len([f for f in os.listdir(tmp_path / "bad")]) == 4  # one log per (rank, worker)
