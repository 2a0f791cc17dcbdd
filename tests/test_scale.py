"""Runs users launch at scale: the world-size guard, mixed precision, multi-process metrics, DeepSpeed ZeRO-2/3."""

from __future__ import annotations

import os
import subprocess

import pytest
import torch

from helpers import TORCHRUN

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = os.path.join(ROOT, "tests", "data_scripts")


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("ACCELERATE_USE_CPU", "WORLD_SIZE", "RANK")}
    return {**env, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join([ROOT, env.get("PYTHONPATH", "")]), **extra}


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a host where the processes cannot find a GPU")
def test_processes_that_each_see_one_process_stop(tmp_path):
    # Plain torchrun without ACCELERATE_USE_CPU / use_cpu: each accelerator reports rank 0 of 1.
    res = subprocess.run([*TORCHRUN, os.path.join(SCRIPTS, "world_size_guard.py"), str(tmp_path / "out")],
                         capture_output=True, text=True, timeout=300, env=_env(), cwd=str(tmp_path))
    assert res.returncode != 0, res.stdout
    for rank in ("0", "1"):
        assert f"rank {rank} train_rdms: this process was started as one of WORLD_SIZE=2 processes" in res.stdout
    assert "trainer: started" not in res.stdout and "train_rdms: started" not in res.stdout
    assert "its accelerator sees a single process" in res.stderr and "ACCELERATE_USE_CPU=1" in res.stderr


@pytest.mark.slow
def test_train_rdms_metrics_cover_every_held_out_sample_across_processes(tmp_path):
    import json

    from helpers import TinyNet, toy_dataset
    from hf_cifd import RateDistortionModule

    out = tmp_path / "rdms"
    res = subprocess.run([*TORCHRUN, os.path.join(SCRIPTS, "rdm_gather.py"), str(out)], capture_output=True, text=True,
                         timeout=300, env=_env(ACCELERATE_USE_CPU="1"), cwd=str(tmp_path))
    assert res.returncode == 0, res.stderr[-4000:]
    saved = json.loads((out / "rdm_metrics.json").read_text())
    # 13 held-out samples over 2 processes (7 + 6, one repeated to even out the batches, then dropped).
    assert [row["samples"] for row in saved["rdms"]] == [13, 13]
    # Independent single-process reference: the saved RDMs and teacher on all 13 samples.
    teacher = TinyNet()
    teacher.load_state_dict(torch.load(out / "teacher.pt"))
    data = toy_dataset(13, seed=1)
    with torch.no_grad():
        emb, logits = teacher(data[:]["pixel_values"])
        labels = data[:]["labels"]
        assert saved["teacher_accuracy"] == pytest.approx(100.0 * (logits.argmax(-1) == labels).float().mean().item())
        for i, row in enumerate(saved["rdms"]):
            rdm = RateDistortionModule.from_pretrained(str(out / f"rdm-image-{i}")).eval()
            o = rdm(emb)
            assert row["rate_bits"] == pytest.approx(o.rate.mean().item(), rel=1e-5)
            assert row["distortion"] == pytest.approx(((o.embedding - emb) ** 2).mean().item()
                                                      if rdm.distortion == "mse" else
                                                      torch.nn.functional.smooth_l1_loss(o.embedding, emb).item(),
                                                      rel=1e-5)
            assert row["accuracy"] == pytest.approx(100.0 * (o.logits.argmax(-1) == labels).float().mean().item())
