"""TAKD, DGKD and PKT baselines (issue 12): losses against hand-computed values, assistant training, tiny runs."""

import math

import pytest
import torch

from hf_cifd import DistillationConfig, DistillationInputError, DistillationTrainer, losses as L, train_assistants
from hf_cifd.assistants import table8_assistants

from helpers import TinyNet, toy_dataset
from test_losses import ref_ce, ref_kd


def _args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "out"), report_to=[], use_cpu=True, save_strategy="no",
                per_device_train_batch_size=8, learning_rate=0.1, optim="sgd", disable_tqdm=True,
                lr_scheduler_type="constant", max_steps=2, logging_steps=1, seed=0)
    base.update(kw)
    return DistillationConfig(**base)


# ------------------------------------------------------------------------------------------------ PKT
def test_pkt_loss_hand_computed():
    # student rows orthogonal: kernel (cos+1)/2 = [[1, .5], [.5, 1]] -> rows [2/3, 1/3], [1/3, 2/3];
    # teacher rows identical: kernel all 1 -> rows [.5, .5]. Mean over the 4 entries of p_t log(p_t / p_s):
    # (1/4) * 2 * (.5 log(.5 / (2/3)) + .5 log(.5 / (1/3))) = log(1.125) / 4.
    student = torch.tensor([[2.0, 0.0], [0.0, 3.0]])  # scales must not matter (cosine kernel)
    teacher = torch.tensor([[1.0, 0.0, 0.0], [4.0, 0.0, 0.0]])  # widths differ: kernels are N x N
    assert L.pkt_loss(student, teacher).item() == pytest.approx(math.log(1.125) / 4, rel=1e-5)
    assert L.pkt_loss(teacher, teacher).item() == pytest.approx(0.0, abs=1e-7)
    with pytest.raises(DistillationInputError, match="pkt_loss needs a batch of at least 2"):
        L.pkt_loss(student[:1], teacher[:1])


def test_pkt_gradient_reaches_student_only():
    s = torch.randn(5, 3, requires_grad=True)
    t = torch.randn(5, 7, requires_grad=True)
    L.pkt_loss(s, t).backward()
    assert s.grad.abs().sum() > 0 and t.grad is None


# ------------------------------------------------------------------------------------------------ DGKD
S = [[1.0, 0.0, -1.0], [0.5, 2.0, 0.0]]
T = [[2.0, 0.0, 0.0], [0.0, 1.0, 3.0]]
A0 = [[0.0, 1.0, 0.0], [1.0, 1.0, 1.0]]
A1 = [[-1.0, 0.5, 2.0], [0.0, 0.0, 2.0]]
Y = [2, 1]


def test_dgkd_loss_without_dropout_is_ce_plus_every_kd_term():
    terms = L.dgkd_loss(torch.tensor(S), torch.tensor(Y), torch.tensor(T), [torch.tensor(A0), torch.tensor(A1)],
                        lambda_ce=0.3, lambda_kl=0.7, temperature=2.0, drop_num=0)
    assert set(terms) == {"ce", "kd_teacher", "kd_assistant_0", "kd_assistant_1"}
    assert terms["ce"].item() == pytest.approx(0.3 * ref_ce(S, Y), rel=1e-6)
    for key, ref in (("kd_teacher", T), ("kd_assistant_0", A0), ("kd_assistant_1", A1)):
        assert terms[key].item() == pytest.approx(0.7 * ref_kd(S, ref, 2.0), rel=1e-6)


def test_dgkd_drops_exactly_drop_num_terms_each_step_uniformly():
    g = torch.Generator().manual_seed(0)
    full = {k: ref_kd(S, r, 4.0) for k, r in (("kd_teacher", T), ("kd_assistant_0", A0), ("kd_assistant_1", A1))}
    dropped_count = {k: 0 for k in full}
    for _ in range(300):
        terms = L.dgkd_loss(torch.tensor(S), None, torch.tensor(T), [torch.tensor(A0), torch.tensor(A1)],
                            temperature=4.0, drop_num=1, generator=g)
        zeros = [k for k in full if terms[k].item() == 0.0]
        assert len(zeros) == 1 and not terms[zeros[0]].requires_grad
        dropped_count[zeros[0]] += 1
        for k in full:
            if k not in zeros:
                assert terms[k].item() == pytest.approx(full[k], rel=1e-6)
    assert all(60 < c < 140 for c in dropped_count.values()), dropped_count  # ~100 each
    with pytest.raises(DistillationInputError, match="drop_num must be an int in \\[0, 2\\]"):
        L.dgkd_loss(torch.tensor(S), None, torch.tensor(T), [torch.tensor(A0), torch.tensor(A1)], drop_num=3)


# ------------------------------------------------------------------------------------------------ trainer runs
def _batch(n=8):
    ds = toy_dataset(n)
    return {"pixel_values": torch.stack([ds[i]["pixel_values"] for i in range(n)]),
            "labels": torch.stack([ds[i]["labels"] for i in range(n)])}


