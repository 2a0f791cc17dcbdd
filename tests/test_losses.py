"""Tests of hf_cifd.losses against hand-computed values and independent (loop / closed-form) formulas."""

from __future__ import annotations

import math

import pytest
import torch

from hf_cifd import losses as L
from hf_cifd.checks import DistillationInputError


def t64(x) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float64)


# --------------------------------------------------------------------------------------------------
# Independent reference formulas: plain Python loops, explicit log-sum-exp
# --------------------------------------------------------------------------------------------------


def ref_log_softmax(row: list[float]) -> list[float]:
    m = max(row)
    lse = m + math.log(sum(math.exp(v - m) for v in row))
    return [v - lse for v in row]


def ref_kd(student: list[list[float]], teacher: list[list[float]], temp: float) -> float:
    """sum_c p_t log(p_t / p_s) at temperature T, mean over rows, times T^2."""
    total = 0.0
    for s_row, t_row in zip(student, teacher):
        log_q = ref_log_softmax([v / temp for v in s_row])
        log_p = ref_log_softmax([v / temp for v in t_row])
        total += sum(math.exp(lp) * (lp - lq) for lp, lq in zip(log_p, log_q))
    return total / len(student) * temp**2


def ref_ce(logits: list[list[float]], labels: list[int]) -> float:
    return -sum(ref_log_softmax(row)[y] for row, y in zip(logits, labels)) / len(labels)


def ref_sq_dist(a: list[list[float]], b: list[list[float]]) -> float:
    """(a-b)^2 averaged over every element (rows x dims)."""
    return sum(sum((x - y) ** 2 for x, y in zip(ra, rb)) for ra, rb in zip(a, b)) / (len(a) * len(a[0]))


def ref_normalize(rows: list[list[float]]) -> list[list[float]]:
    out = []
    for row in rows:
        norm = math.sqrt(sum(v * v for v in row))
        out.append([v / norm for v in row])
    return out


def ref_sim(a: list[list[float]], b: list[list[float]], scale: float) -> list[list[float]]:
    a, b = ref_normalize(a), ref_normalize(b)
    return [[scale * sum(x * y for x, y in zip(ra, rb)) for rb in b] for ra in a]


def transpose(m: list[list[float]]) -> list[list[float]]:
    return [list(col) for col in zip(*m)]


def ref_soft_ce(student: list[list[float]], teacher: list[list[float]]) -> float:
    total = 0.0
    for s_row, t_row in zip(student, teacher):
        p = [math.exp(v) for v in ref_log_softmax(t_row)]
        total -= sum(pi * lq for pi, lq in zip(p, ref_log_softmax(s_row)))
    return total / len(student)


def smooth_l1(x: float) -> float:
    return 0.5 * x * x if abs(x) < 1 else abs(x) - 0.5


def sgd_reduces(loss_fn, params: list[torch.Tensor], steps: int = 25, lr: float = 0.1) -> tuple[float, float]:
    opt = torch.optim.SGD(params, lr=lr)
    first = None
    for _ in range(steps):
        opt.zero_grad()
        loss = loss_fn()
        first = loss.item() if first is None else first
        loss.backward()
        opt.step()
    return first, loss_fn().item()


S_LOGITS = [[1.0, 2.0, 3.0], [0.0, -1.0, 2.0]]
T_LOGITS = [[3.0, 1.0, 0.0], [1.0, 1.0, 1.5]]


# --------------------------------------------------------------------------------------------------
# KD
# --------------------------------------------------------------------------------------------------


def test_kd_identical_logits_is_zero():
    x = t64(S_LOGITS)
    assert L.kd_loss(x, x.clone(), temperature=3.0).item() == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("temp", [1.0, 2.0, 4.0])
def test_kd_matches_explicit_kl(temp):
    got = L.kd_loss(t64(S_LOGITS), t64(T_LOGITS), temperature=temp).item()
    assert got == pytest.approx(ref_kd(S_LOGITS, T_LOGITS, temp), rel=1e-10)


def test_kd_two_class_closed_form():
    # Teacher probs (3/4, 1/4) at T=2 from logits (2 ln 3, 0); student uniform.
    expected = (0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)) * 4.0
    got = L.kd_loss(t64([[0.0, 0.0]]), t64([[2 * math.log(3.0), 0.0]]), temperature=2.0).item()
    assert got == pytest.approx(expected, rel=1e-12)


