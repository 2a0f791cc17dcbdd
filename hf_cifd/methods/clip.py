"""CLIP methods (task "clip"): plain CLIP, open_clip distillation, CLIP-KD, TinyCLIP, CIFD eq.(10)-(13), CKD.

All of them use the symmetric contrastive loss over the GLOBAL batch (:func:`hf_cifd.distributed.clip_loss_global`,
open_clip's local loss + gather with grad). Losses relating whole similarity matrices (open_clip / TinyCLIP
affinity, CLIP-KD CRD / ICL, CKD pairs) are computed on the gathered global matrices (student rows gathered with
gradient, teacher rows without). Per-sample terms (CIFD eq. 12, CLIP-KD FD) are local means (DDP averages them).

Student embeddings are the open_clip adapter's raw features; with the IBM (cifd) the contrastive loss sees the
noisy W^ in training (the student's own embedding space, the one it is exported with; W at evaluation), and the
IBM decoder's output U^ (teacher width) is matched to the teacher / RDM embeddings.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .. import losses
from ..checks import DistillationInputError
from ..distributed import clip_loss_global, gather_no_grad, gather_with_grad
from .base import Method, register_method

MODALITIES = ("image", "text")


def _student_embeddings(student) -> dict[str, torch.Tensor]:
    noisy = student.encoded.extras.get("ibm_noisy", {}) if student.training else {}
    return {m: noisy.get(m, student.encoded.embeddings[m]) for m in MODALITIES}


def _contrastive(student) -> torch.Tensor:
    emb = _student_embeddings(student)
    return clip_loss_global(emb["image"], emb["text"], student.encoded.logit_scale)


def _teacher_scale(teacher) -> torch.Tensor | float:
    if teacher.logit_scale is None:
        raise DistillationInputError(
            "the teacher outputs carry no logit_scale (a teacher-output cache without teacher_logit_scale?): the "
            "relational CLIP baselines need the teacher's similarity matrices."
        )
    scale = teacher.logit_scale
    if isinstance(scale, torch.Tensor):
        scale = scale.detach().float().flatten()[0]  # a cache gives one value per sample
    return scale


def _global_pairs(student, teacher, student_emb=None):
    """Globally gathered (student image, student text, teacher image, teacher text)."""
    emb = student_emb or _student_embeddings(student)
    s_img, _ = gather_with_grad(emb["image"])
    s_txt, _ = gather_with_grad(emb["text"])
    return s_img, s_txt, gather_no_grad(teacher.embeddings["image"]), gather_no_grad(teacher.embeddings["text"])


class _CLIPMethod(Method):
    task = "clip"
    needs_labels = False


@register_method
class CLIPOnly(_CLIPMethod):
    """No teacher: the symmetric contrastive loss (eq. 11) over the global batch."""

    name, uses_teacher = "clip", False

    def loss_terms(self, student, teacher, rdms, batch, extra):
        return {"contrastive": _contrastive(student)}


@register_method
class OpenCLIPDistill(_CLIPMethod):
    """open_clip ``--distill-model``: contrastive + soft cross-entropy of the student's image->text / text->image
    logits against the teacher's (each with its own logit scale), unweighted sum."""

    name, term = "openclip", "distill"

    def loss_terms(self, student, teacher, rdms, batch, extra):
        s_img, s_txt, t_img, t_txt = _global_pairs(student, teacher)
        # losses.tinyclip_affinity_loss is this same function (the two papers' formulas coincide).
        soft_ce = losses.openclip_distill_loss(s_img, s_txt, student.encoded.logit_scale, t_img, t_txt,
                                               _teacher_scale(teacher))
        return {"contrastive": _contrastive(student), self.term: self.config.clip_distill_weight * soft_ce}


@register_method
class TinyCLIPDistill(OpenCLIPDistill):
    """TinyCLIP affinity mimicking (knowledge-distillation part only, no pruning): contrastive + cross-entropy of the
    student's image-text affinities against the teacher's -- the open_clip distillation loss, logged as "affinity"."""

    name, term = "tinyclip", "affinity"


class _LogitScale(nn.Module):
    """A learnable log temperature (CLIP-KD's ICL scale), initialised at log(1/0.07) like CLIP's."""

    def __init__(self, init: float = math.log(1 / 0.07)):
        super().__init__()
        self.value = nn.Parameter(torch.tensor(float(init)))

    def forward(self) -> torch.Tensor:
        return self.value.clamp(max=math.log(100.0)).exp()


