"""DistillationTrainer / DistillationConfig (issue 3, items 2, 5, 6 and the Trainer contract)."""

import copy
import math

import pytest
import torch
from transformers import HfArgumentParser

from hf_cifd import DistillationConfig, DistillationInputError, DistillationTrainer, RateDistortionModule, train_rdms
from hf_cifd.data import cache_teacher_outputs

from helpers import TinyNet, toy_dataset


def _args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "out"), report_to=[], use_cpu=True, save_strategy="no",
                per_device_train_batch_size=8, learning_rate=0.1, optim="sgd", disable_tqdm=True,
                lr_scheduler_type="constant", num_train_epochs=1, seed=0)
    base.update(kw)
    return DistillationConfig(**base)


@pytest.mark.parametrize("method, extra", [("kd", {}), ("fitnet", {}), ("cifd", {"kd_dropout": 0.0, "use_ibm": False})])
def test_gradient_accumulation_2xB_matches_batch_2B(tmp_path, method, extra):
    # 16 samples, one optimizer step either as 2 micro-batches of 8 or one batch of 16.
    ds = toy_dataset(16)
    torch.manual_seed(0)
    teacher, student = TinyNet(embed_dim=12), TinyNet()
    rdms = [RateDistortionModule(12, hidden_dims=(8, 4, 8), num_classes=4, rate_weight=r) for r in (2.0, 0.5)]
    params, losses = [], []
    for bs, ga in ((8, 2), (16, 1)):
        s = copy.deepcopy(student)
        args = _args(tmp_path, method=method, per_device_train_batch_size=bs, gradient_accumulation_steps=ga,
                     max_steps=1, logging_steps=1, num_rdms=2, rdm_rates=[2.0, 0.5], **extra)
        trainer = DistillationTrainer(model=s, teacher=copy.deepcopy(teacher), args=args, train_dataset=ds,
                                      rdms=copy.deepcopy(rdms) if method == "cifd" else None)
        trainer.train()
        params.append(torch.cat([p.detach().flatten() for p in s.parameters()]))
        losses.append(trainer.state.log_history[0]["loss"])
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    torch.testing.assert_close(params[0], params[1], rtol=1e-5, atol=1e-6)


def test_teacher_is_frozen_student_and_loss_modules_train_and_terms_are_logged(tmp_path):
    ds = toy_dataset(32)
    torch.manual_seed(0)
    teacher, student = TinyNet(embed_dim=12), TinyNet()
    rdms = [RateDistortionModule(12, hidden_dims=(8, 4, 8), num_classes=4, rate_weight=1.0)]
    t_before = copy.deepcopy(teacher.state_dict())
    args = _args(tmp_path, method="cifd", num_rdms=1, rdm_rates=[1.0], logging_steps=2, max_steps=4)
    trainer = DistillationTrainer(model=student, teacher=teacher, args=args, train_dataset=ds, rdms=rdms)
    ibm = trainer.model.ibms["image"]
    ibm_before = copy.deepcopy(ibm.state_dict())
    trainer.train()
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, t_before[k]), k
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert any(not torch.equal(v, ibm_before[k]) for k, v in ibm.state_dict().items() if v.is_floating_point())
    logged = trainer.state.log_history[0]
    for term in ("ce", "kd_teacher", "kd_rdm_0", "emb_teacher", "emb_rdm_0", "ibm_rate"):
        assert f"loss/{term}" in logged
    # 2 steps x 8 samples: the teacher ran once per sample.
    assert logged["teacher_calls"] == 16 and trainer.teacher_calls == 32
    # The sum of the logged terms is the logged loss.
    assert sum(v for k, v in logged.items() if k.startswith("loss/")) == pytest.approx(logged["loss"], rel=1e-3)


def test_checkpoint_holds_the_container_and_resume_continues_exactly(tmp_path):
    # An uninterrupted 4-step run vs. the same run resumed from its step-2 checkpoint: the student AND the IBM
    # (a trainable loss module) end identical, so they are checkpointed and resumed together.
    ds = toy_dataset(64)
    teacher = TinyNet(embed_dim=12)
    args = _args(tmp_path, method="cifd", num_rdms=0, max_steps=4, save_strategy="steps", save_steps=2)
    full = DistillationTrainer(model=TinyNet(), teacher=copy.deepcopy(teacher), args=args, train_dataset=ds)
    full.train()
    ckpt = tmp_path / "out" / "checkpoint-2"
    from safetensors.torch import load_file

    saved = load_file(str(ckpt / "model.safetensors"))
    assert any(k.startswith("student.") for k in saved) and any(k.startswith("ibms.image.") for k in saved)
    resumed = DistillationTrainer(model=TinyNet(), teacher=copy.deepcopy(teacher),
                                  args=_args(tmp_path, method="cifd", num_rdms=0, max_steps=4, save_strategy="no"),
                                  train_dataset=ds)
    resumed.train(resume_from_checkpoint=str(ckpt))
    final = full.model.state_dict()
    for k, v in resumed.model.state_dict().items():
        torch.testing.assert_close(v, final[k], rtol=0, atol=1e-6, msg=k)
    assert not torch.equal(saved["ibms.image.decoders.teacher.0.weight"], final["ibms.image.decoders.teacher.0.weight"])


