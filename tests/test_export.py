"""The exported student loads in its own library, with no hf_cifd import, and gives the trained student's logits
(issue 3, item 3); training from the teacher cache reproduces the live-teacher losses (issue 5, item 3)."""

import copy
import json
import subprocess
import sys

import pytest
import timm
import torch

from hf_cifd import DistillationConfig, DistillationTrainer
from hf_cifd.data import cache_teacher_outputs

from helpers import toy_dataset

_NO_HF_CIFD = "assert not any(m == 'hf_cifd' or m.startswith('hf_cifd.') for m in sys.modules), 'hf_cifd was imported'"


def _args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "out"), report_to=[], use_cpu=True, save_strategy="no",
                per_device_train_batch_size=8, learning_rate=0.05, max_steps=2, disable_tqdm=True, logging_steps=1, seed=0)
    return DistillationConfig(**{**base, **kw})


def _logits_in_own_library(tmp_path, load: str, call: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x, y)``: a fixed input x, and ``y = <call>`` computed on it by ``m = <load>`` in a fresh interpreter that never
    imports hf_cifd."""
    x = torch.randn(2, 3, 32, 32)
    torch.save(x, tmp_path / "x.pt")
    code = (f"import json, sys, torch\nm = {load}.eval()\nx = torch.load('{tmp_path / 'x.pt'}')\n"
            f"with torch.no_grad(): y = {call}\n{_NO_HF_CIFD}\nprint(json.dumps(y.tolist()))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return x, torch.tensor(json.loads(out.stdout.strip().splitlines()[-1]))


def test_timm_student_exports_to_timm_with_identical_logits(tmp_path):
    ds = toy_dataset(16, num_classes=3, shape=(3, 32, 32))
    torch.manual_seed(0)
    teacher = timm.create_model("resnet18", pretrained=False, num_classes=3)
    student = timm.create_model("resnet10t", pretrained=False, num_classes=3)
    trainer = DistillationTrainer(model=student, teacher=teacher, args=_args(tmp_path, method="kd"), train_dataset=ds)
    trainer.train()
    trainer.save_model(str(tmp_path / "student"))
    x, got = _logits_in_own_library(
        tmp_path, f"__import__('timm').create_model('local-dir:{tmp_path / 'student'}', pretrained=True)", "m(x)")
    with torch.no_grad():
        expected = student.eval()(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # The container's loss modules are not part of the export.
    from safetensors.torch import load_file

    keys = load_file(str(tmp_path / "student" / "model.safetensors")).keys()
    assert not any(k.startswith(("ibms.", "projectors.", "student.")) for k in keys)


def test_transformers_student_exports_with_from_pretrained_and_identical_logits(tmp_path):
    from transformers import ResNetConfig, ResNetForImageClassification

    cfg = dict(num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic", num_labels=3)
    torch.manual_seed(0)
    teacher = ResNetForImageClassification(ResNetConfig(**{**cfg, "hidden_sizes": [16, 32]}))
    student = ResNetForImageClassification(ResNetConfig(**cfg))
    ds = toy_dataset(16, num_classes=3, shape=(3, 32, 32))
    args = _args(tmp_path, method="cifd", num_rdms=0)  # IBM on: it must stay out of the export
    trainer = DistillationTrainer(model=student, teacher=teacher, args=args, train_dataset=ds)
    assert "image" in trainer.model.ibms
    trainer.train()
    trainer.save_model(str(tmp_path / "student"))
    x, got = _logits_in_own_library(
        tmp_path, f"__import__('transformers').AutoModelForImageClassification.from_pretrained('{tmp_path / 'student'}')",
        "m(pixel_values=x).logits")
    with torch.no_grad():
        expected = student.eval()(pixel_values=x).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method, extra", [("kd", {}), ("cifd", {"num_rdms": 0, "use_ibm": False})])
def test_training_from_the_cache_reproduces_live_teacher_losses(tmp_path, method, extra):
    from helpers import TinyNet

    ds = toy_dataset(32)
    torch.manual_seed(0)
    teacher, student = TinyNet(embed_dim=12), TinyNet()
    cache_teacher_outputs(teacher, ds, str(tmp_path / "cache"), dtype="float32", progress=False)
    losses = []
    for cache in (None, str(tmp_path / "cache")):
        trainer = DistillationTrainer(model=copy.deepcopy(student), teacher=None if cache else copy.deepcopy(teacher),
                                      args=_args(tmp_path, method=method, max_steps=3, **extra), train_dataset=ds,
                                      teacher_cache=cache)
        trainer.train()
        losses.append([(h["loss"], h["teacher_calls"]) for h in trainer.state.log_history if "loss" in h])
    (live, cached) = losses
    assert [c for _, c in live] == [8, 16, 24] and [c for _, c in cached] == [0, 0, 0]
    assert [l for l, _ in cached] == pytest.approx([l for l, _ in live], rel=1e-6)