def _in_own_dtype(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``module(x)`` with ``x`` cast to the module's dtype: losses run outside autocast, on half-precision student
    embeddings."""
    param = next(module.parameters(), None)
    return module(x if param is None else x.to(param.dtype))


@register_method
class CLIPKD(_CLIPMethod):
    """CLIP-KD (Yang et al., CVPR 2024): contrastive + CRD (KL on the similarity matrices) + ICL (student image vs
    teacher text and vice versa, own learnable scale) + FD (MSE of normalised embeddings, weight 2000), with a linear
    projection student -> teacher width per modality when the widths differ (identity otherwise)."""

    name = "clipkd"

    def extra_modules(self, student_dims, teacher_dims):
        mods = {f"clipkd_proj_{m}": (nn.Linear(student_dims[m], teacher_dims[m], bias=False)
                                     if student_dims[m] != teacher_dims[m] else nn.Identity())
                for m in MODALITIES if m in student_dims and m in teacher_dims}
        mods["clipkd_icl_scale"] = _LogitScale()
        return mods

    def loss_terms(self, student, teacher, rdms, batch, extra):
        c = self.config
        emb = _student_embeddings(student)
        projected = {m: _in_own_dtype(extra[f"clipkd_proj_{m}"], emb[m]) for m in MODALITIES}
        s_img, s_txt, t_img, t_txt = _global_pairs(student, teacher, emb)
        p_img, _ = gather_with_grad(projected["image"])
        p_txt, _ = gather_with_grad(projected["text"])
        crd = losses.clipkd_crd_loss(s_img, s_txt, student.encoded.logit_scale, t_img, t_txt, _teacher_scale(teacher))
        icl = losses.clipkd_icl_loss(p_img, p_txt, t_img, t_txt, extra["clipkd_icl_scale"]())
        fd = sum(losses.clipkd_fd_loss(projected[m], teacher.embeddings[m]) for m in MODALITIES)
        return {"contrastive": _contrastive(student), "crd": c.clipkd_crd_weight * crd,
                "icl": c.clipkd_icl_weight * icl, "fd": c.clipkd_fd_weight * fd}


@register_method
class CIFDCLIP(_CLIPMethod):
    """CIFD for CLIP, eq.(13): ``lambda_CL * L_CL + L_CIFD,I + L_CIFD,L``.

    Per modality m (eq. 12, :func:`hf_cifd.losses.cifd_modality_loss`): ``||U^_m - X_m||^2 + sum_n lambda_n
    ||U^_m - X_{n,m}||^2 + lambda_I * rate_m`` with U^_m the IBM decoder output, X_m the teacher embedding and
    X_{n,m} RDM n's reconstruction, all L2-normalised (the paper's U^ is L2-normalised; comparing unit vectors keeps
    the terms independent of the teachers' feature scale), squared error averaged over dims and batch (element mean).
    Terms are named ``<m>/emb_teacher``, ``<m>/emb_rdm_<n>``, ``<m>/ibm_rate``.
    """

    name, uses_rdms, matches_embeddings = "cifd", True, True

    def loss_terms(self, student, teacher, rdms, batch, extra):
        c = self.config
        terms = {"contrastive": c.lambda_cl * _contrastive(student)}
        for m in MODALITIES:
            if m not in student.matched:
                raise DistillationInputError(
                    f"cifd needs the student's {m} embedding mapped to the teacher's width (IBM or projector); "
                    "is the teacher missing?"
                )
            rdm_embs = [F.normalize(r.embedding.float(), dim=-1) for r in rdms.get(m, [])]
            part = losses.cifd_modality_loss(
                F.normalize(student.matched[m].float(), dim=-1), F.normalize(teacher.embeddings[m].float(), dim=-1),
                rdm_embs, student.ibm_rate.get(m), rdm_weights=c.rdm_weights, lambda_ibm=c.lambda_ibm,
                distortion="mse",
            )
            terms.update({f"{m}/{k}": v for k, v in part.items()})
        return terms


@register_method
class CLIPComparativeKD(_CLIPMethod):
    """Comparative KD on embeddings: contrastive + ``ckd_weight`` * MSE between the differences of (projected,
    normalised) student embeddings and of teacher embeddings over all pairs of the global batch, per modality."""

    name, matches_embeddings = "ckd", True

    def loss_terms(self, student, teacher, rdms, batch, extra):
        terms = {"contrastive": _contrastive(student)}
        for m in MODALITIES:
            s, _ = gather_with_grad(F.normalize(student.matched[m].float(), dim=-1))
            t = F.normalize(gather_no_grad(teacher.embeddings[m]).float(), dim=-1)
            pairs = losses.all_pairs(s.shape[0]).to(s.device)
            ckd = losses.comparative_kd_loss(s, t, pairs)["ckd_teacher"]
            terms[f"{m}/ckd_teacher"] = self.config.ckd_weight * ckd
        return terms