def test_train_rdms_runs_teacher_once_per_batch_and_cache_gives_same_losses(tmp_path):
    ds = toy_dataset(64)
    torch.manual_seed(0)
    teacher = TinyNet(embed_dim=12)
    kw = dict(rates=[4.0, 1.0, 0.25], epochs=1, batch_size=16, hidden_dims=(8, 4, 8), distortion="mse", progress=False, seed=3)
    live = train_rdms(ds, teacher=teacher, **kw)
    # 4 batches -> 4 teacher forwards for the 3 RDMs (+ 4 for the final evaluation pass), never 3 per batch.
    assert teacher.forward_calls == 8 and live.teacher_calls == 128 and live.steps == 4
    assert len(live.rdms["image"]) == 3 and len(live.history) == 4 and len(live.history[0]) == 3
    report = cache_teacher_outputs(teacher, ds, str(tmp_path / "cache"), dtype="float32", progress=False)
    assert report.teacher_calls == 64
    calls = teacher.forward_calls
    cached = train_rdms(ds, teacher_cache=str(tmp_path / "cache"), **kw)
    assert teacher.forward_calls == calls and cached.teacher_calls == 0
    for a, b in zip(live.history, cached.history):
        assert a.keys() == b.keys()
        for k in a:
            assert a[k] == pytest.approx(b[k], rel=1e-5), k
    assert [m["rate_bits"] for m in live.metrics] == pytest.approx([m["rate_bits"] for m in cached.metrics], rel=1e-5)


def test_train_rdms_saves_rdms_metrics_and_rd_plot(tmp_path):
    ds = toy_dataset(32)
    report = train_rdms(ds, teacher=TinyNet(embed_dim=12), rates=[2.0, 0.5], epochs=1, batch_size=16,
                        hidden_dims=(8, 4, 8), output_dir=str(tmp_path / "rdms"), progress=False)
    import json

    saved = json.loads((tmp_path / "rdms" / "rdm_metrics.json").read_text())
    assert [r["rate_weight"] for r in saved["rdms"]] == [2.0, 0.5]
    assert all(0 <= r["accuracy"] <= 100 and r["rate_bits"] > 0 for r in saved["rdms"])
    assert (tmp_path / "rdms" / "rd_curve.png").stat().st_size > 1000
    loaded = RateDistortionModule.from_pretrained(str(tmp_path / "rdms" / "rdm-image-1"))
    assert loaded.rate_weight == 0.5 and report.metrics[1]["rate_weight"] == 0.5


def test_trainer_reads_cached_teacher_outputs_and_never_runs_teacher(tmp_path):
    ds = toy_dataset(32)
    torch.manual_seed(0)
    teacher = TinyNet(embed_dim=12)
    cache_teacher_outputs(teacher, ds, str(tmp_path / "cache"), dtype="float32", progress=False)
    args = _args(tmp_path, method="kd", max_steps=2, logging_steps=1, teacher_cache_dir=str(tmp_path / "cache"))
    trainer = DistillationTrainer(model=TinyNet(), args=args, train_dataset=ds)
    trainer.train()
    assert trainer.teacher_calls == 0 and trainer.state.log_history[0]["teacher_calls"] == 0