def test_kd_teacher_receives_no_gradient_and_half_is_upcast():
    student = t64(S_LOGITS).requires_grad_()
    teacher = t64(T_LOGITS).requires_grad_()
    L.kd_loss(student, teacher).backward()
    assert teacher.grad is None and student.grad is not None
    half = L.kd_loss(t64(S_LOGITS).bfloat16(), t64(T_LOGITS).bfloat16())
    assert half.dtype == torch.float32


def test_kd_sgd_moves_student_towards_teacher():
    student = torch.zeros(2, 3, requires_grad=True)
    teacher = torch.tensor(T_LOGITS)
    first, last = sgd_reduces(lambda: L.kd_loss(student, teacher), [student], steps=50, lr=0.5)
    assert last < 0.2 * first


# --------------------------------------------------------------------------------------------------
# Embedding distortion, rate-distortion, RDM
# --------------------------------------------------------------------------------------------------


def test_embedding_distortion_mse_by_hand():
    # Squared errors 1 + 4 + 9 (row 0) + 3 x 1 (row 1) = 17 over 6 elements.
    got = L.embedding_distortion(t64([[1, 2, 3], [0, 0, 0]]), t64([[0, 0, 0], [1, 1, 1]]))
    assert got.item() == pytest.approx(17 / 6)


def test_embedding_distortion_smooth_l1_by_hand():
    # Row 0 diffs (0.5, 2, -3): 0.125 + 1.5 + 2.5 = 4.125; row 1 zero -> 4.125 over 6 elements.
    pred = t64([[0.5, 2, -3], [1, 1, 1]])
    target = t64([[0, 0, 0], [1, 1, 1]])
    assert L.embedding_distortion(pred, target, kind="smooth_l1").item() == pytest.approx(4.125 / 6)


def test_embedding_distortion_averages_all_elements_of_feature_maps():
    pred = torch.zeros(2, 2, 1, 2, dtype=torch.float64)
    target = torch.ones(2, 2, 1, 2, dtype=torch.float64)
    target[0, 0, 0, 0] = 3.0  # one error of 3 among 8 elements: (9 + 7) / 8
    assert L.embedding_distortion(pred, target).item() == pytest.approx(2.0)


def test_embedding_distortion_gradient_is_analytic():
    a = t64([[1.0, -2.0, 0.5], [3.0, 0.0, 1.0], [0.0, 0.0, 0.0], [2.0, 2.0, 2.0]]).requires_grad_()
    b = t64([[0.0, 1.0, 0.5], [1.0, 1.0, 1.0], [-1.0, 2.0, 0.0], [2.0, 0.0, -2.0]])
    L.embedding_distortion(a, b).backward()
    torch.testing.assert_close(a.grad, 2 * (a.detach() - b) / a.numel())


def test_rate_distortion_loss_by_hand():
    x = t64([[0, 0, 0], [1, 1, 1]])
    x_hat = t64([[1, 2, 3], [0, 0, 0]])  # distortion 17 / 6, see above
    terms = L.rate_distortion_loss(x, x_hat, t64([3.0, 5.0]), rate_weight=0.5)
    assert set(terms) == {"distortion", "rate"}
    assert terms["distortion"].item() == pytest.approx(0.5 * 17 / 6)
    assert terms["rate"].item() == pytest.approx(4.0)


def test_rdm_loss_adds_ce_and_weighted_kd():
    x = t64([[0, 0, 0], [1, 1, 1]])
    x_hat = t64([[1, 2, 3], [0, 0, 0]])
    logits = [[2.0, 0.0, -1.0], [0.5, 0.5, 0.0]]
    labels = [0, 2]
    terms = L.rdm_loss(
        x, x_hat, t64([1.0, 2.0]), 2.0, logits=t64(logits), labels=torch.tensor(labels),
        teacher_logits=t64(T_LOGITS), lambda_ce=0.5, lambda_kl=3.0, temperature=2.0,
    )
    assert set(terms) == {"distortion", "rate", "ce", "kd"}
    assert terms["distortion"].item() == pytest.approx(2.0 * 17 / 6)
    assert terms["rate"].item() == pytest.approx(1.5)
    assert terms["ce"].item() == pytest.approx(0.5 * ref_ce(logits, labels), rel=1e-10)
    assert terms["kd"].item() == pytest.approx(3.0 * ref_kd(logits, T_LOGITS, 2.0), rel=1e-10)
    only_rd = L.rdm_loss(x, x_hat, t64([1.0, 2.0]), 2.0)
    assert set(only_rd) == {"distortion", "rate"}


# --------------------------------------------------------------------------------------------------
# KD dropout
# --------------------------------------------------------------------------------------------------


