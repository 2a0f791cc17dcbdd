"""Issue 10: checkpoints are complete or skipped, damaged files are named, resume restores everything or says why."""

import glob
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from hf_cifd import DistillationInputError, RateDistortionModule
from hf_cifd.checkpoints import MANIFEST

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "data_scripts"))
from ckpt_run import build  # noqa: E402

ENV = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")


def _run(out, result, *extra):
    return subprocess.run([sys.executable, os.path.join(HERE, "data_scripts", "ckpt_run.py"), out, result, *extra],
                          env=ENV, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_sigkill_during_a_checkpoint_save_resumes_from_the_previous_one_exactly(tmp_path):
    full = _run(str(tmp_path / "full"), str(tmp_path / "full.json"))
    assert full.returncode == 0, full.stderr[-3000:]
    out = str(tmp_path / "run")
    killed = _run(out, str(tmp_path / "killed.json"), "--kill-at-save", "4")
    assert killed.returncode == -9
    ck2, ck4 = os.path.join(out, "checkpoint-2"), os.path.join(out, "checkpoint-4")
    assert os.path.exists(os.path.join(ck2, MANIFEST)) and os.path.exists(os.path.join(ck4, "optimizer.pt"))
    assert not os.path.exists(os.path.join(ck4, MANIFEST))  # killed half-way: weights + optimizer, no RNG state
    resumed = _run(out, str(tmp_path / "resumed.json"), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"skipping {ck4}: incomplete" in resumed.stderr and f"resuming from {ck2}" in resumed.stderr
    a, b = json.load(open(tmp_path / "full.json")), json.load(open(tmp_path / "resumed.json"))
    torch.testing.assert_close(torch.tensor(b["params"]), torch.tensor(a["params"]), rtol=0, atol=1e-6)
    assert b["teacher_calls"] == a["teacher_calls"] == 6 * 8  # 2 steps restored from checkpoint-2 + 4 resumed
    assert [h["step"] for h in b["log"]] == [1, 2, 3, 4, 5, 6]  # steps 1-2 come from checkpoint-2's trainer state
    assert [h["loss"] for h in b["log"][2:]] == pytest.approx([h["loss"] for h in a["log"][2:]], abs=1e-6)
    assert os.path.exists(os.path.join(ck4, MANIFEST))  # the interrupted step was saved again, completely


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("ckpt") / "run")
    trainer = build(out, max_steps=2)
    trainer.train()
    return os.path.join(out, "checkpoint-2")


def _copy(saved_run, tmp_path):
    dst = str(tmp_path / "elsewhere" / "checkpoint-2")
    shutil.copytree(saved_run, dst)
    return dst


@pytest.mark.parametrize("name", ["optimizer.pt", "scheduler.pt", "rng_state.pth", "hf_cifd_state_rank0.json"])
@pytest.mark.parametrize("damage", ["missing", "truncated"])
def test_missing_or_truncated_state_file_is_named_unless_partial_resume(saved_run, tmp_path, name, damage):
    ckpt = _copy(saved_run, tmp_path)
    path = os.path.join(ckpt, name)
    if damage == "missing":
        os.remove(path)
    else:
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
    trainer = build(str(tmp_path / "out"), max_steps=3)
    with pytest.raises(DistillationInputError, match=rf"'{name}': '{damage}"):
        trainer.train(resume_from_checkpoint=ckpt)
    trainer = build(str(tmp_path / "out"), max_steps=3)
    trainer.args.resume_partial = True
    trainer.train(resume_from_checkpoint=ckpt)
    assert trainer.state.global_step == 3


def test_damaged_weights_are_an_error_even_for_a_partial_resume(saved_run, tmp_path):
    ckpt = _copy(saved_run, tmp_path)
    os.remove(os.path.join(ckpt, "model.safetensors"))
    trainer = build(str(tmp_path / "out"), max_steps=3)
    trainer.args.resume_partial = True
    with pytest.raises(DistillationInputError, match=r"'model.safetensors': 'missing'"):
        trainer.train(resume_from_checkpoint=ckpt)


def test_resume_with_other_method_rates_or_rdms_is_an_error(saved_run, tmp_path):
    ckpt = _copy(saved_run, tmp_path)
    trainer = build(str(tmp_path / "out"), max_steps=3)
    trainer.rdms["image"][0].rate_weight = 2.0  # as if built with --rdm_rates 2.0
    with pytest.raises(DistillationInputError, match=r"RDM rates \[1.0\] -> \[2.0\]"):
        trainer.train(resume_from_checkpoint=ckpt)
    trainer = build(str(tmp_path / "out"), max_steps=3)
    with torch.no_grad():
        trainer.rdms["image"][0].head.bias.add_(1.0)  # another trained RDM
    with pytest.raises(DistillationInputError, match=r"RDM weights differ \(\['image/0'\]\)"):
        trainer.train(resume_from_checkpoint=ckpt)
    trainer = build(str(tmp_path / "out"), max_steps=3)
    trainer.args.method = "kd"
    with pytest.raises(DistillationInputError, match=r"method 'cifd' -> 'kd'"):
        trainer.train(resume_from_checkpoint=ckpt)


def test_resume_true_without_a_complete_checkpoint_says_so(saved_run, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(saved_run, out / "checkpoint-2")
    os.remove(out / "checkpoint-2" / MANIFEST)
    with pytest.raises(DistillationInputError, match=r"no complete checkpoint .*\['checkpoint-2'\]"):
        build(str(out), max_steps=3).train(resume_from_checkpoint=True)


def _stream_run(tmp_path, out, log, *extra):
    return subprocess.run([sys.executable, os.path.join(HERE, "data_scripts", "train_stream.py"), str(tmp_path / "wds"),
                           out, log, *extra], env=ENV, capture_output=True, text=True, timeout=300)


def _steps(path):
    with open(path) as f:
        return [r for r in (json.loads(line) for line in f if line.strip()) if "step" in r]


@pytest.mark.slow
def test_stream_resumes_from_a_checkpoint_copied_outside_output_dir_without_repeats_or_gaps(tmp_path):
    from data_scripts.fixtures import write_wds

    write_wds(str(tmp_path / "wds"), n_shards=6, per_shard=10, task="classification", corrupt=(3,), empty_caption=())
    full = _stream_run(tmp_path, str(tmp_path / "full"), str(tmp_path / "full.log"), "--max-steps", "8")
    assert full.returncode == 0, full.stderr[-3000:]
    moved = str(tmp_path / "archive" / "checkpoint-4")
    shutil.copytree(str(tmp_path / "full" / "checkpoint-4"), moved)
    resumed = _stream_run(tmp_path, str(tmp_path / "fresh_out"), str(tmp_path / "resumed.log"), "--max-steps", "8",
                          "--resume-from", moved)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    reference, after = _steps(tmp_path / "full.log"), _steps(tmp_path / "resumed.log")
    assert [r["step"] for r in after] == list(range(5, 9))
    # exactly the batches the uninterrupted run trained on after step 4: nothing repeated, nothing skipped
    assert [(r["epoch"], r["keys"]) for r in after] == [(r["epoch"], r["keys"]) for r in reference[4:]]

    os.remove(os.path.join(moved, "stream_state_rank0.json"))
    missing = _stream_run(tmp_path, str(tmp_path / "fresh_out2"), str(tmp_path / "m.log"), "--max-steps", "8",
                          "--resume-from", moved)
    assert missing.returncode != 0 and "'stream_state_rank0.json': 'missing'" in missing.stderr
