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

from .checks import DistillationInputError, check_positive

CLASSIFICATION_METHODS = ("student", "kd", "fitnet", "rkd", "pkt", "takd", "dgkd", "cifd", "ckd")
CLIP_METHODS = ("clip", "openclip", "clipkd", "tinyclip", "cifd", "ckd")
DISTORTIONS = ("mse", "smooth_l1")
TEACHER_DTYPES = ("auto", "float32", "bfloat16", "float16")


# repr=False: keep TrainingArguments' __repr__, which redacts hub_token (a regenerated one would print it).
@dataclass(repr=False)
class DistillationConfig(TrainingArguments):
    # --- method -------------------------------------------------------------------------------------------
    method: str = field(
        default="cifd",
        metadata={"help": "Distillation method. Classification: student (no teacher), kd, fitnet, rkd, pkt, takd (KD from "
                          "the last of a chain of teacher assistants), dgkd (teacher + all assistants), cifd, ckd. "
                          "CLIP: clip (no teacher), openclip, clipkd, tinyclip, cifd, ckd."},
    )
    temperature: float = field(default=2.0, metadata={"help": "KD temperature tau (eq. 9; logits divided by tau, loss x tau^2)."})
    lambda_ce: float | None = field(
        default=None, metadata={"help": "Weight of the cross-entropy with the labels (eq. 9). Default: 1; 0 for ckd "
                                        "(the Comparative KD objective and its reference code have no per-sample CE). "
                                        "The CE uses Trainer's label_smoothing_factor."})
    lambda_kl: float = field(default=1.0, metadata={"help": "Weight of KL(teacher || student) and of the RDM KL terms (eq. 9)."})
    kd_dropout: float = field(
        default=0.25,
        metadata={"help": "DGKD KD dropout: probability of dropping each teacher/RDM term per step (cifd only)."},
    )
    embedding_weight: float = field(
        default=100.0, metadata={"help": "Weight of the embedding-matching terms ||U_S - U_T||^2 (+ RDM terms); fitnet's weight too."}
    )
    embedding_distortion: str = field(
        default="smooth_l1", metadata={"help": "Distortion for embedding matching: mse or smooth_l1 (mean over elements: ||a - b||^2 / dim, batch mean)."}
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
    rdm_bottleneck_learning_rate: float | None = field(
        default=1e-2, metadata={"help": "Adam learning rate of the RDMs' entropy models (the density that measures the "
                                        "rate): at rdm_learning_rate it fits too slowly for the rate to follow R in a "
                                        "short RDM stage (train_rdms' bottleneck_learning_rate). None: rdm_learning_rate."})
    # --- CIFD: information bottleneck on the student ----------------------------------------------------------
    use_ibm: bool = field(default=True, metadata={"help": "Information Bottleneck Module on the student (training only)."})
    lambda_ibm: float = field(default=0.001, metadata={"help": "lambda_I: weight of the IBM rate -log2 r(W^) (eq. 7/9)."})
    ibm_decoder_layers: int | None = field(
        default=None, metadata={"help": "Linear layers of the IBM decoder (0 = identity, 1 or 2). Default: 0 when the "
                                        "student and teacher embeddings have the same width (the paper projects only "
                                        "on a mismatch), else 1."})
    # --- baselines ----------------------------------------------------------------------------------------------
    rkd_distance_weight: float = field(default=25.0, metadata={"help": "RKD distance-term weight (Park et al.)."})
    rkd_angle_weight: float = field(default=50.0, metadata={"help": "RKD angle-term weight (Park et al.)."})
    ckd_weight: float = field(default=1.0, metadata={"help": "Weight of the Comparative KD terms (method ckd)."})
    pkt_weight: float = field(
        default=30000.0, metadata={"help": "Weight of the PKT loss (method pkt; 30000 = the CRD/RepDistiller benchmark's "
                                           "value for this mean-over-N^2 form)."})
    dgkd_drop_num: int = field(
        default=1, metadata={"help": "DGKD KD dropout: number of the teacher/assistant KD terms dropped per step (DGKD's "
                                     "--drop-num, default 1; method dgkd)."})
    # --- CLIP ---------------------------------------------------------------------------------------------------
    lambda_cl: float = field(
        default=0.0025, metadata={"help": "lambda_CL: contrastive-loss weight in CIFD for CLIP (eq. 13), applied to the "
                                          "contrastive loss with its two directions SUMMED (eq. 11). The paper's 0.005 "
                                          "is taken at open_clip's scale (directions averaged, the implementation its CLIP "
                                          "models follow), i.e. 0.0025 here."})
    # --- CLIP distillation baselines ---
    clip_distill_weight: float = field(
        default=1.0, metadata={"help": "Weight of the open_clip distillation / TinyCLIP affinity term (methods openclip, tinyclip)."})
    clipkd_fd_weight: float = field(default=2000.0, metadata={"help": "CLIP-KD feature-distillation weight (Yang et al.: 2000)."})
    clipkd_crd_weight: float = field(default=1.0, metadata={"help": "CLIP-KD contrastive relational distillation weight."})
    clipkd_icl_weight: float = field(default=1.0, metadata={"help": "CLIP-KD interactive contrastive learning weight."})
    # --- teacher ------------------------------------------------------------------------------------------------
    teacher_cache_dir: str | None = field(
        default=None, metadata={"help": "Directory of a teacher-output cache (hf-cifd cache-teacher): the teacher never runs."}
    )
    rdm_output_cache: bool = field(
        default=True, metadata={"help": "With a teacher-output cache: run the frozen RDMs once per cached sample before "
                                        "training (outputs kept in a temporary directory, 4 bytes x (embedding + "
                                        "classes) x RDMs per sample) instead of at every step; same losses."}
    )
    # --- training resolution ---
    progressive_resolution: list[float] | None = field(
        default=None, metadata={"help": "ffcv progressive resizing: 'min_res max_res start_epoch end_epoch' (ffcv's "
                                        "ResNet-18 88-epoch config: 160 192 65 76). Training images (pixel_values) "
                                        "are resized to the epoch's resolution on the fly; unset = off."})
    teacher_dtype: str = field(
        default="auto",
        metadata={"help": "Precision of the frozen teacher: auto (the training dtype: bfloat16 with --bf16, float16 with "
                          "--fp16, else float32), float32, bfloat16 or float16. A half-precision teacher is converted "
                          "in place and run under autocast; the losses are computed in float32 either way."},
    )
    # --- InDistill warm-up / Comparative KD ---
    indistill_layers: list[str] | None = field(
        default=None,
        metadata={"help": "InDistill warm-up layer pairs, earliest first: 'teacher.module.path:student.module.path' "
                          "(optionally ':teacher.producer.path', the Conv/Linear whose filters rank the teacher's "
                          "channels). Unset = no warm-up. E.g. --indistill_layers layer1:layer1 layer2:layer2"},
    )
    indistill_a: float = field(
        default=2.0, metadata={"help": "InDistill curriculum: layer pair l (0-based) is active for a + 1 + l epochs/steps (paper code: a = 2)."}
    )
    indistill_durations: list[float] | None = field(
        default=None, metadata={"help": "Explicit epochs/steps per InDistill layer pair (overrides indistill_a)."}
    )
    indistill_unit: str = field(
        default="epoch", metadata={"help": "Unit of the InDistill schedule: epoch, or step (optimizer steps; streaming / max_steps runs)."}
    )
    indistill_weight: float = field(default=1.0, metadata={"help": "Weight of the InDistill feature-map MSE."})
    ckd_addon: bool = field(
        default=False, metadata={"help": "Add the Comparative KD terms (weighted by ckd_weight) to any other teacher method."}
    )
    ckd_embedding_weight: float = field(
        default=0.0, metadata={"help": "CKD on embeddings: relative weight (x ckd_weight) of the comparative term on the "
                                       "(projected) embeddings; 0 = logits only (the paper's default)."}
    )
    teacher_call_budget: int = field(
        default=0, metadata={"help": "Reduced-teacher-inference mode: N > 0 picks N training samples, runs the teacher "
                                     "once on each (cached) and trains on them only, with comparative pairs. 0 = off."}
    )
    ckd_pool_size: int = field(default=100_000, metadata={"help": "Budget mode: size of the fixed pool of sample pairs."})
    ckd_seed: int | None = field(default=None, metadata={"help": "Budget mode: seed of the subset and pair pool (default: seed)."})
    # --- failure handling (README: Resuming and failure handling) ---
    nonfinite_policy: str = field(
        default="stop", metadata={"help": "A step whose loss has a non-finite (NaN/inf) term: stop (raise an error "
                                          "naming the term and the step) or skip (no parameter update; counted as "
                                          "skipped_steps in the logs)."})
    resume_partial: bool = field(
        default=False, metadata={"help": "Resume from a checkpoint whose optimizer / scheduler / RNG / stream-state "
                                         "file is missing or damaged, with fresh state for it (default: an error "
                                         "naming the file)."})

    def __post_init__(self):
        # Checked before TrainingArguments sets up devices: a bad value fails in milliseconds.
        methods = sorted(set(CLASSIFICATION_METHODS) | set(CLIP_METHODS))
        if self.method not in methods:
            raise DistillationInputError(f"method must be one of {methods}, got {self.method!r}.")
        if self.lambda_ce is None:
            self.lambda_ce = 0.0 if self.method == "ckd" else 1.0
        for name in ("temperature",):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise DistillationInputError(f"{name} must be > 0, got {value!r}.")
        for name in ("lambda_ce", "lambda_kl", "embedding_weight", "lambda_ibm", "lambda_cl", "ckd_weight",
                     "clip_distill_weight", "clipkd_fd_weight", "clipkd_crd_weight", "clipkd_icl_weight",
                     "rkd_distance_weight", "rkd_angle_weight", "pkt_weight"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise DistillationInputError(f"{name} must be a finite number >= 0, got {value!r}.")
        if not isinstance(self.dgkd_drop_num, int) or self.dgkd_drop_num < 0:
            raise DistillationInputError(f"dgkd_drop_num must be an int >= 0, got {self.dgkd_drop_num!r}.")
        if self.teacher_dtype not in TEACHER_DTYPES:
            raise DistillationInputError(f"teacher_dtype must be one of {TEACHER_DTYPES}, got {self.teacher_dtype!r}.")
        if not 0.0 <= self.kd_dropout < 1.0:
            raise DistillationInputError(f"kd_dropout is a probability in [0, 1), got {self.kd_dropout!r}.")
        if self.embedding_distortion not in DISTORTIONS:
            raise DistillationInputError(f"embedding_distortion must be one of {DISTORTIONS}, got {self.embedding_distortion!r}.")
        if self.projector_layers not in (1, 2):
            raise DistillationInputError(f"projector_layers must be 1 or 2, got {self.projector_layers!r}.")
        if self.ibm_decoder_layers not in (None, 0, 1, 2):
            raise DistillationInputError(
                f"ibm_decoder_layers must be 0 (identity), 1 or 2 (or unset: 0 on equal widths, else 1), got "
                f"{self.ibm_decoder_layers!r}.")
        self.rdm_rates = [float(r) for r in self.rdm_rates]
        if self.num_rdms < 0:
            raise DistillationInputError(f"num_rdms must be >= 0, got {self.num_rdms}.")
        if self.method == "cifd" and self.num_rdms and len(self.rdm_rates) != self.num_rdms:
            raise DistillationInputError(
                f"rdm_rates has {len(self.rdm_rates)} values for num_rdms={self.num_rdms}: give one rate R per RDM "
                "(e.g. --num_rdms 3 --rdm_rates 1e4 5e3 1e3)."
            )
        if any(not (math.isfinite(r) and r >= 0) for r in self.rdm_rates):
            raise DistillationInputError(
                f"every RDM rate weight R must be >= 0 (0: no distortion term), got {self.rdm_rates}.")
        if self.rdm_weights is not None and len(self.rdm_weights) != self.num_rdms:
            raise DistillationInputError(f"rdm_weights needs {self.num_rdms} values (one per RDM), got {len(self.rdm_weights)}.")
        check_positive("rdm_learning_rate", self.rdm_learning_rate)
        if self.rdm_bottleneck_learning_rate is not None:
            check_positive("rdm_bottleneck_learning_rate", self.rdm_bottleneck_learning_rate)
        if self.progressive_resolution is not None:
            pr = [float(v) for v in self.progressive_resolution]
            if len(pr) != 4 or not (0 < pr[0] <= pr[1]) or not (0 <= pr[2] <= pr[3]):
                raise DistillationInputError(
                    "progressive_resolution is 'min_res max_res start_epoch end_epoch' with 0 < min_res <= max_res and "
                    f"start_epoch <= end_epoch (e.g. 160 192 65 76), got {self.progressive_resolution!r}.")
            self.progressive_resolution = pr
        self._check_indistill_and_ckd()
        if self.nonfinite_policy not in ("stop", "skip"):
            raise DistillationInputError(f"nonfinite_policy must be 'stop' or 'skip', got {self.nonfinite_policy!r}.")
        self._check_hub()
        # Distillation batches carry teacher inputs and cache keys that no model signature names.
        self.remove_unused_columns = False
        # Each process streams its own shards: accelerate's default (rank 0 reads and dispatches slices) does not
        # split list fields such as sample_key, and makes one process decode everything.
        if self.accelerator_config is None:
            self.accelerator_config = {"dispatch_batches": False}
        elif isinstance(self.accelerator_config, dict):
            self.accelerator_config.setdefault("dispatch_batches", False)
        super().__post_init__()

    def _check_hub(self) -> None:
        """push_to_hub uploads the exported student (hf_cifd.hub); fail before any work when it cannot."""
        if not self.push_to_hub:
            return
        if str(getattr(self.hub_strategy, "value", self.hub_strategy)) in ("checkpoint", "all_checkpoints"):
            raise DistillationInputError(
                f"hub_strategy={self.hub_strategy!s} would upload Trainer checkpoints (the training container, "
                "optimizer state, training_args.bin), which no library can load: use hub_strategy every_save (the "
                "exported student at each save) or end, and resume from the local checkpoints.")
        from .hub import check_hub_reachable

        check_hub_reachable("or train without push_to_hub and upload the exported student later with hf-cifd push")

    # Tokens are never pickled (training_args.bin in every checkpoint): use HF_TOKEN / `hf auth login` to resume.
    def __getstate__(self):
        state = dict(self.__dict__)
        for key in state:
            if key.endswith("_token"):
                state[key] = None
        return state

    def __copy__(self):
        new = self.__class__.__new__(self.__class__)
        new.__dict__.update(self.__dict__)
        return new

    def __deepcopy__(self, memo):
        import copy

        new = self.__class__.__new__(self.__class__)
        memo[id(self)] = new
        new.__dict__.update(copy.deepcopy(self.__dict__, memo))
        return new

    def _check_indistill_and_ckd(self) -> None:
        """InDistill / Comparative KD fields."""
        from .methods.indistill import curriculum_durations, parse_layer_pairs

        if isinstance(self.indistill_layers, str):
            self.indistill_layers = [self.indistill_layers]
        pairs = parse_layer_pairs(self.indistill_layers)
        if self.indistill_unit not in ("epoch", "step"):
            raise DistillationInputError(f"indistill_unit must be 'epoch' or 'step', got {self.indistill_unit!r}.")
        if not (math.isfinite(self.indistill_a) and self.indistill_a >= 0):
            raise DistillationInputError(f"indistill_a must be >= 0, got {self.indistill_a!r}.")
        if pairs:
            durations = curriculum_durations(len(pairs), self.indistill_a, self.indistill_durations)
            if any(not (math.isfinite(d) and d > 0) for d in durations):
                raise DistillationInputError(f"every InDistill duration must be > 0, got {durations}.")
        for name in ("indistill_weight", "ckd_embedding_weight"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise DistillationInputError(f"{name} must be a finite number >= 0, got {value!r}.")
        if not isinstance(self.teacher_call_budget, int) or self.teacher_call_budget < 0:
            raise DistillationInputError(f"teacher_call_budget must be an int >= 0 (0 = off), got {self.teacher_call_budget!r}.")
        if not isinstance(self.ckd_pool_size, int) or self.ckd_pool_size < 1:
            raise DistillationInputError(f"ckd_pool_size must be an int >= 1, got {self.ckd_pool_size!r}.")
        no_teacher = self.method in ("student", "clip")
        if self.teacher_call_budget and no_teacher:
            raise DistillationInputError(f"teacher_call_budget limits teacher calls; method {self.method!r} has no teacher.")
        if self.ckd_addon and no_teacher:
            raise DistillationInputError(f"ckd_addon compares student and teacher outputs; method {self.method!r} has no teacher.")
        if pairs and no_teacher:
            raise DistillationInputError(f"InDistill (indistill_layers) distils teacher features; method {self.method!r} has no teacher.")
        if pairs and self.teacher_call_budget:
            raise DistillationInputError(
                "InDistill reads the teacher's intermediate features at every warm-up step, which a teacher-call budget "
                "cannot allow: use indistill_layers or teacher_call_budget, not both.")

    @property
    def teacher_torch_dtype(self):
        """The teacher's ``torch.dtype``: ``teacher_dtype``, or the training dtype when it is "auto"."""
        import torch

        name = self.teacher_dtype
        if name == "auto":
            name = "bfloat16" if self.bf16 else "float16" if self.fp16 else "float32"
        return getattr(torch, name)

    @property
    def uses_teacher(self) -> bool:
        return self.method not in ("student", "clip")