def test_kd_dropout_p0_keeps_all():
    mask = L.kd_dropout_mask(7, 0.0)
    assert mask.dtype == torch.bool and mask.shape == (7,) and bool(mask.all())


def test_kd_dropout_p_near_one_drops_most():
    mask = L.kd_dropout_mask(1000, 0.99, generator=torch.Generator().manual_seed(0))
    assert int(mask.sum()) < 40


@pytest.mark.parametrize("p", [0.25, 0.6])
def test_kd_dropout_empirical_keep_rate(p):
    gen = torch.Generator().manual_seed(1)
    kept = torch.stack([L.kd_dropout_mask(4, p, generator=gen) for _ in range(2000)])
    assert kept.double().mean().item() == pytest.approx(1 - p, abs=0.02)


def test_kd_dropout_reproducible_with_generator():
    a = L.kd_dropout_mask(50, 0.5, generator=torch.Generator().manual_seed(3))
    b = L.kd_dropout_mask(50, 0.5, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    # Independent reference: term kept iff its uniform draw is >= p.
    assert torch.equal(a, torch.rand(50, generator=torch.Generator().manual_seed(3)) >= 0.5)


# --------------------------------------------------------------------------------------------------
# CIFD
# --------------------------------------------------------------------------------------------------

EMB_S = [[1.0, 0.0, 2.0], [0.5, -1.0, 0.0]]
EMB_T = [[0.0, 0.0, 1.0], [1.0, 1.0, 1.0]]
EMB_R0 = [[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]]
EMB_R1 = [[2.0, 0.0, 2.0], [0.5, -1.0, 1.0]]
R0_LOGITS = [[2.0, 2.0, 0.0], [0.0, 1.0, 0.0]]
R1_LOGITS = [[0.0, 0.0, 1.0], [-1.0, 0.0, 1.0]]
LABELS = [2, 0]


def cifd_inputs(rdms: bool = True):
    return dict(
        student_logits=t64(S_LOGITS), labels=torch.tensor(LABELS), teacher_logits=t64(T_LOGITS),
        rdm_logits=[t64(R0_LOGITS), t64(R1_LOGITS)] if rdms else [],
        student_embedding=t64(EMB_S), teacher_embedding=t64(EMB_T),
        rdm_embeddings=[t64(EMB_R0), t64(EMB_R1)] if rdms else [],
    )


def test_cifd_without_rdms_is_ce_plus_kd_plus_embedding():
    expected = (ref_ce(S_LOGITS, LABELS) + ref_kd(S_LOGITS, T_LOGITS, 2.0)
                + 100.0 * ref_sq_dist(EMB_S, EMB_T))
    for seed in range(20):  # default kd_dropout=0.25 must not drop the only teacher
        terms = L.cifd_loss(**cifd_inputs(rdms=False), distortion="mse", generator=torch.Generator().manual_seed(seed))
        assert set(terms) == {"ce", "kd_teacher", "emb_teacher"}
        assert L.total_loss(terms).item() == pytest.approx(expected, rel=1e-10)


def test_cifd_full_objective_term_by_term():
    rate = [4.0, 6.0]
    terms = L.cifd_loss(
        **cifd_inputs(), ibm_rate_bits=t64(rate), lambda_ce=0.7, lambda_kl=2.0, rdm_weights=[0.5, 0.25],
        embedding_weight=10.0, lambda_ibm=0.01, temperature=3.0, kd_dropout=0.0, distortion="mse",
    )
    expected = {
        "ce": 0.7 * ref_ce(S_LOGITS, LABELS),
        "kd_teacher": 2.0 * ref_kd(S_LOGITS, T_LOGITS, 3.0),
        "kd_rdm_0": 2.0 * 0.5 * ref_kd(S_LOGITS, R0_LOGITS, 3.0),
        "kd_rdm_1": 2.0 * 0.25 * ref_kd(S_LOGITS, R1_LOGITS, 3.0),
        "emb_teacher": 10.0 * ref_sq_dist(EMB_S, EMB_T),
        "emb_rdm_0": 10.0 * 0.5 * ref_sq_dist(EMB_S, EMB_R0),
        "emb_rdm_1": 10.0 * 0.25 * ref_sq_dist(EMB_S, EMB_R1),
        "ibm_rate": 0.01 * 5.0,
    }
    assert set(terms) == set(expected)
    for name, value in expected.items():
        assert terms[name].item() == pytest.approx(value, rel=1e-10), name
    assert L.total_loss(terms).item() == pytest.approx(sum(expected.values()), rel=1e-10)


def test_cifd_smooth_l1_distortion():
    terms = L.cifd_loss(None, None, None, None, t64([[0.5, 2.0]]), t64([[0.0, 0.0]]), [],
                        distortion="smooth_l1", embedding_weight=1.0)
    assert terms["emb_teacher"].item() == pytest.approx((0.125 + 1.5) / 2)


def test_cifd_kd_dropout_zeroes_both_terms_of_a_source():
    p = 0.5
    full = L.cifd_loss(**cifd_inputs(), kd_dropout=0.0)
    seen_drop = seen_keep = False
    for seed in range(12):
        student_logits = t64(S_LOGITS).requires_grad_()
        inputs = {**cifd_inputs(), "student_logits": student_logits}
        terms = L.cifd_loss(**inputs, kd_dropout=p, generator=torch.Generator().manual_seed(seed))
        keep = (torch.rand(3, generator=torch.Generator().manual_seed(seed)) >= p).tolist()
        assert set(terms) == set(full)  # dropped terms stay as keys
        for source, kept in zip(["teacher", "rdm_0", "rdm_1"], keep):
            for kind in ("kd", "emb"):
                value = terms[f"{kind}_{source}"]
                if kept:
                    assert value.item() == pytest.approx(full[f"{kind}_{source}"].item(), rel=1e-12)
                else:
                    assert value.item() == 0.0 and not value.requires_grad and value.grad_fn is None
            seen_drop |= not kept
            seen_keep |= kept
        L.total_loss(terms).backward()  # CE still carries a gradient
        assert student_logits.grad is not None
    assert seen_drop and seen_keep


def test_cifd_embedding_only_use():
    terms = L.cifd_loss(None, None, None, None, t64(EMB_S), t64(EMB_T), [t64(EMB_R0)],
                        ibm_rate_bits=t64([1.0, 3.0]), kd_dropout=0.0, lambda_ibm=0.5, distortion="mse")
    assert set(terms) == {"emb_teacher", "emb_rdm_0", "ibm_rate"}
    assert terms["emb_rdm_0"].item() == pytest.approx(100.0 * ref_sq_dist(EMB_S, EMB_R0))
    assert terms["ibm_rate"].item() == pytest.approx(1.0)


def test_cifd_sgd_reduces_total():
    torch.manual_seed(0)
    logits = torch.zeros(2, 3, requires_grad=True)
    emb = torch.zeros(2, 3, requires_grad=True)

    def terms():
        return L.cifd_loss(
            logits, torch.tensor(LABELS), torch.tensor(T_LOGITS), [torch.tensor(R0_LOGITS)],
            emb, torch.tensor(EMB_T), [torch.tensor(EMB_R0)], embedding_weight=1.0, kd_dropout=0.0, distortion="mse",
        )

    first, last = sgd_reduces(lambda: L.total_loss(terms()), [logits, emb], steps=300, lr=0.6)
    assert last < first
    # Teacher and RDM pull the embedding towards different targets: with equal weights the embedding
    # part cannot go below half their squared distance, reached at the midpoint.
    final = terms()
    floor = 0.5 * ref_sq_dist(EMB_T, EMB_R0)
    assert (final["emb_teacher"] + final["emb_rdm_0"]).item() == pytest.approx(floor, rel=1e-3)
    midpoint = (torch.tensor(EMB_T) + torch.tensor(EMB_R0)) / 2
    torch.testing.assert_close(emb.detach(), midpoint.float(), atol=1e-3, rtol=0)


def test_cifd_modality_loss_by_hand():
    # D(U, X) = (1 + 0 + 0 + 0) / 4; D(U, X_0) = (0 + 1 + 1 + 0) / 4, weighted 0.5; rate mean 15 * 0.01.
    terms = L.cifd_modality_loss(
        t64([[1.0, 0.0], [0.0, 1.0]]), t64([[0.0, 0.0], [0.0, 1.0]]), [t64([[1.0, 1.0], [1.0, 1.0]])],
        t64([10.0, 20.0]), rdm_weights=[0.5], lambda_ibm=0.01,
    )
    assert set(terms) == {"emb_teacher", "emb_rdm_0", "ibm_rate"}
    assert terms["emb_teacher"].item() == pytest.approx(0.25)
    assert terms["emb_rdm_0"].item() == pytest.approx(0.25)
    assert terms["ibm_rate"].item() == pytest.approx(0.15)


# --------------------------------------------------------------------------------------------------
# CLIP contrastive and CLIP distillation baselines
# --------------------------------------------------------------------------------------------------


def test_clip_contrastive_orthogonal_closed_form():
    s = 2.0
    # Each row's logits are (s, 0): CE = log(1 + e^-s); the two directions are summed (eq. 11).
    img = t64([[3.0, 0.0], [0.0, 0.5]])  # norms differ: the loss normalises
    txt = t64([[1.0, 0.0], [0.0, 7.0]])
    assert L.clip_contrastive_loss(img, txt, s).item() == pytest.approx(2 * math.log(1 + math.exp(-s)))
    eye3 = torch.eye(3, dtype=torch.float64)
    got = L.clip_contrastive_loss(eye3, 2 * eye3, torch.tensor(s, dtype=torch.float64)).item()
    assert got == pytest.approx(2 * math.log(1 + 2 * math.exp(-s)))


def test_clip_contrastive_matches_loops():
    img = [[1.0, 2.0, 0.0, -1.0], [0.5, 0.0, 1.0, 1.0], [-1.0, 1.0, 1.0, 0.0]]
    txt = [[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 2.0, 1.0], [-2.0, 0.5, 0.0, 1.0]]
    sim = ref_sim(img, txt, 5.0)
    expected = ref_ce(sim, [0, 1, 2]) + ref_ce(transpose(sim), [0, 1, 2])
    assert L.clip_contrastive_loss(t64(img), t64(txt), 5.0).item() == pytest.approx(expected, rel=1e-10)


def test_clip_contrastive_sgd_and_scale_gradient():
    torch.manual_seed(0)
    img = torch.randn(4, 3, requires_grad=True)
    txt = torch.randn(4, 3)
    first, last = sgd_reduces(lambda: L.clip_contrastive_loss(img, txt, 5.0), [img], steps=30, lr=0.5)
    assert last < first
    scale = torch.tensor(5.0, requires_grad=True)
    L.clip_contrastive_loss(img.detach(), txt, scale).backward()
    assert scale.grad is not None


def test_openclip_distill_orthogonal_closed_form_and_alias():
    s, s_t = 2.0, 1.0
    # Row logits student (s, 0), teacher (s_t, 0): CE = log(1 + e^s) - p0 * s, same in both directions.
    p0 = math.exp(s_t) / (math.exp(s_t) + 1)
    eye = torch.eye(2, dtype=torch.float64)
    got = L.openclip_distill_loss(eye, eye, s, 4 * eye, eye, s_t).item()
    assert got == pytest.approx(math.log(1 + math.exp(s)) - p0 * s)
    assert L.tinyclip_affinity_loss is L.openclip_distill_loss


def test_openclip_distill_matches_loops():
    img = [[1.0, 2.0, 0.0], [0.5, 0.0, 1.0], [-1.0, 1.0, 1.0]]
    txt = [[1.0, 1.0, 0.0], [0.0, 0.0, 2.0], [-2.0, 0.5, 0.0]]
    t_img = [[0.0, 1.0, 0.0, 1.0], [1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 1.0, 1.0]]  # teacher width may differ
    t_txt = [[0.0, 1.0, 0.5, 1.0], [1.0, 0.2, 0.0, 0.0], [0.0, 0.0, 1.0, 0.3]]
    s_sim, t_sim = ref_sim(img, txt, 4.0), ref_sim(t_img, t_txt, 10.0)
    expected = (ref_soft_ce(s_sim, t_sim) + ref_soft_ce(transpose(s_sim), transpose(t_sim))) / 2
    got = L.openclip_distill_loss(t64(img), t64(txt), 4.0, t64(t_img), t64(t_txt), 10.0).item()
    assert got == pytest.approx(expected, rel=1e-10)
    # CRD is the same with the KL instead of the cross-entropy.
    kl = (ref_kd(s_sim, t_sim, 1.0) + ref_kd(transpose(s_sim), transpose(t_sim), 1.0)) / 2
    got_crd = L.clipkd_crd_loss(t64(img), t64(txt), 4.0, t64(t_img), t64(t_txt), 10.0).item()
    assert got_crd == pytest.approx(kl, rel=1e-10)


def test_clipkd_crd_identical_is_zero():
    x = t64([[1.0, 2.0], [0.0, 1.0]])
    y = t64([[1.0, -1.0], [2.0, 1.0]])
    assert L.clipkd_crd_loss(x, y, 3.0, x, y, 3.0).item() == pytest.approx(0.0, abs=1e-12)


def test_clipkd_fd_by_hand():
    # normalize(3, 4) = (0.6, 0.8) vs (1, 0): ((0.4)^2 + 0.8^2) / 2 = 0.4.
    assert L.clipkd_fd_loss(t64([[3.0, 4.0]]), t64([[2.0, 0.0]])).item() == pytest.approx(0.4)
    assert L.CLIPKD_FD_WEIGHT == 2000.0


def test_clipkd_icl_by_hand():
    s = 1.5
    eye = torch.eye(2, dtype=torch.float64)
    swapped = eye.flip(0)
    # Matching: both directions log(1 + e^-s). Student images swapped: i->t rows are (0, s) with
    # target 0 -> log(1 + e^s); t->i still matched -> log(1 + e^-s).
    assert L.clipkd_icl_loss(eye, 2 * eye, 5 * eye, eye, s).item() == pytest.approx(math.log(1 + math.exp(-s)))
    got = L.clipkd_icl_loss(swapped, eye, eye, eye, s).item()
    assert got == pytest.approx((math.log(1 + math.exp(s)) + math.log(1 + math.exp(-s))) / 2)


# --------------------------------------------------------------------------------------------------
# CKD, FitNet, RKD
# --------------------------------------------------------------------------------------------------


def test_all_pairs():
    assert L.all_pairs(4).tolist() == [[0, 1], [0, 2], [0, 3], [1, 2], [1, 3], [2, 3]]
    assert L.all_pairs(5).shape == (10, 2) and L.all_pairs(5).dtype == torch.long


def test_ckd_two_samples_by_hand():
    # d_s = (-2, 1), d_t = (-1, 1) -> ((-1)^2 + 0) / 2; d_y = (1, -1) -> (3^2 + 2^2) / 2.
    terms = L.comparative_kd_loss(t64([[1.0, 2.0], [3.0, 1.0]]), t64([[0.0, 1.0], [1.0, 0.0]]),
                                  torch.tensor([[0, 1]]), labels=torch.tensor([0, 1]), num_classes=2)
    assert set(terms) == {"ckd_teacher", "ckd_label"}
    assert terms["ckd_teacher"].item() == pytest.approx(0.5)
    assert terms["ckd_label"].item() == pytest.approx(6.5)
    assert set(L.comparative_kd_loss(t64([[1.0], [2.0]]), t64([[0.0], [0.0]]), L.all_pairs(2))) == {"ckd_teacher"}


def test_ckd_sgd_reduces_loss():
    torch.manual_seed(0)
    student = torch.zeros(4, 3, requires_grad=True)
    teacher = torch.randn(4, 3)
    labels = torch.tensor([0, 1, 2, 1])
    pairs = L.all_pairs(4)
    first, last = sgd_reduces(
        lambda: L.total_loss(L.comparative_kd_loss(student, teacher, pairs, labels=labels)), [student],
        steps=30, lr=0.5,
    )
    assert last < 0.5 * first


def test_fitnet_by_hand():
    assert L.fitnet_loss(t64([[1.0, 2.0], [3.0, 4.0]]), t64([[1.0, 1.0], [1.0, 1.0]])).item() == pytest.approx(3.5)


def test_rkd_distance_collinear_points_by_hand():
    # Student points 0, 1, 3 on a line: distances 1, 3, 2, mean 2 -> 0.5, 1.5, 1.
    # Teacher points 0, 2, 4 (other axis, other width): distances 2, 4, 2, mean 8/3 -> 0.75, 1.5, 0.75.
    # Differences -0.25, 0, 0.25, each twice in the 3x3 matrix: 4 * 0.5 * 0.25^2 / 9 entries.
    student = t64([[0.0, 0.0], [1.0, 0.0], [3.0, 0.0]])
    teacher = t64([[0.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 4.0, 0.0]])
    terms = L.rkd_loss(student, teacher)
    assert terms["rkd_distance"].item() == pytest.approx(25.0 * 4 * 0.5 * 0.0625 / 9, rel=1e-9)
    # Same ordering along a line: every triplet cosine (+-1 or 0) agrees.
    assert terms["rkd_angle"].item() == pytest.approx(0.0, abs=1e-12)
    scaled = L.rkd_loss(student, 10 * teacher)  # distance term is scale-free
    assert scaled["rkd_distance"].item() == pytest.approx(terms["rkd_distance"].item(), rel=1e-9)


def ref_triplet_cosines(points: list[list[float]]) -> list[float]:
    out = []
    for i, pi in enumerate(points):
        for pj in points:
            for pk in points:
                u = [a - b for a, b in zip(pj, pi)]
                v = [a - b for a, b in zip(pk, pi)]
                nu, nv = math.hypot(*u), math.hypot(*v)
                out.append(0.0 if nu == 0 or nv == 0 else sum(a * b for a, b in zip(u, v)) / (nu * nv))
    return out


def test_rkd_angle_matches_loops():
    right = [[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]]
    equilateral = [[0.0, 0.0], [1.0, 0.0], [0.5, math.sqrt(3) / 2]]
    cs, ct = ref_triplet_cosines(right), ref_triplet_cosines(equilateral)
    expected = 50.0 * sum(smooth_l1(a - b) for a, b in zip(cs, ct)) / len(cs)
    got = L.rkd_loss(t64(right), t64(equilateral), distance_weight=1.0)["rkd_angle"].item()
    assert got == pytest.approx(expected, rel=1e-9)


# --------------------------------------------------------------------------------------------------
# total_loss and bad input
# --------------------------------------------------------------------------------------------------


def test_total_loss_sums_terms():
    assert L.total_loss({"a": t64(1.0), "b": t64(2.5)}).item() == pytest.approx(3.5)


def _x(rows=2, cols=3, fill=0.0):
    return torch.full((rows, cols), fill, dtype=torch.float64)


_NAN = _x()
_NAN[0, 1] = float("nan")
_LBL = torch.tensor([0, 1])


def _cifd(**overrides):
    return L.cifd_loss(**{**cifd_inputs(), **overrides})


BAD_INPUTS = {
    "kd batch": (lambda: L.kd_loss(_x(2), _x(3)), "batch sizes differ"),
    "kd width": (lambda: L.kd_loss(_x(2, 3), _x(2, 4)), r"teacher_logits must have shape \(batch, 3\)"),
    "kd nan": (lambda: L.kd_loss(_NAN, _x()), "student_logits contains 1 non-finite"),
    "kd temperature 0": (lambda: L.kd_loss(_x(), _x(), temperature=0.0), "temperature must be a finite number > 0"),
    "kd temperature <0": (lambda: L.kd_loss(_x(), _x(), temperature=-1.0), "temperature must be"),
    "distortion kind": (lambda: L.embedding_distortion(_x(), _x(), kind="l1"), "distortion kind must be one of"),
    "distortion width": (lambda: L.embedding_distortion(_x(2, 3), _x(2, 2)), r"target must have shape \(batch, 3\)"),
    "distortion inf": (lambda: L.embedding_distortion(_x(), _x(fill=float("inf"))), "target contains 6 non-finite"),
    "rate_weight <0": (lambda: L.rate_distortion_loss(_x(), _x(), t64([1.0, 1.0]), -1.0), "rate_weight must be"),
    "no x_hat with R > 0": (lambda: L.rate_distortion_loss(_x(), None, t64([1.0, 1.0]), 1.0), "use R = 0"),
    "rate shape": (lambda: L.rate_distortion_loss(_x(), _x(), _x(2, 1), 1.0), "bits per sample of shape"),
    "rate batch": (lambda: L.rate_distortion_loss(_x(), _x(), t64([1.0, 1.0, 1.0]), 1.0), "batch sizes differ"),
    "rate nan": (lambda: L.rate_distortion_loss(_x(), _x(), t64([1.0, float("nan")]), 1.0), "rate_bits contains"),
    "rdm labels range": (lambda: L.rdm_loss(_x(), _x(), t64([1.0, 1.0]), 1.0, logits=_x(), labels=torch.tensor([0, 3])),
                         r"labels must lie in \[0, 2\]"),
    "rdm float labels": (lambda: L.rdm_loss(_x(), _x(), t64([1.0, 1.0]), 1.0, logits=_x(), labels=t64([0.0, 1.0])),
                         "integer class ids"),
    "rdm labels no logits": (lambda: L.rdm_loss(_x(), _x(), t64([1.0, 1.0]), 1.0, labels=_LBL), "logits is None"),
    "rdm logits batch": (lambda: L.rdm_loss(_x(), _x(), t64([1.0, 1.0]), 1.0, logits=_x(3), labels=_LBL),
                         "batch sizes differ"),
    "dropout p=1": (lambda: L.kd_dropout_mask(3, 1.0), r"must be in \[0, 1\)"),
    "dropout p<0": (lambda: L.kd_dropout_mask(3, -0.1), r"must be in \[0, 1\)"),
    "cifd dropout p=1": (lambda: _cifd(kd_dropout=1.0), r"kd_dropout must be in \[0, 1\)"),
    "cifd rdm weight 0": (lambda: _cifd(rdm_weights=[1.0, 0.0]), r"rdm_weights\[1\] must be a finite number > 0"),
    "cifd rdm weight count": (lambda: _cifd(rdm_weights=[1.0]), "rdm_weights has 1 entries but there are 2 RDMs"),
    "cifd negative lambda": (lambda: _cifd(lambda_ibm=-0.1), "lambda_ibm must be a finite number >= 0"),
    "cifd temperature": (lambda: _cifd(temperature=0.0), "temperature must be"),
    "cifd rdm logits width": (lambda: _cifd(rdm_logits=[t64(R0_LOGITS), _x(2, 4)]), r"rdm_logits\[1\] must have shape"),
    "cifd rdm emb batch": (lambda: _cifd(rdm_embeddings=[t64(EMB_R0), _x(3)]), "batch sizes differ"),
    "cifd labels range": (lambda: _cifd(labels=torch.tensor([0, 5])), "labels must lie in"),
    "cifd teacher emb nan": (lambda: _cifd(teacher_embedding=_NAN), "teacher_embedding contains"),
    "cifd ibm batch": (lambda: _cifd(ibm_rate_bits=t64([1.0])), "batch sizes differ"),
    "cifd rdm counts": (lambda: _cifd(rdm_embeddings=[t64(EMB_R0)]), "2 rdm_logits but 1 rdm_embeddings"),
    "cifd logits missing": (lambda: _cifd(student_logits=None), "student_logits is None"),
    "cifd distortion": (lambda: _cifd(distortion="l2"), "distortion kind"),
    "modality rdm width": (lambda: L.cifd_modality_loss(_x(), _x(), [_x(2, 4)]), r"rdm_embeddings\[0\] must have shape"),
    "clip scale 0": (lambda: L.clip_contrastive_loss(_x(), _x(), 0.0), "logit_scale must be a finite number > 0"),
    "clip scale tensor <0": (lambda: L.clip_contrastive_loss(_x(), _x(), torch.tensor(-1.0)), "logit_scale must be"),
    "clip batch": (lambda: L.clip_contrastive_loss(_x(2), _x(3), 1.0), "batch sizes differ"),
    "clip width": (lambda: L.clip_contrastive_loss(_x(2, 3), _x(2, 4), 1.0), "text_embeds must have shape"),
    "openclip teacher batch": (lambda: L.openclip_distill_loss(_x(), _x(), 1.0, _x(3), _x(3), 1.0), "batch sizes differ"),
    "openclip teacher scale": (lambda: L.openclip_distill_loss(_x(), _x(), 1.0, _x(), _x(), -2.0), "teacher_logit_scale"),
    "icl width": (lambda: L.clipkd_icl_loss(_x(2, 3), _x(2, 3), _x(2, 4), _x(2, 4), 1.0), "teacher_text_embeds must have shape"),
    "fd width": (lambda: L.clipkd_fd_loss(_x(2, 3), _x(2, 4)), "teacher_embeds must have shape"),
    "crd nan": (lambda: L.clipkd_crd_loss(_x(), _NAN, 1.0, _x(), _x(), 1.0), "text_embeds contains"),
    "ckd pair range": (lambda: L.comparative_kd_loss(_x(), _x(), torch.tensor([[0, 2]])), r"values must lie in \[0, 1\]"),
    "ckd float pairs": (lambda: L.comparative_kd_loss(_x(), _x(), t64([[0.0, 1.0]])), "pairs must be a non-empty integer"),
    "ckd num_classes": (lambda: L.comparative_kd_loss(_x(), _x(), L.all_pairs(2), labels=_LBL, num_classes=5),
                        "num_classes=5 but student_out has width 3"),
    "ckd labels": (lambda: L.comparative_kd_loss(_x(), _x(), L.all_pairs(2), labels=torch.tensor([0, 3])),
                   "labels must lie in"),
    "ckd width": (lambda: L.comparative_kd_loss(_x(2, 3), _x(2, 2), L.all_pairs(2)), "teacher_out must have shape"),
    "fitnet shape": (lambda: L.fitnet_loss(_x(2, 3), _x(2, 4)), "teacher_features must have shape"),
    "rkd batch 1": (lambda: L.rkd_loss(_x(1), _x(1)), "at least 2 samples"),
    "rkd batch": (lambda: L.rkd_loss(_x(2), _x(3)), "batch sizes differ"),
    "rkd weight": (lambda: L.rkd_loss(_x(), _x(), distance_weight=-1.0), "distance_weight must be"),
    "total empty": (lambda: L.total_loss({}), "no terms"),
    "all_pairs n": (lambda: L.all_pairs(1), "n >= 2"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS), ids=list(BAD_INPUTS))
def test_bad_input_raises(case):
    fn, message = BAD_INPUTS[case]
    with pytest.raises(DistillationInputError, match=message):
        fn()