def test_takd_chain_then_student_distils_from_the_last_assistant(tmp_path):
    torch.manual_seed(0)
    ds = toy_dataset(32)
    teacher, tas = TinyNet(embed_dim=12, hidden=32), [TinyNet(embed_dim=10, hidden=24), TinyNet(embed_dim=9, hidden=20)]
    before = [p.detach().clone() for p in tas[1].parameters()]
    report = train_assistants(teacher, tas, _args(tmp_path, method="kd"), ds, procedure="takd")
    assert [s.method for s in report.stages] == ["kd", "kd"]
    assert [s.guides for s in report.stages] == [["teacher"], ["assistant_0"]]
    # 2 steps x 8 samples per stage; the teacher only guided the first TA
    assert [s.guide_calls for s in report.stages] == [{"teacher": 16}, {"assistant_0": 16}]
    assert report.teacher_calls == 16 and [s.train_samples for s in report.stages] == [16, 16]
    assert any(not torch.equal(b, p) for b, p in zip(before, tas[1].parameters()))
    assert (tmp_path / "out" / "assistant-1" / "model.safetensors").exists()

    student = TinyNet()
    trainer = DistillationTrainer(model=student, teacher=None, assistants=tas, args=_args(tmp_path, method="takd"),
                                  train_dataset=ds)
    batch = _batch()
    trainer.model.train()
    terms = trainer.method.loss_terms(trainer.model(**batch), trainer.teacher_outputs(batch), {}, batch,
                                      trainer.model.extra)
    s_logits = student(batch["pixel_values"])[1].detach()
    a_logits = tas[1](batch["pixel_values"])[1].detach()
    assert terms["kd_teacher"].item() == pytest.approx(ref_kd(s_logits.tolist(), a_logits.tolist(), 2.0), rel=1e-5)
    assert terms["ce"].item() == pytest.approx(ref_ce(s_logits.tolist(), batch["labels"].tolist()), rel=1e-5)
    assert trainer.teacher_calls == 8  # the check above ran the TA (the chain's last teacher) once per sample
    trainer.train()
    assert trainer.state.log_history[0]["teacher_calls"] == 16


def test_takd_chain_reads_the_teacher_cache_only_in_the_teachers_stage(tmp_path):
    from hf_cifd.data import cache_teacher_outputs

    ds = toy_dataset(16)
    teacher = TinyNet(embed_dim=12, hidden=32)
    cache_teacher_outputs(teacher, ds, str(tmp_path / "cache"), progress=False)
    tas = [TinyNet(embed_dim=10, hidden=24), TinyNet(embed_dim=9, hidden=20)]
    report = train_assistants(teacher, tas, _args(tmp_path, method="kd", teacher_cache_dir=str(tmp_path / "cache")), ds,
                              procedure="takd", save=False)
    # stage 0: the cache replaces the teacher (0 calls); stage 1: assistant 0 really runs (16 samples)
    assert [s.guide_calls for s in report.stages] == [{"teacher": 0}, {"assistant_0": 16}]


def test_dgkd_assistants_and_student_use_all_guides_with_kd_dropout(tmp_path):
    torch.manual_seed(0)
    ds = toy_dataset(32)
    teacher, tas = TinyNet(embed_dim=12, hidden=32), [TinyNet(embed_dim=10, hidden=24), TinyNet(embed_dim=9, hidden=20)]
    report = train_assistants(teacher, tas, _args(tmp_path, method="kd"), ds, procedure="dgkd", save=False)
    assert [s.method for s in report.stages] == ["kd", "dgkd"]
    assert report.stages[1].guide_calls == {"teacher": 16, "assistant_0": 16}
    assert report.teacher_calls == 32 and report.guide_calls == 48
    # cost: stage 0 = 16 x (T + A0), stage 1 = 16 x (T + A0) + 16 x A1, with T=100, A0=10, A1=1 MACs per sample
    assert report.training_macs({"teacher": 100, "assistant_0": 10, "assistant_1": 1}) == 16 * 110 + 16 * 111
    with pytest.raises(DistillationInputError, match="lacks"):
        report.training_macs({"teacher": 100})

    args = _args(tmp_path, method="dgkd", dgkd_drop_num=1, max_steps=3)
    trainer = DistillationTrainer(model=TinyNet(), teacher=teacher, assistants=tas, args=args, train_dataset=ds)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert all({"loss/kd_teacher", "loss/kd_assistant_0", "loss/kd_assistant_1", "loss/ce"} <= set(h) for h in logs)
    # exactly one of the three KD terms is zero at every step
    assert all(sum(h[f"loss/{k}"] == 0.0 for k in ("kd_teacher", "kd_assistant_0", "kd_assistant_1")) == 1 for h in logs)
    assert logs[-1]["teacher_calls"] == 24 and logs[-1]["assistant_calls"] == 48
    # evaluation keeps every term (no dropout outside training)
    batch = _batch()
    trainer.model.eval()
    with torch.no_grad():
        student = trainer.model(**batch)
        terms = trainer.method.loss_terms(student, trainer.teacher_outputs(batch), trainer.assistant_outputs(batch),
                                          batch, trainer.model.extra)
    assert all(terms[k].item() > 0 for k in ("kd_teacher", "kd_assistant_0", "kd_assistant_1"))


