"""Issue 10: a recipe killed after its RDM stage and restarted with --resume_from_checkpoint true reuses the teacher
cache (CLIP: the trained smoke teacher) and the RDMs (their files untouched) and finishes; finished stages of another
run are refused."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
RECIPE = [sys.executable, "recipes/imagenet_r34_to_r18.py", "--smoke"]


def _snapshot(out, stages=("teacher_cache", "rdms")):
    """{path: (mtime_ns, sha256)} of every file of the given stages' directories."""
    snap = {}
    for stage in stages:
        for root, _, names in os.walk(os.path.join(out, stage)):
            for name in names:
                path = os.path.join(root, name)
                snap[path] = (os.stat(path).st_mtime_ns, hashlib.sha256(open(path, "rb").read()).hexdigest())
    return snap


def _kill_after(cmd, marker, timeout=280):
    """Runs ``cmd`` and SIGKILLs its process group as soon as ``marker`` exists (right after that stage, before
    distillation finishes)."""
    out = os.path.dirname(os.path.dirname(marker))
    first = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                             start_new_session=True)
    deadline = time.time() + timeout
    while not os.path.exists(marker):
        assert first.poll() is None, first.stderr.read()[-4000:]
        assert time.time() < deadline, f"{marker} never appeared"
        time.sleep(0.05)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    assert not os.path.exists(os.path.join(out, "eval_results.json"))


@pytest.mark.slow
def test_recipe_killed_after_rdm_stage_restarts_reusing_cache_and_rdms(tmp_path):
    out = str(tmp_path / "out")
    _kill_after([*RECIPE, "--output_dir", out], os.path.join(out, "rdms", "complete.json"))
    before = _snapshot(out)
    assert any(p.endswith("model.safetensors") for p in before) and any(p.endswith(".arrow") for p in before)

    second = subprocess.run([*RECIPE, "--output_dir", out, "--resume_from_checkpoint", "true"], cwd=ROOT, env=ENV,
                            capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-5000:]
    assert _snapshot(out) == before  # no cache or RDM file rewritten, none added
    assert "reusing the RDMs this run trained" in second.stderr
    assert "no checkpoint in" in second.stderr and "training starts at step 0" in second.stderr
    results = json.loads(open(os.path.join(out, "eval_results.json")).read())
    assert results["global_steps"] == 6 and len(results["rdm_metrics"]) == 3

    other = subprocess.run([*RECIPE, "--output_dir", out, "--rdm_rates", "10", "5", "1"], cwd=ROOT, env=ENV,
                           capture_output=True, text=True, timeout=300)
    assert other.returncode != 0
    assert "belongs to another run: ['rates'] differ" in other.stderr


@pytest.mark.slow
def test_restarted_cifar_recipe_reuses_its_trained_teacher(tmp_path):
    out = str(tmp_path / "out")
    cmd = [sys.executable, "recipes/cifar100_cnn10_to_cnn2.py", "--smoke", "--output_dir", out]
    first = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-5000:]
    stages = ("teacher", "teacher_cache", "rdms")
    before = _snapshot(out, stages)
    assert os.path.join(out, "teacher", "complete.json") in before
    second = subprocess.run([*cmd, "--resume_from_checkpoint", "true"], cwd=ROOT, env=ENV, capture_output=True,
                            text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-5000:]
    assert "reusing the teacher this run trained (cnn:" in second.stderr
    assert _snapshot(out, stages) == before  # the reloaded teacher has the cached teacher's weights: all reused


@pytest.mark.slow
def test_clip_recipe_killed_after_rdm_stage_restarts_reusing_teacher_and_rdms(tmp_path):
    out = str(tmp_path / "out")
    cmd = [sys.executable, "recipes/clip_vitl_to_vits.py", "--smoke", "--output_dir", out, "--smoke_teacher_steps", "8",
           "--max_steps", "20", "--per_device_train_batch_size", "32"]
    _kill_after(cmd, os.path.join(out, "rdms", "complete.json"), timeout=600)
    stages = ("teacher", "rdms")
    before = _snapshot(out, stages)
    assert os.path.join(out, "teacher", "complete.json") in before
    assert sum(p.endswith(os.sep + "model.safetensors") for p in before) == 6  # 3 RDMs per modality

    second = subprocess.run([*cmd, "--resume_from_checkpoint", "true"], cwd=ROOT, env=ENV, capture_output=True,
                            text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-5000:]
    assert _snapshot(out, stages) == before  # teacher and RDMs reused: no file rewritten, none added
    assert "reusing the teacher this run trained" in second.stderr
    assert "reusing the RDMs this run trained" in second.stderr  # the teacher reloaded from disk hashes the same
    assert "no checkpoint in" in second.stderr and "training starts at step 0" in second.stderr
    results = json.loads(open(os.path.join(out, "eval_results.json")).read())
    assert results["max_steps"] == 20 and "zeroshot_top1" in results

    other = subprocess.run([*cmd, "--rdm_rates", "10", "5", "1"], cwd=ROOT, env=ENV, capture_output=True, text=True,
                           timeout=600)
    assert other.returncode != 0
    assert "RDMs in" in other.stderr and "belongs to another run: ['rates'] differ" in other.stderr
    assert _snapshot(out, stages) == before