# ------------------------------------------------------------------ bad input, before training
def test_bad_input_errors_before_training(tmp_path):
    ds = toy_dataset(16)
    teacher = TinyNet(embed_dim=12)
    with pytest.raises(DistillationInputError, match="teacher predicts 5 classes but the student 4"):
        DistillationTrainer(model=TinyNet(), teacher=TinyNet(num_classes=5), args=_args(tmp_path, method="kd"), train_dataset=ds)
    wrong = [RateDistortionModule(10, hidden_dims=(8, 4, 8), num_classes=4)]
    with pytest.raises(DistillationInputError, match="trained for a teacher embedding of width 10.*is 12"):
        DistillationTrainer(model=TinyNet(), teacher=teacher, args=_args(tmp_path, method="cifd", num_rdms=1, rdm_rates=[1.0]),
                            train_dataset=ds, rdms=wrong)
    with pytest.raises(DistillationInputError, match="needs 3 trained RDMs"):
        DistillationTrainer(model=TinyNet(), teacher=teacher, args=_args(tmp_path, method="cifd"), train_dataset=ds)
    unlabeled = ds.remove_columns("labels")
    with pytest.raises(DistillationInputError, match="no 'labels'/'label' field"):
        DistillationTrainer(model=TinyNet(), teacher=teacher, args=_args(tmp_path, method="kd"), train_dataset=unlabeled)
    cache_teacher_outputs(teacher, toy_dataset(8), str(tmp_path / "cache"), progress=False)
    with pytest.raises(DistillationInputError, match="s8"):
        DistillationTrainer(model=TinyNet(), args=_args(tmp_path, method="kd", teacher_cache_dir=str(tmp_path / "cache")),
                            train_dataset=ds)
    with pytest.raises(DistillationInputError, match="needs a teacher"):
        DistillationTrainer(model=TinyNet(), args=_args(tmp_path, method="kd"), train_dataset=ds)


@pytest.mark.parametrize("kwargs, match", [
    ({"method": "magic"}, "method must be one of"),
    ({"temperature": 0.0}, "temperature must be > 0"),
    ({"lambda_kl": -1.0}, "lambda_kl must be a finite number >= 0"),
    ({"kd_dropout": 1.0}, "kd_dropout is a probability"),
    ({"rdm_rates": [1.0, 2.0]}, "rdm_rates has 2 values for num_rdms=3"),
    ({"rdm_rates": [1.0, -2.0, 3.0]}, "must be >= 0"),
    ({"embedding_distortion": "l3"}, "embedding_distortion must be one of"),
])
def test_config_validation(tmp_path, kwargs, match):
    with pytest.raises(DistillationInputError, match=match):
        _args(tmp_path, **kwargs)


def test_config_parses_from_command_line():
    (cfg,) = HfArgumentParser(DistillationConfig).parse_args_into_dataclasses(
        ["--output_dir", "x", "--method", "cifd", "--num_rdms", "2", "--rdm_rates", "1e4", "1e3", "--kd_dropout", "0.1",
         "--use_ibm", "false", "--report_to", "none", "--use_cpu", "true"])
    assert cfg.method == "cifd" and cfg.rdm_rates == [1e4, 1e3] and cfg.kd_dropout == 0.1 and cfg.use_ibm is False
    assert cfg.remove_unused_columns is False and math.isclose(cfg.lambda_ibm, 0.001)


def test_model_card_for_the_exported_student(tmp_path):
    # save_model() writes the card next to the student; Trainer's own card assumes a PreTrainedModel.
    from huggingface_hub import ModelCard

    ds = toy_dataset(16)
    trainer = DistillationTrainer(model=TinyNet(), teacher=TinyNet(embed_dim=12), train_dataset=ds, eval_dataset=ds,
                                  args=_args(tmp_path, method="kd", max_steps=1))
    trainer.train()
    accuracy = trainer.evaluate()["eval_accuracy"]
    trainer.save_model()
    card = ModelCard.load(str(tmp_path / "out" / "README.md"))
    assert card.data.library_name == "pytorch" and "knowledge-distillation" in card.data.tags
    assert card.data.eval_results[0].metric_value == accuracy and 0 <= accuracy <= 1  # a fraction
    assert "- method: kd" in card.text and f"- eval_accuracy: {accuracy:.6g}" in card.text
    assert (tmp_path / "out" / "model.safetensors").exists()


def test_label_check_on_a_stream_reads_no_record(tmp_path):
    import datasets
    import numpy as np

    reads = []

    def records(with_labels):
        for i in range(8):
            reads.append(i)
            row = {"pixel_values": np.zeros((1, 4, 4), np.float32)}
            yield {**row, "labels": i % 4} if with_labels else row

    def stream(with_labels):
        feats = {"pixel_values": datasets.Array3D((1, 4, 4), "float32")}
        if with_labels:
            feats["labels"] = datasets.Value("int64")
        return datasets.IterableDataset.from_generator(records, gen_kwargs={"with_labels": with_labels},
                                                       features=datasets.Features(feats))

    args = _args(tmp_path, method="kd", max_steps=1)
    DistillationTrainer(model=TinyNet(), teacher=TinyNet(embed_dim=12), args=args, train_dataset=stream(True))
    with pytest.raises(DistillationInputError, match="no 'labels'/'label' field"):
        DistillationTrainer(model=TinyNet(), teacher=TinyNet(embed_dim=12), args=args, train_dataset=stream(False))
    assert reads == []
