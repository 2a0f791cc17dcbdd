"""Distillation losses: CIFD (Saidutta et al., NeurIPS 2024) and the baselines it is compared against.

Every loss is a pure function of tensors (no modules, no state). Equation numbers refer to the CIFD
paper; other methods cite their reference implementation.

Conventions shared by all functions:

* Embedding distortions (the paper's ``||a - b||_2^2`` and its smooth-L1 variant) are the MEAN over all
  elements, PyTorch's ``MSELoss`` / ``SmoothL1Loss`` default, i.e. ``||a - b||^2 / dim`` averaged over the
  batch. The paper's weights assume this scale: with a sum over a 512- or 2048-wide embedding, the
  embedding-loss weight 100 would swamp the CE/KD terms and R = 1e3..1e4 would make the rate irrelevant.
  Element-wise "MSE" losses of other methods (FitNet, CKD, CLIP-KD FD) use the same ``F.mse_loss`` mean.
* Rates are bits per sample, tensors of shape ``(N,)``, averaged over the batch.
* Targets (teacher, RDM outputs) are detached: a distillation loss never pushes gradient into the model
  being imitated, even when that model (e.g. an RDM trained in parallel) shares the autograd graph.
* Half-precision inputs are upcast to float32 before softmaxes and sums of squares.
* Composite objectives return ``dict[str, Tensor]`` of already-weighted scalar terms with stable names;
  ``total_loss`` sums them.
* Bad input raises :class:`hf_cifd.checks.DistillationInputError` with a message naming the input.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F

from hf_cifd.checks import (
    DistillationInputError,
    check_all_finite,
    check_finite,
    check_labels,
    check_positive,
    check_probability,
    check_same_batch,
    check_width,
)

__all__ = [
    "CLIPKD_FD_WEIGHT",
    "DISTORTIONS",
    "all_pairs",
    "cifd_loss",
    "cifd_modality_loss",
    "clip_contrastive_loss",
    "clipkd_crd_loss",
    "clipkd_fd_loss",
    "clipkd_icl_loss",
    "comparative_kd_loss",
    "dgkd_loss",
    "kd_drop_count_mask",
    "embedding_distortion",
    "fitnet_loss",
    "kd_dropout_mask",
    "kd_loss",
    "openclip_distill_loss",
    "pkt_loss",
    "rate_distortion_loss",
    "rdm_loss",
    "rkd_loss",
    "tinyclip_affinity_loss",
    "total_loss",
]

#: Weight of the CLIP-KD feature-distillation term in Yang et al. (CVPR 2024); applied by the caller.
CLIPKD_FD_WEIGHT = 2000.0

#: Accepted values of the ``distortion`` / ``kind`` arguments.
DISTORTIONS = ("mse", "smooth_l1")


# --------------------------------------------------------------------------------------------------
# Input checks (all raise DistillationInputError)
# --------------------------------------------------------------------------------------------------


def _check_non_negative(name: str, value: float) -> None:
    # Loss weights may be 0 (switches a term off but keeps its key for logging); negatives are bugs.
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
        raise DistillationInputError(f"{name} must be a finite number >= 0, got {value!r}.")


def _check_batched(name: str, tensor: torch.Tensor, exact_dim: int | None = None) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise DistillationInputError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}.")
    if exact_dim is not None and tensor.dim() != exact_dim:
        raise DistillationInputError(
            f"{name} must have {exact_dim} dims (batch first), got shape {tuple(tensor.shape)}."
        )
    if tensor.dim() < 2:
        raise DistillationInputError(
            f"{name} must have shape (batch, features...), got shape {tuple(tensor.shape)}."
        )


def _check_matching(
    pred_name: str, pred: torch.Tensor, target_name: str, target: torch.Tensor, exact_dim: int | None = 2,
    finite: bool = True,
) -> None:
    """Two tensors compared element-wise: same batch, same shape, finite (``finite=False``: the caller checked)."""
    _check_batched(pred_name, pred, exact_dim)
    _check_batched(target_name, target, exact_dim)
    check_same_batch(**{pred_name: pred, target_name: target})
    check_width(
        target_name,
        target,
        pred.shape[-1],
        hint=f"It is compared element-wise with {pred_name}; project one of them first.",
    )
    if pred.shape != target.shape:
        raise DistillationInputError(
            f"{pred_name} and {target_name} must have the same shape, got {tuple(pred.shape)} and "
            f"{tuple(target.shape)}."
        )
    if finite:
        check_all_finite({pred_name: pred, target_name: target})


def _check_relational(loss: str, s_name: str, student: torch.Tensor, t_name: str, teacher: torch.Tensor) -> None:
    """Losses relating the samples of a batch to each other: (N, D_s) / (N, D_t), finite, N >= 2."""
    _check_batched(s_name, student, exact_dim=2)
    _check_batched(t_name, teacher, exact_dim=2)
    check_same_batch(**{s_name: student, t_name: teacher})
    check_all_finite({s_name: student, t_name: teacher})
    if student.shape[0] < 2:
        raise DistillationInputError(f"{loss} needs a batch of at least 2 samples, got {student.shape[0]}.")


def _check_kind(kind: str) -> None:
    if kind not in DISTORTIONS:
        raise DistillationInputError(f"distortion kind must be one of {DISTORTIONS}, got {kind!r}.")


def _check_logit_scale(name: str, scale: float | torch.Tensor) -> None:
    if isinstance(scale, torch.Tensor):
        if scale.dim() != 0:
            raise DistillationInputError(
                f"{name} must be a float or a 0-dim tensor, got shape {tuple(scale.shape)}."
            )
        check_finite(name, scale)
        check_positive(name, float(scale.detach()))
    else:
        check_positive(name, scale)


def _check_labels_for(logits_name: str, logits: torch.Tensor, labels: torch.Tensor) -> None:
    if not isinstance(labels, torch.Tensor) or labels.dim() != 1:
        shape = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise DistillationInputError(f"labels must be a 1-dim tensor of class ids, got {shape}.")
    check_same_batch(**{logits_name: logits, "labels": labels})
    check_labels(labels, logits.shape[-1])


def _check_rate(name: str, rate_bits: torch.Tensor, ref_name: str | None = None,
                ref: torch.Tensor | None = None, finite: bool = True) -> None:
    if not isinstance(rate_bits, torch.Tensor) or rate_bits.dim() != 1:
        shape = tuple(rate_bits.shape) if isinstance(rate_bits, torch.Tensor) else type(rate_bits).__name__
        raise DistillationInputError(
            f"{name} must be bits per sample of shape (batch,), got {shape}. From compressai "
            "likelihoods use -torch.log2(likelihoods).flatten(1).sum(1)."
        )
    if ref is not None:
        check_same_batch(**{ref_name: ref, name: rate_bits})
    if finite:
        check_finite(name, rate_bits)


def _check_kd_pair(student_name: str, student: torch.Tensor, teacher_name: str, teacher: torch.Tensor,
                   temperature: float, finite: bool = True) -> None:
    check_positive("temperature", temperature)
    _check_matching(student_name, student, teacher_name, teacher, exact_dim=2, finite=finite)


# --------------------------------------------------------------------------------------------------
# Unchecked cores, shared by the public losses
# --------------------------------------------------------------------------------------------------


def _loss_dtype(dtype: torch.dtype) -> torch.dtype:
    # fp16/bf16 softmaxes and 100 x sum-of-squares overflow or lose the small KD gradients.
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _upcast(t: torch.Tensor) -> torch.Tensor:
    return t.to(_loss_dtype(t.dtype))


def _zero_loss(ref: torch.Tensor) -> torch.Tensor:
    # Graph-free zero for a dropped term: keeps dict keys stable without tying it to any parameter.
    return torch.zeros((), device=ref.device, dtype=_loss_dtype(ref.dtype))


def _log_probs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    return F.log_softmax(_upcast(logits) / temperature, dim=-1)


def _kd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    log_p_student = _log_probs(student_logits, temperature)
    log_p_teacher = _log_probs(teacher_logits.detach(), temperature)
    # log_target avoids 0 * log(0) when the teacher is very confident.
    kl = F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True)
    # T^2 keeps gradient magnitudes comparable across temperatures (Hinton et al. 2015).
    return kl * temperature**2


def _distortion(pred: torch.Tensor, target: torch.Tensor, kind: str, per_sample: bool = False) -> torch.Tensor:
    pred, target = _upcast(pred), _upcast(target.detach())
    if kind == "mse":
        per_element = (pred - target).pow(2)
    else:
        per_element = F.smooth_l1_loss(pred, target, reduction="none", beta=1.0)
    return per_element.flatten(1).mean(1) if per_sample else per_element.mean()


def _distortion_many(pred: torch.Tensor, targets: list[torch.Tensor], kind: str) -> torch.Tensor:
    """``[_distortion(pred, t, kind) for t in targets]`` as one (k,) tensor, computed on the stacked targets."""
    target = torch.stack([t.detach() for t in targets])
    pred, target = _upcast(pred), _upcast(target)
    pred = pred.unsqueeze(0).expand_as(target)
    if kind == "mse":
        per_element = (pred - target).pow(2)
    else:
        per_element = F.smooth_l1_loss(pred, target, reduction="none", beta=1.0)
    return per_element.flatten(1).mean(dim=1)


def _kd_many(log_p_student: torch.Tensor, targets: list[torch.Tensor], temperature: float) -> torch.Tensor:
    """``[_kd(s, t, temperature) for t in targets]`` as one (k,) tensor, from the student's tempered log-probs."""
    log_p_teacher = _log_probs(torch.stack([t.detach() for t in targets]), temperature)
    kl = F.kl_div(log_p_student.unsqueeze(0).expand_as(log_p_teacher), log_p_teacher, reduction="none",
                  log_target=True)
    return kl.flatten(1).sum(dim=1) / log_p_student.shape[0] * temperature**2


