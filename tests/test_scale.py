"""Runs users launch at scale: the world-size guard, mixed precision, multi-process metrics, DeepSpeed ZeRO-2/3."""

from __future__ import annotations

import math
import os
import subprocess

import pytest
import torch

from helpers import TORCHRUN
from hf_cifd.config import CLASSIFICATION_METHODS, CLIP_METHODS

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


@pytest.fixture(scope="module")
def clip_models():
    from hf_cifd.adapters.open_clip import create_openclip

    from test_clip_adapter import S_PP, STUDENT, T_PP, TEACHER

    torch.manual_seed(0)
    return create_openclip(TEACHER, preprocess_cfg=T_PP), create_openclip(STUDENT, preprocess_cfg=S_PP)


@pytest.fixture(scope="module")
def clip_shards(tmp_path_factory):
    from hf_cifd.data import shapes

    return shapes.write_webdataset(str(tmp_path_factory.mktemp("shapes") / "train"), 48, seed=0, shard_size=48)


# ---------------------------------------------------------------------------------------------- mixed precision
# bf16 (teacher in bf16, student under autocast) vs fp32 from the same weights and data: every logged loss term of
# every step agrees within BF16_RTOL relative (+ BF16_ATOL absolute, for terms near zero). bf16 keeps 8 bits of
# mantissa (relative rounding 2^-8 = 0.4% per operation); a few layers of it stay within a few percent.
BF16_RTOL, BF16_ATOL = 0.05, 0.02


def _terms(trainer):
    return [{k: v for k, v in h.items() if k.startswith("loss/")} for h in trainer.state.log_history if "loss" in h]


def _compare_runs(fp32, bf16):
    assert len(fp32) == len(bf16) == 3 and fp32[0], (fp32, bf16)
    worst = 0.0
    for a, b in zip(fp32, bf16):
        assert a.keys() == b.keys()
        for k in a:
            assert math.isfinite(b[k]), (k, b[k])
            assert b[k] == pytest.approx(a[k], rel=BF16_RTOL, abs=BF16_ATOL), (k, a[k], b[k])
            worst = max(worst, abs(b[k] - a[k]) / max(abs(a[k]), 1e-12))
    return worst


@pytest.mark.parametrize("method", CLASSIFICATION_METHODS)
def test_bf16_classification_methods_match_fp32(tmp_path, method):
    import copy

    from helpers import TinyNet, toy_dataset
    from hf_cifd import DistillationConfig, DistillationTrainer, RateDistortionModule

    torch.manual_seed(0)
    teacher, student, assistant = TinyNet(embed_dim=12), TinyNet(), TinyNet(embed_dim=10)
    rdms = [RateDistortionModule(12, hidden_dims=(8, 4, 8), num_classes=4, rate_weight=r) for r in (2.0, 0.5)]
    runs = {}
    for bf16 in (False, True):
        args = DistillationConfig(output_dir=str(tmp_path / str(bf16)), method=method, bf16=bf16, use_cpu=True,
                                  report_to=[], save_strategy="no", per_device_train_batch_size=8, max_steps=3,
                                  logging_steps=1, learning_rate=0.05, optim="sgd", disable_tqdm=True, seed=0,
                                  num_rdms=2, rdm_rates=[2.0, 0.5])
        kwargs = {"rdms": copy.deepcopy(rdms)} if method == "cifd" else {}
        if method in ("takd", "dgkd"):
            kwargs["assistants"] = [copy.deepcopy(assistant)]
        trainer = DistillationTrainer(copy.deepcopy(student), None if method == "takd" else copy.deepcopy(teacher),
                                      args=args, train_dataset=toy_dataset(32), **kwargs)
        trainer.train()
        if bf16 and trainer.teacher is not None:
            assert next(trainer.teacher.parameters()).dtype == torch.bfloat16  # teacher_dtype "auto" = bf16
        runs[bf16] = _terms(trainer)
    print(f"{method}: worst relative bf16-fp32 difference {_compare_runs(runs[False], runs[True]):.4f}")


@pytest.mark.parametrize("method", CLIP_METHODS)
def test_bf16_clip_methods_match_fp32(tmp_path, clip_models, clip_shards, method):
    import copy

    from hf_cifd import DistillationConfig, DistillationTrainer, RateDistortionModule
    from hf_cifd.data.collate import collate
    from hf_cifd.data.loading import load_image_dataset

    (t_model, _, t_pre, t_tok), (s_model, _, s_pre, s_tok) = clip_models
    torch.manual_seed(0)
    rdms = {m: [RateDistortionModule(24, hidden_dims=(16, 16, 16), rate_weight=r) for r in (10.0, 3.0)]
            for m in ("image", "text")}
    runs = {}
    for bf16 in (False, True):
        ds = load_image_dataset("webdataset", task="image-text", data_files={"train": clip_shards}, streaming=True,
                                transform=s_pre, tokenizer=s_tok, teacher_transform=t_pre, teacher_tokenizer=t_tok)
        args = DistillationConfig(output_dir=str(tmp_path / str(bf16)), method=method, bf16=bf16, use_cpu=True,
                                  report_to=[], save_strategy="no", per_device_train_batch_size=8, max_steps=3,
                                  logging_steps=1, learning_rate=1e-3, disable_tqdm=True, seed=0,
                                  num_rdms=2 if method == "cifd" else 0, rdm_rates=[10.0, 3.0])
        trainer = DistillationTrainer(copy.deepcopy(s_model), None if method == "clip" else copy.deepcopy(t_model),
                                      args=args, train_dataset=ds, data_collator=collate,
                                      rdms=copy.deepcopy(rdms) if method == "cifd" else None)
        trainer.train()
        runs[bf16] = _terms(trainer)
    print(f"{method}: worst relative bf16-fp32 difference {_compare_runs(runs[False], runs[True]):.4f}")