def test_assistant_methods_check_their_inputs(tmp_path):
    ds = toy_dataset(16)
    with pytest.raises(DistillationInputError, match="pass assistants="):
        DistillationTrainer(model=TinyNet(), teacher=TinyNet(), args=_args(tmp_path, method="dgkd"), train_dataset=ds)
    with pytest.raises(DistillationInputError, match="does not use teacher assistants"):
        DistillationTrainer(model=TinyNet(), teacher=TinyNet(), assistants=[TinyNet()], args=_args(tmp_path, method="kd"),
                            train_dataset=ds)
    with pytest.raises(DistillationInputError, match="would drop every one of the 2"):
        DistillationTrainer(model=TinyNet(), teacher=TinyNet(), assistants=[TinyNet()],
                            args=_args(tmp_path, method="dgkd", dgkd_drop_num=2), train_dataset=ds)
    with pytest.raises(DistillationInputError, match="assistant 0 predicts 5 classes"):
        DistillationTrainer(model=TinyNet(), assistants=[TinyNet(num_classes=5)], args=_args(tmp_path, method="takd"),
                            train_dataset=ds)


def test_table8_assistants_are_the_8_6_4_layer_cnns():
    tas = table8_assistants(num_classes=100)
    convs = [sum(isinstance(m, torch.nn.Conv2d) for m in ta.modules()) for ta in tas]
    assert convs == [8, 6, 4] and [ta.embed_dim for ta in tas] == [64, 256, 256]  # Table 8 counts conv layers


def test_pkt_as_indistill_final_stage(tmp_path):
    from test_indistill import TinyCNN, TinyData, _config

    teacher, student = TinyCNN(w0=12, w1=16, seed=1), TinyCNN(w0=8, w1=12, seed=2)
    args = _config(tmp_path, method="pkt", num_train_epochs=2, indistill_layers=["conv1:conv1"], indistill_a=0)
    trainer = DistillationTrainer(student, teacher, args=args, train_dataset=TinyData())
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["indistill_pair"] for h in logs] == [0, 0, -1, -1]
    assert all("loss/pkt" in h and "loss/ce" in h for h in logs[2:]) and all("loss/pkt" not in h for h in logs[:2])
    batch = {"pixel_values": TinyData().x[:4], "labels": TinyData().y[:4]}
    trainer.model.train()
    terms = trainer.method.loss_terms(trainer.model(**batch), trainer.teacher_outputs(batch), {}, batch, trainer.model.extra)
    expected = 30000.0 * L.pkt_loss(student(batch["pixel_values"])[0], teacher(batch["pixel_values"])[0])
    assert terms["pkt"].item() == pytest.approx(expected.item(), rel=1e-5)


# ------------------------------------------------------------------------------------------------ recipe-level knobs
def test_label_smoothing_reaches_every_ce_and_ckd_has_no_ce_by_default(tmp_path):
    import torch.nn.functional as F

    assert _args(tmp_path, method="ckd").lambda_ce == 0.0 and _args(tmp_path, method="kd").lambda_ce == 1.0
    assert _args(tmp_path, method="ckd", lambda_ce=0.5).lambda_ce == 0.5
    batch = _batch()
    for method, extra in (("kd", {}), ("cifd", {"num_rdms": 0, "kd_dropout": 0.0}), ("pkt", {})):
        trainer = DistillationTrainer(model=TinyNet(), teacher=TinyNet(embed_dim=12), train_dataset=toy_dataset(16),
                                      args=_args(tmp_path, method=method, label_smoothing_factor=0.1, **extra))
        trainer.model.eval()
        with torch.no_grad():
            student = trainer.model(**batch)
            terms = trainer.method.loss_terms(student, trainer.teacher_outputs(batch), {}, batch, trainer.model.extra)
        expected = F.cross_entropy(student.logits, batch["labels"], label_smoothing=0.1)
        assert terms["ce"].item() == pytest.approx(expected.item(), rel=1e-6), method
        assert terms["ce"].item() != pytest.approx(F.cross_entropy(student.logits, batch["labels"]).item(), rel=1e-4)


def test_no_weight_decay_on_norm_layers_and_biases(tmp_path):
    net = TinyNet()
    net.body.insert(2, torch.nn.BatchNorm1d(16))
    trainer = DistillationTrainer(model=net, teacher=TinyNet(embed_dim=12), train_dataset=toy_dataset(16),
                                  args=_args(tmp_path, method="kd", weight_decay=5e-5))
    decay = set(trainer.get_decay_parameter_names(trainer.model))
    assert decay == {"student.body.1.weight", "student.body.4.weight", "student.head.weight"}