def _cross_entropy(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    return F.cross_entropy(_upcast(logits), labels, label_smoothing=label_smoothing)


def _clip_logits(image_embeds: torch.Tensor, text_embeds: torch.Tensor,
                 logit_scale: float | torch.Tensor) -> torch.Tensor:
    """image->text logits ``scale * <img_b, txt_k>`` on L2-normalised rows; ``.T`` gives text->image."""
    image = F.normalize(_upcast(image_embeds), dim=-1)
    text = F.normalize(_upcast(text_embeds), dim=-1)
    return logit_scale * image @ text.T


def _diagonal_ce(logits: torch.Tensor) -> torch.Tensor:
    """InfoNCE of one direction (eq. 10): row b's positive is column b; mean over rows."""
    targets = torch.arange(logits.shape[0], device=logits.device)
    return F.cross_entropy(logits, targets)


def _soft_ce(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """-(softmax(teacher) * log_softmax(student)).sum(1).mean(0)."""
    teacher_probs = F.softmax(teacher_logits.detach(), dim=-1)
    return -(teacher_probs * F.log_softmax(student_logits, dim=-1)).sum(dim=-1).mean()


def _mean_rate(rate_bits: torch.Tensor) -> torch.Tensor:
    return _upcast(rate_bits).mean()


def _guided_terms(
    prefix: str,
    input_names: tuple[str, str],
    student: torch.Tensor,
    teacher: torch.Tensor | None,
    rdms: Sequence[torch.Tensor],
    rdm_weights: Sequence[float],
    scale: float,
    keep: Sequence[bool],
    check: Callable[[str, torch.Tensor], None],
    compute_many: Callable[[torch.Tensor, list[torch.Tensor]], torch.Tensor],
) -> dict[str, torch.Tensor]:
    """``{prefix}_teacher`` = scale*L(S,T) and ``{prefix}_rdm_{n}`` = scale*lambda_n*L(S,RDM_n).

    ``keep[0]`` belongs to the teacher and ``keep[n + 1]`` to RDM n; dropped terms are graph-free zeros.
    ``input_names`` (teacher name, RDM list name) label the inputs in error messages. Every input is
    checked even when its term is dropped, so errors do not depend on the dropout draw. ``compute_many(S,
    [targets])`` gives L(S, target) for all kept targets at once, shape (k,): one batched computation instead
    of one per target (a step of a small student is dominated by the number of operations).
    """
    teacher_name, rdms_name = input_names
    sources = [] if teacher is None else [("teacher", teacher_name, teacher, 1.0, keep[0])]
    sources += [
        (f"rdm_{n}", f"{rdms_name}[{n}]", rdm, weight, keep[n + 1])
        for n, (rdm, weight) in enumerate(zip(rdms, rdm_weights))
    ]
    for _, name, target, _, _ in sources:
        check(name, target)
    kept = [(key, target, scale * weight) for key, _, target, weight, k in sources if k]
    values: dict[str, torch.Tensor] = {}
    if kept:
        batch = compute_many(student, [t for _, t, _ in kept])
        weights = [w for _, _, w in kept]
        if any(w != 1.0 for w in weights):  # one multiplication for all terms
            batch = batch * torch.tensor(weights, dtype=batch.dtype, device=batch.device)
        values = dict(zip((key for key, _, _ in kept), batch.unbind(0)))
    return {f"{prefix}_{key}": values[key] if k else _zero_loss(student) for key, _, _, _, k in sources}


def _embedding_terms(
    student_embedding: torch.Tensor,
    teacher_embedding: torch.Tensor | None,
    rdm_embeddings: Sequence[torch.Tensor],
    rdm_weights: Sequence[float],
    scale: float,
    distortion: str,
    keep: Sequence[bool],
    finite: bool = True,
) -> dict[str, torch.Tensor]:
    """Embedding part of eqs. (8)/(12)/(23): D(U,X) + sum_n lambda_n D(U,X_n), times ``scale``."""
    _check_kind(distortion)
    return _guided_terms(
        "emb", ("teacher_embedding", "rdm_embeddings"), student_embedding, teacher_embedding,
        rdm_embeddings, rdm_weights, scale, keep,
        check=lambda name, target: _check_matching(
            "student_embedding", student_embedding, name, target, exact_dim=None, finite=finite
        ),
        compute_many=lambda s, ts: _distortion_many(s, ts, distortion),
    )


def _resolve_rdm_weights(rdm_weights: Sequence[float] | None, num_rdms: int) -> list[float]:
    weights = [1.0] * num_rdms if rdm_weights is None else list(rdm_weights)
    if len(weights) != num_rdms:
        raise DistillationInputError(
            f"rdm_weights has {len(weights)} entries but there are {num_rdms} RDMs; give one weight "
            "per RDM or leave it None (all 1.0)."
        )
    for n, w in enumerate(weights):
        check_positive(f"rdm_weights[{n}]", w)
    return weights


# --------------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------------


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 2.0) -> torch.Tensor:
    """Hinton KD: ``KL(softmax(t/T) || softmax(s/T)) * T^2``; the KL of the paper's eqs. (5), (9), (22), (23).

    Reduction: KL summed over classes, averaged over the batch ("batchmean"). Logits are ``(N, C)``;
    flatten sequences to ``(N*L, C)`` first. ``teacher_logits`` is detached.
    """
    _check_kd_pair("student_logits", student_logits, "teacher_logits", teacher_logits, temperature)
    return _kd(student_logits, teacher_logits, temperature)


def embedding_distortion(pred: torch.Tensor, target: torch.Tensor, kind: str = "mse", *,
                         per_sample: bool = False) -> torch.Tensor:
    """Embedding distortion ``D(pred, target)`` of eqs. (4), (8), (12), (23).

    ``kind="mse"``: ``||pred - target||_2^2``; ``kind="smooth_l1"``: element-wise smooth-L1 (beta=1),
    the ImageNet variant of the paper (appendix A.2). Reduction: MEAN over all elements (``||.||^2 / dim``
    averaged over the batch; see the module docstring for why); ``per_sample=True``: one value per sample
    (``(N,)``, whose mean is the default result). ``target`` is detached.
    """
    _check_kind(kind)
    _check_matching("pred", pred, "target", target, exact_dim=None)
    return _distortion(pred, target, kind, per_sample)


def rate_distortion_loss(
    x: torch.Tensor, x_hat: torch.Tensor | None, rate_bits: torch.Tensor, rate_weight: float, distortion: str = "mse"
) -> dict[str, torch.Tensor]:
    """RDM rate-distortion objective, eq. (4): ``R * D(X, X^) - log q(Y^)``.

    Returns ``{"distortion": R * D(x_hat, x), "rate": mean(rate_bits)}`` where ``R = rate_weight`` (>= 0)
    and ``D`` is :func:`embedding_distortion` (mean over elements). ``rate_bits`` is
    ``-log2 q(Y^)`` per sample, shape ``(N,)``, averaged over the batch. The paper's ``-log q`` in nats
    is ``ln 2`` times this; the difference is a rescaling of ``R``. ``R = 0`` (with ``x_hat`` None: an RDM
    without reconstruction, CIFD A.1.1) drops the distortion term: ``{"rate": ...}`` only.
    """
    _check_non_negative("rate_weight", rate_weight)
    _check_kind(distortion)
    _check_rate("rate_bits", rate_bits, "x", x)
    if x_hat is None or rate_weight == 0:
        if x_hat is None and rate_weight != 0:
            raise DistillationInputError(f"x_hat is None (no reconstruction) but rate_weight R = {rate_weight}: use R = 0.")
        return {"rate": _mean_rate(rate_bits)}
    _check_matching("x_hat", x_hat, "x", x, exact_dim=None)
    return {"distortion": rate_weight * _distortion(x_hat, x, distortion), "rate": _mean_rate(rate_bits)}


def rdm_loss(
    x: torch.Tensor,
    x_hat: torch.Tensor | None,
    rate_bits: torch.Tensor,
    rate_weight: float,
    distortion: str = "mse",
    logits: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    teacher_logits: torch.Tensor | None = None,
    lambda_ce: float = 1.0,
    lambda_kl: float = 1.0,
    temperature: float = 2.0,
) -> dict[str, torch.Tensor]:
    """Classification RDM objective, eqs. (5)/(22).

    Terms: ``"distortion"`` and ``"rate"`` from :func:`rate_distortion_loss`; ``"ce"`` =
    ``lambda_ce * CE(logits, labels)`` (mean over batch) when ``labels`` is given; ``"kd"`` =
    ``lambda_kl * kd_loss(logits, teacher_logits, temperature)`` when ``teacher_logits`` is given.
    ``logits`` are the RDM head's logits and are required by either of the last two terms.
    """
    terms = rate_distortion_loss(x, x_hat, rate_bits, rate_weight, distortion)
    if logits is None:
        if labels is not None or teacher_logits is not None:
            raise DistillationInputError(
                "labels / teacher_logits were given but logits is None: pass the RDM head's logits."
            )
        return terms
    _check_non_negative("lambda_ce", lambda_ce)
    _check_non_negative("lambda_kl", lambda_kl)
    _check_batched("logits", logits, exact_dim=2)
    check_same_batch(x=x, logits=logits)
    check_finite("logits", logits)
    if labels is not None:
        _check_labels_for("logits", logits, labels)
        terms["ce"] = lambda_ce * _cross_entropy(logits, labels)
    if teacher_logits is not None:
        terms["kd"] = lambda_kl * kd_loss(logits, teacher_logits, temperature)
    return terms


def kd_dropout_mask(
    num_terms: int,
    p: float,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """DGKD "KD dropout" (Son et al. 2021; used by CIFD, appendix A): which teacher/assistant terms to keep.

    Each of ``num_terms`` terms is KEPT independently with probability ``1 - p``; returns a bool tensor
    of shape ``(num_terms,)`` (True = kept). ``p = 0`` keeps everything without consuming random numbers.
    Kept terms are not rescaled by ``1/(1-p)`` (DGKD does not rescale).
    """
    check_probability("kd_dropout p", p)
    if not isinstance(num_terms, int) or num_terms < 0:
        raise DistillationInputError(f"num_terms must be an int >= 0, got {num_terms!r}.")
    if p == 0:
        return torch.ones(num_terms, dtype=torch.bool, device=device)
    # Draw on the generator's device (a CPU generator cannot fill a CUDA tensor), then move.
    draw_device = generator.device if generator is not None else device
    keep = torch.rand(num_terms, generator=generator, device=draw_device) >= p
    return keep.to(device) if device is not None else keep


def kd_drop_count_mask(num_terms: int, drop_num: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """DGKD's KD dropout as in its training script (Son et al. 2021, ``--drop-num``): exactly ``drop_num`` of the
    ``num_terms`` teacher/assistant KD terms are dropped per step, chosen uniformly without replacement.

    Returns a CPU bool tensor ``(num_terms,)`` (True = kept). ``drop_num`` must leave at least one term.
    """
    if not isinstance(num_terms, int) or num_terms < 1:
        raise DistillationInputError(f"num_terms must be an int >= 1, got {num_terms!r}.")
    if not isinstance(drop_num, int) or not 0 <= drop_num < num_terms:
        raise DistillationInputError(
            f"drop_num must be an int in [0, {num_terms - 1}] for {num_terms} teacher/assistant terms (at least one "
            f"is kept), got {drop_num!r}."
        )
    keep = torch.ones(num_terms, dtype=torch.bool)
    if drop_num:
        keep[torch.randperm(num_terms, generator=generator)[:drop_num]] = False
    return keep


# --------------------------------------------------------------------------------------------------
# CIFD composite objectives
# --------------------------------------------------------------------------------------------------


def cifd_loss(
    student_logits: torch.Tensor | None,
    labels: torch.Tensor | None,
    teacher_logits: torch.Tensor | None,
    rdm_logits: Sequence[torch.Tensor] | None,
    student_embedding: torch.Tensor | None,
    teacher_embedding: torch.Tensor | None,
    rdm_embeddings: Sequence[torch.Tensor] | None,
    ibm_rate_bits: torch.Tensor | None = None,
    *,
    lambda_ce: float = 1.0,
    lambda_kl: float = 1.0,
    rdm_weights: Sequence[float] | None = None,
    embedding_weight: float = 100.0,
    lambda_ibm: float = 0.001,
    temperature: float = 2.0,
    distortion: str = "smooth_l1",
    kd_dropout: float = 0.25,
    generator: torch.Generator | None = None,
    label_smoothing: float = 0.0,
) -> dict[str, torch.Tensor]:
    """CIFD student objective, eqs. (9)/(23) (with eq. (8) as its embedding part).

    Defaults = :class:`hf_cifd.DistillationConfig`'s, the paper's ImageNet setting (A.2): lambda_I 0.001, smooth-L1;
    its CIFAR setting (A.1.2) is ``lambda_ibm=0.005, distortion="mse"``.

    Terms (each already weighted, each a scalar; sum them with :func:`total_loss`):

    * ``"ce"`` = ``lambda_ce * CE(student_logits, labels)`` (mean over batch; ``label_smoothing`` as in
      ``F.cross_entropy``, e.g. the 0.1 of the ffcv ImageNet recipe the paper trains with)
    * ``"kd_teacher"`` = ``lambda_kl * KD(teacher || student)``; ``"kd_rdm_{n}"`` =
      ``lambda_kl * lambda_n * KD(RDM_n || student)``, KD = :func:`kd_loss` at ``temperature`` (batchmean)
    * ``"emb_teacher"`` = ``embedding_weight * D(U_S, U_T)``; ``"emb_rdm_{n}"`` =
      ``embedding_weight * lambda_n * D(U_S, U_n)``, D = :func:`embedding_distortion` (element mean)
    * ``"ibm_rate"`` = ``lambda_ibm * mean(ibm_rate_bits)`` (IBM rate ``-log2 r(W^)`` per sample)

    ``student_embedding`` is the student embedding after projection / IBM decoding, with the teacher's
    width. Any of the logits, labels, embeddings may be None (e.g. embedding-only use); the terms that
    need them are then absent from the dict, so the key set depends only on which inputs are given.
    ``rdm_logits`` and ``rdm_embeddings`` may each be empty; when both are given they must have one
    entry per RDM. ``rdm_weights`` are the ``lambda_n`` (default all 1.0).

    KD dropout (DGKD): with probability ``kd_dropout`` per call, independently per source, the teacher
    or RDM n is dropped, which zeroes BOTH its KD and its embedding term (one decision per source).
    Dropped terms stay in the dict as graph-free zero tensors (``requires_grad=False``) so logs keep
    their keys. Dropout only applies when there is at least one RDM: with the teacher as the only
    source the objective is exactly ``CE + KD + embedding_weight * D`` (no source to choose between).
    If every present term is dropped and there is no CE/IBM term, :func:`total_loss` is a constant
    zero: skip ``backward`` when ``not loss.requires_grad``.
    """
    rdm_logits = list(rdm_logits or ())
    rdm_embeddings = list(rdm_embeddings or ())
    if rdm_logits and rdm_embeddings and len(rdm_logits) != len(rdm_embeddings):
        raise DistillationInputError(
            f"got {len(rdm_logits)} rdm_logits but {len(rdm_embeddings)} rdm_embeddings; give one of each "
            "per RDM (or leave one list empty)."
        )
    num_rdms = max(len(rdm_logits), len(rdm_embeddings))
    weights = _resolve_rdm_weights(rdm_weights, num_rdms)
    for name, value in (("lambda_ce", lambda_ce), ("lambda_kl", lambda_kl),
                        ("embedding_weight", embedding_weight), ("lambda_ibm", lambda_ibm)):
        _check_non_negative(name, value)
    check_probability("kd_dropout", kd_dropout)
    if student_logits is None and (labels is not None or teacher_logits is not None or rdm_logits):
        raise DistillationInputError(
            "labels / teacher_logits / rdm_logits were given but student_logits is None."
        )
    if student_embedding is None and (teacher_embedding is not None or rdm_embeddings):
        raise DistillationInputError(
            "teacher_embedding / rdm_embeddings were given but student_embedding is None."
        )
    ref = student_logits if student_logits is not None else student_embedding
    if ref is None and ibm_rate_bits is None:
        raise DistillationInputError("cifd_loss needs student_logits, student_embedding or ibm_rate_bits.")
    if student_logits is not None:
        _check_batched("student_logits", student_logits, exact_dim=2)
    if student_logits is not None and student_embedding is not None:
        _check_batched("student_embedding", student_embedding)
        check_same_batch(student_logits=student_logits, student_embedding=student_embedding)
    # One finiteness check for every input (the per-pair checks below skip theirs).
    check_all_finite({"student_logits": student_logits, "teacher_logits": teacher_logits,
                      **{f"rdm_logits[{n}]": t for n, t in enumerate(rdm_logits)},
                      "student_embedding": student_embedding, "teacher_embedding": teacher_embedding,
                      **{f"rdm_embeddings[{n}]": t for n, t in enumerate(rdm_embeddings)},
                      "ibm_rate_bits": ibm_rate_bits})

    keep = kd_dropout_mask(
        1 + num_rdms, kd_dropout if num_rdms else 0.0, generator=generator, device="cpu"
    ).tolist()
    terms: dict[str, torch.Tensor] = {}
    if student_logits is not None:
        if labels is not None:
            _check_labels_for("student_logits", student_logits, labels)
            terms["ce"] = lambda_ce * _cross_entropy(student_logits, labels, label_smoothing)
        terms.update(_guided_terms(
            "kd", ("teacher_logits", "rdm_logits"), student_logits, teacher_logits, rdm_logits, weights,
            lambda_kl, keep,
            check=lambda name, target: _check_kd_pair(
                "student_logits", student_logits, name, target, temperature, finite=False
            ),
            compute_many=lambda s, ts: _kd_many(_log_probs(s, temperature), ts, temperature),
        ))
    if student_embedding is not None:
        terms.update(_embedding_terms(
            student_embedding, teacher_embedding, rdm_embeddings, weights, embedding_weight, distortion, keep,
            finite=False,
        ))
    if ibm_rate_bits is not None:
        _check_rate("ibm_rate_bits", ibm_rate_bits, "student", ref, finite=False)
        terms["ibm_rate"] = lambda_ibm * _mean_rate(ibm_rate_bits)
    return terms


def cifd_modality_loss(
    student_embedding: torch.Tensor,
    teacher_embedding: torch.Tensor,
    rdm_embeddings: Sequence[torch.Tensor] | None,
    ibm_rate_bits: torch.Tensor | None = None,
    *,
    rdm_weights: Sequence[float] | None = None,
    lambda_ibm: float = 0.001,
    distortion: str = "mse",
) -> dict[str, torch.Tensor]:
    """Per-modality CIFD loss for CLIP distillation, eq. (12).

    Terms: ``"emb_teacher"`` = ``D(U^, X)``, ``"emb_rdm_{n}"`` = ``lambda_n * D(U^, X_n)``,
    ``"ibm_rate"`` = ``lambda_ibm * mean(ibm_rate_bits)`` (when given). D is
    :func:`embedding_distortion`: mean over elements (eq. 12's ``1/B sum_b``, per dimension).
    No KD dropout and no extra embedding weight (eq. 12 has neither); eq. (13) adds
    ``lambda_CL * clip_contrastive_loss`` and one of these per modality.
    """
    if student_embedding is None or teacher_embedding is None:
        raise DistillationInputError("cifd_modality_loss needs student_embedding and teacher_embedding.")
    rdm_embeddings = list(rdm_embeddings or ())
    weights = _resolve_rdm_weights(rdm_weights, len(rdm_embeddings))
    _check_non_negative("lambda_ibm", lambda_ibm)
    keep_all = [True] * (1 + len(rdm_embeddings))
    terms = _embedding_terms(
        student_embedding, teacher_embedding, rdm_embeddings, weights, 1.0, distortion, keep_all
    )
    if ibm_rate_bits is not None:
        _check_rate("ibm_rate_bits", ibm_rate_bits, "student_embedding", student_embedding)
        terms["ibm_rate"] = lambda_ibm * _mean_rate(ibm_rate_bits)
    return terms


def clip_contrastive_loss(
    image_embeds: torch.Tensor, text_embeds: torch.Tensor, logit_scale: float | torch.Tensor
) -> torch.Tensor:
    """Symmetric CLIP InfoNCE, eqs. (10)-(11): ``L_CL = L_{I->L} + L_{L->I}``.

    Rows are L2-normalised; ``logits = logit_scale * img @ txt.T`` with ``logit_scale`` the already
    exponentiated ``1/tau`` (float or 0-dim tensor, > 0). Each direction is a cross-entropy with the
    diagonal as target, MEAN over the batch; the two directions are SUMMED as in eq. (11). Note that
    open_clip's ``ClipLoss`` averages them instead (half this value). Inputs are the already gathered
    ``(B, D)`` matrices, image row b paired with text row b.
    """
    _check_logit_scale("logit_scale", logit_scale)
    _check_matching("image_embeds", image_embeds, "text_embeds", text_embeds)
    logits = _clip_logits(image_embeds, text_embeds, logit_scale)
    return _diagonal_ce(logits) + _diagonal_ce(logits.T)


# --------------------------------------------------------------------------------------------------
# Baselines
# --------------------------------------------------------------------------------------------------


def all_pairs(n: int) -> torch.Tensor:
    """All ``n(n-1)/2`` index pairs ``(i, j)`` with ``i < j``, row-major, as a LongTensor ``(P, 2)``."""
    if not isinstance(n, int) or n < 2:
        raise DistillationInputError(f"all_pairs needs an int n >= 2, got {n!r}.")
    return torch.triu_indices(n, n, offset=1).T.contiguous()


def comparative_kd_loss(
    student_out: torch.Tensor,
    teacher_out: torch.Tensor,
    pairs: torch.Tensor,
    labels: torch.Tensor | None = None,
    num_classes: int | None = None,
) -> dict[str, torch.Tensor]:
    """Comparative KD (Xu et al., github.com/alextxu/ckd) on sample pairs.

    For each pair ``(i, j)``: ``d_s = s_i - s_j``, ``d_t = t_i - t_j``, ``d_y = onehot_i - onehot_j``.
    Returns ``{"ckd_teacher": MSE(d_s, d_t)}`` plus ``{"ckd_label": MSE(d_s, d_y)}`` when ``labels``
    are given. MSE = ``F.mse_loss``, the MEAN over all ``P * C`` elements (as the reference code).
    ``student_out`` / ``teacher_out`` are ``(N, C)`` raw logits (or same-width features); ``pairs`` is
    an integer ``(P, 2)`` tensor of row indices (see :func:`all_pairs`). ``num_classes`` defaults to the
    output width and must equal it.
    """
    _check_matching("student_out", student_out, "teacher_out", teacher_out)
    n = student_out.shape[0]
    if (not isinstance(pairs, torch.Tensor) or pairs.dim() != 2 or pairs.shape[1] != 2
            or pairs.shape[0] == 0 or pairs.dtype.is_floating_point or pairs.dtype == torch.bool):
        desc = f"{tuple(pairs.shape)} {pairs.dtype}" if isinstance(pairs, torch.Tensor) else type(pairs).__name__
        raise DistillationInputError(f"pairs must be a non-empty integer tensor of shape (P, 2), got {desc}.")
    if pairs.min().item() < 0 or pairs.max().item() >= n:
        raise DistillationInputError(
            f"pairs index rows of a batch of {n}: values must lie in [0, {n - 1}], got "
            f"[{pairs.min().item()}, {pairs.max().item()}]."
        )
    i, j = pairs[:, 0].long(), pairs[:, 1].long()
    student, teacher = _upcast(student_out), _upcast(teacher_out.detach())
    d_student = student[i] - student[j]
    terms = {"ckd_teacher": F.mse_loss(d_student, teacher[i] - teacher[j])}
    if labels is not None:
        width = student_out.shape[1]
        if num_classes is not None and num_classes != width:
            raise DistillationInputError(
                f"num_classes={num_classes} but student_out has width {width}: the label term compares "
                "one-hot differences with logit differences, so they must match."
            )
        _check_labels_for("student_out", student_out, labels)
        onehot = F.one_hot(labels.long(), width).to(d_student.dtype)
        terms["ckd_label"] = F.mse_loss(d_student, onehot[i] - onehot[j])
    return terms


def fitnet_loss(student_features: torch.Tensor, teacher_features: torch.Tensor) -> torch.Tensor:
    """FitNet hint loss (Romero et al. 2015): ``F.mse_loss`` (MEAN over all elements).

    ``student_features`` must already be projected to the teacher's shape (the regressor is a module
    elsewhere); ``teacher_features`` is detached.
    """
    _check_matching("student_features", student_features, "teacher_features", teacher_features, exact_dim=None)
    return F.mse_loss(_upcast(student_features), _upcast(teacher_features.detach()))


def dgkd_loss(
    student_logits: torch.Tensor,
    labels: torch.Tensor | None,
    teacher_logits: torch.Tensor,
    assistant_logits: Sequence[torch.Tensor],
    *,
    lambda_ce: float = 1.0,
    lambda_kl: float = 1.0,
    temperature: float = 2.0,
    drop_num: int = 1,
    generator: torch.Generator | None = None,
    label_smoothing: float = 0.0,
) -> dict[str, torch.Tensor]:
    """Densely Guided KD (Son et al., ICCV 2021), their eq. (3) with KD dropout: ``lambda_ce * CE +
    lambda_kl * (KD(T || S) + sum_k KD(A_k || S))`` where exactly ``drop_num`` of the ``1 + K`` KD terms are
    dropped per call (:func:`kd_drop_count_mask`; ``drop_num=0``: none).

    Terms: ``"ce"`` (when ``labels`` is given), ``"kd_teacher"``, ``"kd_assistant_{k}"``; KD = :func:`kd_loss`
    (batchmean x tau^2). Dropped terms are graph-free zeros (stable keys). Their script writes
    ``(1 - lambda) * CE + lambda * T^2 * sum KL``; ``lambda_ce = 1 - lambda, lambda_kl = lambda`` gives that form.
    Assistants are ordered from the largest (closest to the teacher) to the smallest.
    """
    assistant_logits = list(assistant_logits or ())
    _check_non_negative("lambda_ce", lambda_ce)
    _check_non_negative("lambda_kl", lambda_kl)
    _check_batched("student_logits", student_logits, exact_dim=2)
    check_finite("student_logits", student_logits)
    keep = kd_drop_count_mask(1 + len(assistant_logits), drop_num, generator).tolist()
    terms: dict[str, torch.Tensor] = {}
    if labels is not None:
        _check_labels_for("student_logits", student_logits, labels)
        terms["ce"] = lambda_ce * _cross_entropy(student_logits, labels, label_smoothing)
    sources = [("kd_teacher", "teacher_logits", teacher_logits)]
    sources += [(f"kd_assistant_{k}", f"assistant_logits[{k}]", a) for k, a in enumerate(assistant_logits)]
    for (key, name, target), kept in zip(sources, keep):
        _check_kd_pair("student_logits", student_logits, name, target, temperature)
        terms[key] = lambda_kl * _kd(student_logits, target, temperature) if kept else _zero_loss(student_logits)
    return terms


def pkt_loss(student_features: torch.Tensor, teacher_features: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Probabilistic Knowledge Transfer (Passalis & Tefas, ECCV 2018), their eqs. (7)-(10) as in the authors' code.

    Per model: rows L2-normalised, cosine-similarity kernel ``K = (x x^T + 1) / 2`` (in [0, 1]), each row divided by
    its sum (the conditional probabilities ``p_{j|i}``). Loss = ``mean_{i,j} p^t_{j|i} log((p^t_{j|i} + eps) /
    (p^s_{j|i} + eps))``: the KL(teacher || student) of each row, averaged over all ``N^2`` entries (the authors'
    ``torch.mean``, i.e. the mean row KL divided by N). Features are ``(N, D_s)`` / ``(N, D_t)``: the widths may
    differ (the kernels are N x N), so no projector is needed. ``teacher_features`` is detached.
    """
    _check_relational("pkt_loss", "student_features", student_features, "teacher_features", teacher_features)

    def conditional(x: torch.Tensor) -> torch.Tensor:
        x = x / (x.norm(dim=1, keepdim=True) + eps)
        kernel = (x @ x.T + 1.0) / 2.0
        return kernel / kernel.sum(dim=1, keepdim=True)

    p_student = conditional(_upcast(student_features))
    p_teacher = conditional(_upcast(teacher_features.detach()))
    return (p_teacher * torch.log((p_teacher + eps) / (p_student + eps))).mean()


def _rkd_distances(emb: torch.Tensor) -> torch.Tensor:
    """Pairwise euclidean distances divided by the mean of the non-zero ones (diagonal exactly 0)."""
    sq_norms = emb.pow(2).sum(dim=1)
    # Clamping before sqrt keeps the gradient finite for coincident points (Park et al.'s pdist).
    dist = (sq_norms[:, None] + sq_norms[None, :] - 2 * emb @ emb.T).clamp(min=1e-12).sqrt()
    dist = dist * (1 - torch.eye(emb.shape[0], device=emb.device, dtype=emb.dtype))
    return dist / dist[dist > 0].mean()


def _rkd_angles(emb: torch.Tensor) -> torch.Tensor:
    """cos of the angle at vertex i between (e_j - e_i) and (e_k - e_i), for all (i, j, k), flattened."""
    directions = F.normalize(emb[None, :, :] - emb[:, None, :], p=2, dim=2)
    return torch.bmm(directions, directions.transpose(1, 2)).flatten()


def rkd_loss(
    student_emb: torch.Tensor, teacher_emb: torch.Tensor, distance_weight: float = 25.0, angle_weight: float = 50.0
) -> dict[str, torch.Tensor]:
    """Relational KD (Park et al., CVPR 2019), distance and angle terms with the paper's weights.

    ``"rkd_distance"`` = ``distance_weight * smooth_l1(psi_D(S), psi_D(T))`` over the ``N x N`` matrix of
    pairwise distances, each matrix normalised by the mean of its non-zero entries;
    ``"rkd_angle"`` = ``angle_weight * smooth_l1(psi_A(S), psi_A(T))`` over the ``N^3`` triplet cosines.
    smooth_l1 uses beta=1 and the MEAN over all matrix entries (diagonals included), as the reference
    code. Widths of student and teacher may differ (only relations are compared). Memory is
    ``O(N^2 * D)`` for the angle term. ``teacher_emb`` is detached.
    """
    _check_non_negative("distance_weight", distance_weight)
    _check_non_negative("angle_weight", angle_weight)
    _check_relational("rkd_loss", "student_emb", student_emb, "teacher_emb", teacher_emb)
    student, teacher = _upcast(student_emb), _upcast(teacher_emb.detach())
    return {
        "rkd_distance": distance_weight * F.smooth_l1_loss(_rkd_distances(student), _rkd_distances(teacher)),
        "rkd_angle": angle_weight * F.smooth_l1_loss(_rkd_angles(student), _rkd_angles(teacher)),
    }


def _check_clip_pair(prefix: str, image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> None:
    _check_matching(f"{prefix}image_embeds", image_embeds, f"{prefix}text_embeds", text_embeds)


def _check_clip_teacher(
    image_embeds: torch.Tensor, text_embeds: torch.Tensor, logit_scale: float | torch.Tensor,
    teacher_image_embeds: torch.Tensor, teacher_text_embeds: torch.Tensor,
    teacher_logit_scale: float | torch.Tensor | None,
) -> None:
    _check_logit_scale("logit_scale", logit_scale)
    if teacher_logit_scale is not None:
        _check_logit_scale("teacher_logit_scale", teacher_logit_scale)
    _check_clip_pair("", image_embeds, text_embeds)
    _check_clip_pair("teacher_", teacher_image_embeds, teacher_text_embeds)
    check_same_batch(image_embeds=image_embeds, teacher_image_embeds=teacher_image_embeds)


def openclip_distill_loss(
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    logit_scale: float | torch.Tensor,
    teacher_image_embeds: torch.Tensor,
    teacher_text_embeds: torch.Tensor,
    teacher_logit_scale: float | torch.Tensor,
) -> torch.Tensor:
    """Affinity distillation of open_clip's ``DistillClipLoss`` (= TinyCLIP's affinity mimicking).

    For image->text and text->image logits (student with ``logit_scale``, teacher with
    ``teacher_logit_scale``, all embeddings L2-normalised): ``-(softmax(teacher) *
    log_softmax(student)).sum(1).mean(0)``, i.e. soft-target cross-entropy MEAN over rows, then the
    AVERAGE of the two directions. The contrastive part is :func:`clip_contrastive_loss`.
    TinyCLIP's ``ClipSoftLoss`` (Wu et al., ICCV 2023, eq. 1) is the same formula, hence
    :func:`tinyclip_affinity_loss` is an alias of this function. Teacher logits are detached.
    """
    _check_clip_teacher(image_embeds, text_embeds, logit_scale,
                        teacher_image_embeds, teacher_text_embeds, teacher_logit_scale)
    student = _clip_logits(image_embeds, text_embeds, logit_scale)
    teacher = _clip_logits(teacher_image_embeds, teacher_text_embeds, teacher_logit_scale)
    return (_soft_ce(student, teacher) + _soft_ce(student.T, teacher.T)) / 2


#: Alias: TinyCLIP affinity mimicking is the same loss as :func:`openclip_distill_loss`.
tinyclip_affinity_loss = openclip_distill_loss


def clipkd_fd_loss(student_embeds: torch.Tensor, teacher_embeds: torch.Tensor) -> torch.Tensor:
    """CLIP-KD feature distillation (Yang et al., CVPR 2024): ``F.mse_loss`` of L2-normalised embeddings.

    Reduction: MEAN over all elements (one modality per call). The caller projects the student when the
    widths differ and applies the paper's weight :data:`CLIPKD_FD_WEIGHT` (2000).
    """
    _check_matching("student_embeds", student_embeds, "teacher_embeds", teacher_embeds)
    student = F.normalize(_upcast(student_embeds), dim=-1)
    teacher = F.normalize(_upcast(teacher_embeds.detach()), dim=-1)
    return F.mse_loss(student, teacher)


def clipkd_icl_loss(
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    teacher_image_embeds: torch.Tensor,
    teacher_text_embeds: torch.Tensor,
    logit_scale: float | torch.Tensor,
) -> torch.Tensor:
    """CLIP-KD interactive contrastive learning (ICL).

    InfoNCE of student image vs teacher text and of student text vs teacher image (all L2-normalised,
    ``logit_scale`` is CLIP-KD's own learnable cross scale, exponentiated); each direction MEAN over
    the batch, the two directions AVERAGED. Student and teacher widths must match (project first).
    """
    _check_clip_teacher(image_embeds, text_embeds, logit_scale, teacher_image_embeds, teacher_text_embeds, None)
    check_width("teacher_text_embeds", teacher_text_embeds, image_embeds.shape[-1],
                hint="ICL compares student and teacher embeddings directly; project the student first.")
    image_to_teacher_text = _clip_logits(image_embeds, teacher_text_embeds.detach(), logit_scale)
    text_to_teacher_image = _clip_logits(text_embeds, teacher_image_embeds.detach(), logit_scale)
    return (_diagonal_ce(image_to_teacher_text) + _diagonal_ce(text_to_teacher_image)) / 2


def clipkd_crd_loss(
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    logit_scale: float | torch.Tensor,
    teacher_image_embeds: torch.Tensor,
    teacher_text_embeds: torch.Tensor,
    teacher_logit_scale: float | torch.Tensor,
) -> torch.Tensor:
    """CLIP-KD contrastive relational distillation (CRD): KL on the image-text logit matrices.

    ``(KL(softmax(t_i2t) || softmax(s_i2t)) + KL(softmax(t_t2i) || softmax(s_t2i))) / 2``, each KL
    summed over columns and averaged over rows (batchmean, temperature 1). Embeddings are
    L2-normalised. Equals :func:`openclip_distill_loss` minus the mean teacher entropy, so the two have
    the same gradient for the student.
    """
    _check_clip_teacher(image_embeds, text_embeds, logit_scale,
                        teacher_image_embeds, teacher_text_embeds, teacher_logit_scale)
    student = _clip_logits(image_embeds, text_embeds, logit_scale)
    teacher = _clip_logits(teacher_image_embeds, teacher_text_embeds, teacher_logit_scale)
    return (_kd(student, teacher, 1.0) + _kd(student.T, teacher.T, 1.0)) / 2


def total_loss(terms: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Sum of the already-weighted scalar terms of a composite loss dict."""
    if not terms:
        raise DistillationInputError("total_loss got no terms: the loss dict is empty.")
    for name, value in terms.items():
        if not isinstance(value, torch.Tensor) or value.dim() != 0:
            raise DistillationInputError(f"loss term {name!r} must be a 0-dim tensor, got {value!r}.")
    values = list(terms.values())
    if len({(v.dtype, v.device) for v in values}) == 1:
        return torch.stack(values).sum()  # 2 operations (and 2 backward nodes) instead of one per term
    return sum(values)
