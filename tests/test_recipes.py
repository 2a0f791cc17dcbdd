"""Acceptance 4: each classification recipe's ``--smoke`` run passes with two real CPU processes, launched the way
the README says (``ACCELERATE_USE_CPU=1 torchrun --nproc_per_node 2``, and one recipe with ``accelerate launch
--config_file recipes/configs/accelerate/multi_gpu.yaml`` whose CPU override is ``ACCELERATE_USE_CPU=1``), writes
eval_results.json, and exports a student its own library loads.

Plus fast checks of the pipeline's model specs / flag defaults.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from helpers import TORCHRUN

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}

# The student loaded by its own library in a fresh interpreter, without hf_cifd.
TIMM_LOAD = """
import sys, torch, timm
model = timm.create_model("local-dir:{student}", pretrained=True).eval()
assert not any(m == "hf_cifd" or m.startswith("hf_cifd.") for m in sys.modules), "hf_cifd was imported"
size = model.pretrained_cfg["input_size"][-1]
with torch.no_grad():
    logits = model(torch.randn(2, 3, size, size))
assert tuple(logits.shape) == (2, {num_classes}), logits.shape
print("ok", size)
"""
# SimpleCNN is hf_cifd's own model class: its library IS hf_cifd (PyTorchModelHubMixin.from_pretrained).
CNN_LOAD = """
import torch
from hf_cifd.models import SimpleCNN
model = SimpleCNN.from_pretrained("{student}").eval()
with torch.no_grad():
    embedding, logits = model(torch.randn(2, 3, 32, 32))
assert tuple(logits.shape) == (2, {num_classes}) and model.embed_dim == 256, logits.shape
print("ok")
"""

RECIPES = {
    "imagenet_r34_to_r18": TIMM_LOAD,
    "imagenet_r50_to_mbv1": TIMM_LOAD,
    "cifar100_cnn10_to_cnn2": CNN_LOAD,
}
# The shipped multi-GPU config (bf16 DDP), its only CPU override being ACCELERATE_USE_CPU=1; the others by torchrun.
LAUNCH = {
    "imagenet_r34_to_r18": [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                            "recipes/configs/accelerate/multi_gpu.yaml", "--num_processes", "2",
                            "--main_process_port", "0"],
}


@pytest.mark.slow
@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_recipe_smoke_two_processes(recipe, tmp_path):
    out = tmp_path / "out"
    start = time.time()
    res = subprocess.run([*LAUNCH.get(recipe, TORCHRUN), f"recipes/{recipe}.py", "--smoke",
                          "--output_dir", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**ENV, "ACCELERATE_USE_CPU": "1"})
    elapsed = time.time() - start
    assert res.returncode == 0, res.stderr[-5000:]
    results = json.loads((out / "eval_results.json").read_text())
    assert 0.0 <= results["eval_accuracy"] <= 1.0  # a fraction
    assert results["num_processes"] == 2, results  # two real processes
    assert results["method"] == "cifd"
    assert results["teacher_calls"] > 0 and results["teacher_calls_cache"] == 192  # the cache pass: once per sample
    assert results["rdm_teacher_calls"] == 0  # RDMs trained from the cache alone
    assert len(results["rdm_metrics"]) == 3
    for row in results["rdm_metrics"]:
        assert row["rate_bits"] >= 0 and row["accuracy"] is not None
        # Table 1's RDMs (CIFAR recipe) have no reconstruction, hence no distortion
        assert row["distortion"] is None if recipe.startswith("cifar") else row["distortion"] >= 0
    for i in range(3):
        assert (out / "rdms" / f"rdm-image-{i}" / "model.safetensors").exists()
    assert results["global_steps"] == 6
    print(f"{recipe} smoke: {elapsed:.0f}s (in-run {results['wall_time_s']}s), stages {results['stage_seconds']}")

    script = RECIPES[recipe].format(student=out / "student", num_classes=24)
    check = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                           cwd=str(tmp_path), env=ENV)
    assert check.returncode == 0, check.stderr[-3000:]
    assert check.stdout.strip().splitlines()[-1].startswith("ok"), check.stdout


# ------------------------------------------------------------------------------------------------ fast checks
def test_load_model_specs(tmp_path):
    from hf_cifd import DistillationInputError
    from hf_cifd.adapters import adapter_for, load_model
    from hf_cifd.models import SimpleCNN

    timm_model = load_model("timm:resnet18", num_classes=7, image_size=32)
    assert adapter_for(timm_model).library == "timm" and timm_model.num_classes == 7
    assert timm_model.pretrained_cfg["input_size"] == (3, 32, 32)
    cnn = load_model("cnn:cnn2", num_classes=5)
    assert isinstance(cnn, SimpleCNN) and cnn.num_classes == 5
    adapter_for(cnn).save(cnn, str(tmp_path / "cnn"))
    assert load_model(f"cnn:{tmp_path / 'cnn'}", num_classes=5).embed_dim == 256  # a trained directory
    for bad in ("resnet18", "torch:resnet18", "timm:"):
        with pytest.raises(DistillationInputError, match="model spec"):
            load_model(bad)
    with pytest.raises(DistillationInputError, match="no published weights"):
        load_model("cnn:cnn10", pretrained=True)
    with pytest.raises(DistillationInputError, match="names no pretrained weights"):
        load_model("open_clip:ViT-S-16", pretrained=True)
