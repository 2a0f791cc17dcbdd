"""`DistillationConfig`: every knob of a distillation run, as `transformers.TrainingArguments`.

All Trainer flags keep working (``report_to``, ``push_to_hub``, ``deepspeed``, ``gradient_accumulation_steps``,
...); the fields below add the methods' knobs. Defaults follow the CIFD paper's ImageNet setup (Appendix A.2):
tau = 2, every lambda = 1, KD dropout 0.25, embedding-loss weight 100, lambda_I = 0.001, smooth-L1.
Parse from the command line with ``HfArgumentParser(DistillationConfig)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from transformers import TrainingArguments

from .checks import DistillationInputError

CLASSIFICATION_METHODS = ("student", "kd", "fitnet", "rkd", "cifd", "ckd")
CLIP_METHODS = ("clip", "openclip", "clipkd", "tinyclip", "cifd", "ckd")
DISTORTIONS = ("mse", "smooth_l1")


@dataclass
class DistillationConfig(TrainingArguments):
    # --- method -------------------------------------------------------------------------------------------
    method: str = field(
        default="cifd",
        metadata={"help": "Distillation method. Classification: student (no teacher), kd, fitnet, rkd, cifd, ckd. "
                          "CLIP: clip (no teacher), openclip, clipkd, tinyclip, cifd, ckd."},
    )
    temperature: float = field(default=2.0, metadata={"help": "KD temperature tau (eq. 9; logits divided by tau, loss x tau^2)."})
    lambda_ce: float = field(default=1.0, metadata={"help": "Weight of the cross-entropy with the labels (eq. 9)."})
    lambda_kl: float = field(default=1.0, metadata={"help": "Weight of KL(teacher || student) and of the RDM KL terms (eq. 9)."})
    kd_dropout: float = field(
        default=0.25,
        metadata={"help": "DGKD KD dropout: probability of dropping each teacher/RDM term per step (cifd only)."},
    )
    embedding_weight: float = field(
        default=100.0, metadata={"help": "Weight of the embedding-matching terms ||U_S - U_T||^2 (+ RDM terms); fitnet's weight too."}
    )
    embedding_distortion: str = field(
        default="smooth_l1", metadata={"help": "Distortion for embedding matching: mse or smooth_l1 (summed over dims)."}
    )
    projector_layers: int = field(default=1, metadata={"help": "Linear layers mapping student to teacher embedding width (1 or 2)."})
    # --- CIFD: rate-distortion modules ------------------------------------------------------------------------
    num_rdms: int = field(default=3, metadata={"help": "Number of RDMs (teacher-assistant mimics); 0 = none."})
    rdm_rates: list[float] = field(
        default_factory=lambda: [1e4, 5e3, 1e3],
        metadata={"help": "Rate weight R of each RDM (eq. 4); higher R = more information kept = bigger assistant."},
    )
    rdm_weights: list[float] | None = field(
        default=None, metadata={"help": "lambda_n for each RDM's terms in eq. (9) (default: all 1)."}
    )
    rdm_hidden_dims: list[int] = field(
        default_factory=lambda: [512, 512, 512], metadata={"help": "RDM hidden layers (bottleneck after the 2nd)."}
    )
    rdm_epochs: float = field(default=30.0, metadata={"help": "Epochs of the RDM training stage (paper: 30)."})
    rdm_learning_rate: float = field(default=1e-3, metadata={"help": "Adam learning rate of the RDM stage."})
    # --- CIFD: information bottleneck on the student ----------------------------------------------------------
    use_ibm: bool = field(default=True, metadata={"help": "Information Bottleneck Module on the student (training only)."})
    lambda_ibm: float = field(default=0.001, metadata={"help": "lambda_I: weight of the IBM rate -log2 r(W^) (eq. 7/9)."})
    ibm_decoder_layers: int = field(default=1, metadata={"help": "Linear layers of the IBM decoder (1 or 2)."})
    # --- baselines ----------------------------------------------------------------------------------------------
    rkd_distance_weight: float = field(default=25.0, metadata={"help": "RKD distance-term weight (Park et al.)."})
    rkd_angle_weight: float = field(default=50.0, metadata={"help": "RKD angle-term weight (Park et al.)."})
    ckd_weight: float = field(default=1.0, metadata={"help": "Weight of the Comparative KD terms (method ckd)."})
    # --- CLIP ---------------------------------------------------------------------------------------------------
    lambda_cl: float = field(default=0.005, metadata={"help": "lambda_CL: contrastive-loss weight in CIFD for CLIP (eq. 13)."})
    # --- teacher ------------------------------------------------------------------------------------------------
    teacher_cache_dir: str | None = field(
        default=None, metadata={"help": "Directory of a teacher-output cache (hf-cifd cache-teacher): the teacher never runs."}
    )

    def __post_init__(self):
        # Checked before TrainingArguments sets up devices: a bad value fails in milliseconds.
        methods = sorted(set(CLASSIFICATION_METHODS) | set(CLIP_METHODS))
        if self.method not in methods:
            raise DistillationInputError(f"method must be one of {methods}, got {self.method!r}.")
        for name in ("temperature",):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise DistillationInputError(f"{name} must be > 0, got {value!r}.")
        for name in ("lambda_ce", "lambda_kl", "embedding_weight", "lambda_ibm", "lambda_cl", "ckd_weight",
                     "rkd_distance_weight", "rkd_angle_weight"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise DistillationInputError(f"{name} must be a finite number >= 0, got {value!r}.")
        if not 0.0 <= self.kd_dropout < 1.0:
            raise DistillationInputError(f"kd_dropout is a probability in [0, 1), got {self.kd_dropout!r}.")
        if self.embedding_distortion not in DISTORTIONS:
            raise DistillationInputError(f"embedding_distortion must be one of {DISTORTIONS}, got {self.embedding_distortion!r}.")
        if self.projector_layers not in (1, 2) or self.ibm_decoder_layers not in (1, 2):
            raise DistillationInputError("projector_layers and ibm_decoder_layers must be 1 or 2.")
        self.rdm_rates = [float(r) for r in self.rdm_rates]
        if self.num_rdms < 0:
            raise DistillationInputError(f"num_rdms must be >= 0, got {self.num_rdms}.")
        if self.method == "cifd" and self.num_rdms and len(self.rdm_rates) != self.num_rdms:
            raise DistillationInputError(
                f"rdm_rates has {len(self.rdm_rates)} values for num_rdms={self.num_rdms}: give one rate R per RDM "
                "(e.g. --num_rdms 3 --rdm_rates 1e4 5e3 1e3)."
            )
        if any(not (math.isfinite(r) and r > 0) for r in self.rdm_rates):
            raise DistillationInputError(f"every RDM rate weight R must be > 0, got {self.rdm_rates}.")
        if self.rdm_weights is not None and len(self.rdm_weights) != self.num_rdms:
            raise DistillationInputError(f"rdm_weights needs {self.num_rdms} values (one per RDM), got {len(self.rdm_weights)}.")
        # Distillation batches carry teacher inputs and cache keys that no model signature names.
        self.remove_unused_columns = False
        super().__post_init__()

    @property
    def uses_teacher(self) -> bool:
        return self.method not in ("student", "clip")
