"""cifd_loss computes its teacher/RDM terms in one batched pass and checks finiteness once: the terms equal the
per-pair losses, and a non-finite input is still named."""

import pytest
import torch

from hf_cifd import DistillationInputError
from hf_cifd.losses import cifd_loss, embedding_distortion, kd_loss


def _inputs(n=6, c=5, d=7, rdms=3):
    g = torch.Generator().manual_seed(1)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    return dict(student_logits=r(n, c).requires_grad_(), labels=torch.arange(n) % c, teacher_logits=r(n, c),
                rdm_logits=[r(n, c) for _ in range(rdms)], student_embedding=r(n, d).requires_grad_(),
                teacher_embedding=r(n, d), rdm_embeddings=[r(n, d) for _ in range(rdms)], ibm_rate_bits=r(n).abs())


@pytest.mark.parametrize("distortion", ["mse", "smooth_l1"])
def test_batched_terms_equal_the_per_pair_losses(distortion):
    x = _inputs()
    w = [1.0, 0.5, 2.0]
    terms = cifd_loss(**x, rdm_weights=w, lambda_kl=0.7, embedding_weight=3.0, temperature=4.0, distortion=distortion,
                      kd_dropout=0.0)
    s, u = x["student_logits"], x["student_embedding"]
    expected = {"kd_teacher": 0.7 * kd_loss(s, x["teacher_logits"], 4.0),
                "emb_teacher": 3.0 * embedding_distortion(u, x["teacher_embedding"], distortion)}
    for i in range(3):
        expected[f"kd_rdm_{i}"] = 0.7 * w[i] * kd_loss(s, x["rdm_logits"][i], 4.0)
        expected[f"emb_rdm_{i}"] = 3.0 * w[i] * embedding_distortion(u, x["rdm_embeddings"][i], distortion)
    for k, v in expected.items():
        torch.testing.assert_close(terms[k], v, rtol=1e-6, atol=1e-7, msg=k)
    # gradients too: sum of the batched terms vs sum of the per-pair ones
    got = torch.autograd.grad(sum(terms[k] for k in expected), (s, u))
    ref = torch.autograd.grad(sum(expected.values()), (s, u))
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_dropped_sources_are_graph_free_zeros_and_kept_ones_match():
    x = _inputs()
    gen = torch.Generator().manual_seed(1)
    keep = (torch.rand(4, generator=torch.Generator().manual_seed(1)) >= 0.5).tolist()  # the draw cifd_loss makes
    assert not all(keep) and any(keep)
    terms = cifd_loss(**x, kd_dropout=0.5, generator=gen)
    for i, key in enumerate(["teacher", "rdm_0", "rdm_1", "rdm_2"]):
        target = x["teacher_logits"] if i == 0 else x["rdm_logits"][i - 1]
        if keep[i]:
            torch.testing.assert_close(terms[f"kd_{key}"], kd_loss(x["student_logits"], target), rtol=1e-6, atol=1e-7)
        else:
            assert terms[f"kd_{key}"].item() == 0.0 and not terms[f"kd_{key}"].requires_grad


@pytest.mark.parametrize("field, index, name", [("rdm_embeddings", 1, r"rdm_embeddings\[1\]"),
                                                ("rdm_logits", 2, r"rdm_logits\[2\]"),
                                                ("teacher_embedding", None, "teacher_embedding")])
def test_one_finiteness_check_still_names_the_bad_input(field, index, name):
    x = _inputs()
    bad = x[field][index] if index is not None else x[field]
    bad[0, 1] = float("nan")
    with pytest.raises(DistillationInputError, match=rf"{name} contains 1 non-finite"):
        cifd_loss(**x, kd_dropout=0.0)


def test_logged_term_means_when_the_term_set_changes_between_steps(tmp_path):
    # The trainer sums the steps' terms as one vector per term set; a change of set (e.g. InDistill's warm-up ->
    # the method) folds it into the per-name sums: each mean = sum over the steps that had it / steps logged.
    from hf_cifd import DistillationConfig, DistillationTrainer

    from helpers import TinyNet, toy_dataset

    args = DistillationConfig(output_dir=str(tmp_path), method="student", report_to=[], use_cpu=True, save_strategy="no")
    trainer = DistillationTrainer(model=TinyNet(), args=args, train_dataset=toy_dataset(8))
    t = torch.tensor
    for terms in ({"a": t(1.0), "b": t(2.0)}, {"a": t(3.0), "b": t(4.0)}, {"a": t(5.0)}, {"a": t(7.0), "b": t(8.0)}):
        trainer._record(terms)
    trainer.log({"loss": 0.0})
    logged = trainer.state.log_history[-1]
    assert logged["loss/a"] == pytest.approx(16 / 4) and logged["loss/b"] == pytest.approx(14 / 4)
    trainer._record({"c": t(1.0)})
    trainer.log({"loss": 0.0})
    assert trainer.state.log_history[-1]["loss/c"] == pytest.approx(1.0) and "loss/a" not in trainer.state.log_history[-1]
