"""Classification methods: plain student, KD, FitNet, RKD, PKT, TAKD, DGKD, CIFD (eq. 9/23). Comparative KD: ckd.py."""

from __future__ import annotations


from .. import losses
from ..checks import DistillationInputError
from .base import Method, ce_loss, register_method


def _ce(method: Method, student, batch) -> dict:
    return {"ce": method.config.lambda_ce * ce_loss(method.config, student.logits, batch["labels"])}


@register_method
class StudentOnly(Method):
    """No teacher: cross-entropy with the labels (the baseline every table starts from)."""

    name, uses_teacher = "student", False

    def loss_terms(self, student, teacher, rdms, batch, extra):
        return _ce(self, student, batch)


@register_method
class KD(Method):
    """Hinton et al.: lambda_CE * CE + lambda_KL * KL(teacher || student) at temperature tau (x tau^2)."""

    name = "kd"

    def loss_terms(self, student, teacher, rdms, batch, extra):
        c = self.config
        return {**_ce(self, student, batch),
                "kd_teacher": c.lambda_kl * losses.kd_loss(student.logits, teacher.logits, c.temperature)}


@register_method
class FitNet(Method):
    """Romero et al.: CE + embedding_weight * MSE(projected student embedding, teacher embedding)."""

    name, matches_embeddings = "fitnet", True

    def loss_terms(self, student, teacher, rdms, batch, extra):
        hint = losses.fitnet_loss(student.matched["image"], teacher.embeddings["image"])
        return {**_ce(self, student, batch), "fitnet": self.config.embedding_weight * hint}


@register_method
class RKD(Method):
    """Park et al.: CE + RKD distance and angle terms on the (unprojected) embeddings."""

    name = "rkd"

    def loss_terms(self, student, teacher, rdms, batch, extra):
        c = self.config
        terms = losses.rkd_loss(student.encoded.embeddings["image"], teacher.embeddings["image"],
                                distance_weight=c.rkd_distance_weight, angle_weight=c.rkd_angle_weight)
        return {**_ce(self, student, batch), **terms}


@register_method
class PKT(Method):
    """Passalis & Tefas: CE + pkt_weight * PKT(student embedding, teacher embedding) (cosine kernels, no projector).
    InDistill's final stage in every experiment of its paper: combine with ``indistill_layers``."""

    name = "pkt"

    def loss_terms(self, student, teacher, rdms, batch, extra):
        pkt = losses.pkt_loss(student.encoded.embeddings["image"], teacher.embeddings["image"])
        return {**_ce(self, student, batch), "pkt": self.config.pkt_weight * pkt}


@register_method
class TAKD(KD):
    """Mirzadeh et al. 2020: the last link of a chain of plain KD runs teacher -> TA_1 -> ... -> TA_K -> student.
    The trainer distils from the last assistant (``assistants=[...]``, trained by
    :func:`hf_cifd.assistants.train_assistants` with ``procedure="takd"``); the loss is KD's."""

    name, uses_assistants = "takd", "last"


@register_method
class DGKD(Method):
    """Son et al. 2021: CE + KD from the teacher and from every assistant at once, dropping exactly
    ``dgkd_drop_num`` of those KD terms per step (:func:`hf_cifd.losses.dgkd_loss`)."""

    name, uses_assistants = "dgkd", "all"

    def loss_terms(self, student, teacher, rdms, batch, extra):
        c = self.config
        return losses.dgkd_loss(
            student.logits, batch.get("labels"), teacher.logits, [a.logits for a in rdms.get("image", [])],
            lambda_ce=c.lambda_ce, lambda_kl=c.lambda_kl, temperature=c.temperature,
            drop_num=c.dgkd_drop_num if student.training else 0, label_smoothing=c.label_smoothing_factor)


@register_method
class CIFD(Method):
    """CIFD eq.(9)/(23): CE + KD from the teacher and each RDM + embedding matching to the teacher and each
    RDM (through the IBM decoder) + lambda_I * IBM rate, with KD dropout over the teacher/RDM terms."""

    name, uses_rdms, matches_embeddings = "cifd", True, True

    def loss_terms(self, student, teacher, rdms, batch, extra):
        c = self.config
        rdm_outs = rdms.get("image", [])
        # RDMs without reconstruction (Table 1's, CIFD A.1.1) guide through their logits only.
        rdm_embeddings = [r.embedding for r in rdm_outs if r.embedding is not None]
        if rdm_embeddings and len(rdm_embeddings) != len(rdm_outs):
            raise DistillationInputError(
                "some RDMs reconstruct the teacher embedding and some do not (reconstruction='none'): use one kind.")
        return losses.cifd_loss(
            student.logits, batch.get("labels"), teacher.logits, [r.logits for r in rdm_outs],
            student.matched["image"], teacher.embeddings["image"], rdm_embeddings,
            student.ibm_rate.get("image"),
            lambda_ce=c.lambda_ce, lambda_kl=c.lambda_kl, rdm_weights=c.rdm_weights,
            embedding_weight=c.embedding_weight, lambda_ibm=c.lambda_ibm, temperature=c.temperature,
            distortion=c.embedding_distortion, kd_dropout=c.kd_dropout if student.training else 0.0,
            label_smoothing=c.label_smoothing_factor,
        )


# Comparative KD (method "ckd", the CKD add-on and the teacher-call budget) lives in hf_cifd/methods/ckd.py.