# ---------------------------------------------------------------------------------------------- DeepSpeed ZeRO
def _zero_run(tmp_path, stage, kind):
    """Runs data_scripts/zero_run.py (``kind``: "cls" = timm, "clip" = open_clip) on 2 processes with the shipped
    zero<stage>.json and checks what both tests share: 2 processes at that stage, 4 finite losses that fall, a
    checkpoint at step 2 and a resume that reaches step 4. Returns (the run's folder, its result.json)."""
    import json

    out = tmp_path / "run"
    ds_json = os.path.join(ROOT, "recipes", "configs", "deepspeed", f"zero{stage}.json")
    res = subprocess.run([*TORCHRUN, os.path.join(SCRIPTS, "zero_run.py"), ds_json, str(out),
                          *(["clip"] if kind == "clip" else [])],
                         capture_output=True, text=True, timeout=600, env=_env(DS_ACCELERATOR="cpu"), cwd=str(tmp_path))
    assert res.returncode == 0, res.stderr[-5000:]
    result = json.loads((out / kind / "result.json").read_text())
    assert result["num_processes"] == 2 and result["zero_stage"] == stage
    losses = result["losses"]
    assert len(losses) == 4 and all(math.isfinite(v) for v in losses) and losses[-1] < losses[0], losses
    assert (out / kind / "checkpoint-2").is_dir() and result["resumed_steps"] == 4
    return out, result


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_cifd_under_deepspeed_zero_two_processes(tmp_path, stage):
    """The shipped recipes/configs/deepspeed/zero<stage>.json, unchanged ("auto" values), 2 CPU processes: CIFD
    trains (finite, decreasing loss), the exported student loads with plain timm and reproduces the trained
    student's outputs, and a run resumed from the ZeRO checkpoint at step 2 ends with the same weights."""
    import json

    out, result = _zero_run(tmp_path, stage, "cls")
    assert result["resume_max_abs_diff"] <= 1e-6, result["resume_max_abs_diff"]
    check = subprocess.run(
        [os.sys.executable, "-c",
         "import sys, json, torch, timm\n"
         f"m = timm.create_model('local-dir:{out / 'cls'}', pretrained=True).eval()\n"
         "assert not any(k.startswith('hf_cifd') for k in sys.modules)\n"
         "x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))\n"
         "with torch.no_grad(): print(json.dumps(m(x).tolist()))"],
        capture_output=True, text=True, timeout=120, env=_env(), cwd=str(tmp_path))
    assert check.returncode == 0, check.stderr[-3000:]
    torch.testing.assert_close(torch.tensor(json.loads(check.stdout.strip().splitlines()[-1])),
                               torch.tensor(result["outputs"]), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_cifd_clip_under_deepspeed_zero_two_processes(tmp_path, stage):
    """CIFD on a tiny open_clip pair under the shipped zero<stage>.json, 2 CPU processes: open_clip's 0-dim
    logit_scale is held as shape (1,) for DeepSpeed and exported as (); losses are finite and decrease, and the
    exported student loads with plain open_clip and reproduces the trained student's features and scale."""
    import json

    out, result = _zero_run(tmp_path, stage, "clip")
    check = subprocess.run(
        [os.sys.executable, "-c",
         "import sys, json, torch, open_clip\n"
         f"m, _, _ = open_clip.create_model_and_transforms('local-dir:{out / 'clip'}')\n"
         f"tok = open_clip.get_tokenizer('local-dir:{out / 'clip'}')\n"
         "assert not any(k.startswith('hf_cifd') for k in sys.modules)\n"
         "assert m.logit_scale.shape == torch.Size([]), m.logit_scale.shape\n"
         "m.eval()\n"
         "x = torch.randn(2, 3, 24, 24, generator=torch.Generator().manual_seed(1))\n"
         "ids = tok(['a red circle', 'a small blue square'])\n"
         "with torch.no_grad():\n"
         "    print(json.dumps({'image': m.encode_image(x).tolist(), 'text': m.encode_text(ids).tolist(),\n"
         "                      'logit_scale': [m.logit_scale.exp().item()]}))"],
        capture_output=True, text=True, timeout=120, env=_env(), cwd=str(tmp_path))
    assert check.returncode == 0, check.stderr[-3000:]
    loaded = json.loads(check.stdout.strip().splitlines()[-1])
    for key in ("image", "text", "logit_scale"):
        torch.testing.assert_close(torch.tensor(loaded[key]), torch.tensor(result["outputs"][key]), rtol=1e-5, atol=1e-6)
