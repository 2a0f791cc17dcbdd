"""Training cost of KD, CIFD, TAKD and DGKD in multiply-accumulates (CIFD Fig. 1(b), Table 1 and Appendix D.2).

``hf-cifd cost`` counts the forward MACs of the real architectures with ``torch.utils.flop_counter`` on the meta
device (no weights, no data; the RDM and IBM, a few MMACs, on one real CPU sample because their input checks read
values), multiplies them by the samples each model processes in each stage, and reports every method relative to
KD (and to CIFD). The conventions are D.2's, stated in the output:

* forward-pass MACs only (no backward pass, no optimizer), per model run on a sample: a frozen teacher, a trained
  student and a module in training each cost one forward;
* CIFD = RDM stage (``rdm_epochs`` x N x (teacher + every RDM's training forward), or with the teacher-output cache
  one teacher pass + ``rdm_epochs`` x N x RDMs) + student stage (``student_epochs`` x N x (teacher + student + the
  frozen RDMs + the IBM));
* KD = ``kd_epochs`` x N x (teacher + student): the KD baseline at its own schedule (D.2: CIFD is 1.08x KD);
* TAKD = a chain of KD runs: each assistant for ``assistant_epochs`` from its predecessor, the student for
  ``kd_epochs`` from the last assistant; DGKD: assistant k from the teacher and every larger assistant, the student
  from the teacher and all assistants (the assistants' training included in both).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode


IMAGENET_TRAIN_SAMPLES = 1_281_167
CIFAR_TRAIN_SAMPLES = 50_000


@dataclass
class CostSetup:
    """Models, data size and schedules of one comparison."""

    teacher: str
    student: str
    assistants: list[str]
    image_size: int
    num_classes: int
    train_samples: int
    kd_epochs: float
    student_epochs: float  # CIFD's student stage
    rdm_epochs: float
    assistant_epochs: float
    num_rdms: int = 3
    rdm: str = "paper_imagenet"  # RateDistortionModule constructor: paper_imagenet or paper_cifar_cnn
    in_channels: int = 3
    notes: list[str] = field(default_factory=list)


PRESETS: dict[str, CostSetup] = {
    # Fig. 1(b) / D.2: ResNet34 -> ResNet18 on ImageNet; CIFD student 88 epochs (ffcv), RDMs 30 epochs; KD at 100
    # epochs (the standard ImageNet KD schedule, which D.2's 762 / 1.08 = 705 PMACs implies); one assistant (D.2:
    # "training one Teacher Assistant"), ResNet26 as in DGKD's ImageNet experiment, for the KD schedule.
    "imagenet": CostSetup("timm:resnet34", "timm:resnet18", ["timm:resnet26"], 224, 1000, IMAGENET_TRAIN_SAMPLES,
                          kd_epochs=100, student_epochs=88, rdm_epochs=30, assistant_epochs=100),
    # Table 1: CIFAR-100, 10-layer CNN -> 2-layer CNN, TAKD / DGKD with the 8/6/4-layer CNNs of Table 8. A.1.1 gives
    # no epoch counts: every student / assistant stage uses the 240 epochs of A.1.2, the RDMs 30 (A.1.2).
    "table1": CostSetup("cnn:cnn10", "cnn:cnn2", ["cnn:cnn8", "cnn:cnn6", "cnn:cnn4"], 32, 100, CIFAR_TRAIN_SAMPLES,
                        kd_epochs=240, student_epochs=240, rdm_epochs=30, assistant_epochs=240, rdm="paper_cifar_cnn"),
}


def forward_macs(model: torch.nn.Module, *inputs, **kwargs) -> int:
    """MACs of one ``model(*inputs, **kwargs)`` call (``torch.utils.flop_counter`` FLOPs / 2)."""
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(*inputs, **kwargs)
    return counter.get_total_flops() // 2


def image_model_macs(spec: str, image_size: int, num_classes: int, in_channels: int = 3) -> tuple[int, int]:
    """(forward MACs per image, embedding width) of a model spec (``timm:resnet34``, ``cnn:cnn10``, ...) at
    ``image_size`` x ``image_size`` x ``in_channels``, built on the meta device: no weights are created or downloaded."""
    from .adapters import adapter_for
    from .adapters.specs import load_model

    with torch.device("meta"):
        model = load_model(spec, num_classes=num_classes, pretrained=False, image_size=image_size,
                           in_channels=in_channels).eval()
    x = torch.empty(1, in_channels, image_size, image_size, device="meta")
    return forward_macs(model, x), adapter_for(model).embedding_dims(model)["image"]


def per_sample_macs(setup: CostSetup) -> dict[str, int]:
    """Forward MACs per sample of every model involved."""
    from .modules import InformationBottleneck
    from .rdm_training import build_rdm

    macs: dict[str, int] = {}
    size, classes, channels = setup.image_size, setup.num_classes, setup.in_channels
    macs["teacher"], t_dim = image_model_macs(setup.teacher, size, classes, channels)
    macs["student"], s_dim = image_model_macs(setup.student, size, classes, channels)
    for k, spec in enumerate(setup.assistants):
        macs[f"assistant_{k}"], _ = image_model_macs(spec, size, classes, channels)
    rdm = build_rdm(setup.rdm, t_dim, setup.num_classes, 0.0 if setup.rdm == "paper_cifar_cnn" else 1e4).eval()
    x = torch.randn(1, t_dim)
    macs["rdm_train"] = forward_macs(rdm, x)  # with the density model (the rate term)
    macs["rdm_frozen"] = forward_macs(rdm, x, with_rate=False)  # what the student stage runs
    ibm = InformationBottleneck(s_dim, t_dim, 0 if s_dim == t_dim else 1).train()
    macs["ibm"] = forward_macs(ibm, torch.randn(1, s_dim))
    return macs


def training_costs(setup: CostSetup) -> dict[str, Any]:
    """Per-method totals (MACs), stage by stage, and ratios to KD and to CIFD."""
    m = per_sample_macs(setup)
    n = setup.train_samples
    T, S, R = m["teacher"], m["student"], setup.num_rdms
    A = [m[f"assistant_{k}"] for k in range(len(setup.assistants))]
    ea, ek = setup.assistant_epochs, setup.kd_epochs
    methods: dict[str, dict[str, float]] = {}
    methods["kd"] = {"student": ek * n * (T + S)}
    student_stage = setup.student_epochs * n * (T + S + R * m["rdm_frozen"] + m["ibm"])
    methods["cifd"] = {"rdms": setup.rdm_epochs * n * (T + R * m["rdm_train"]), "student": student_stage}
    methods["cifd_cached_teacher"] = {"teacher_cache": n * T, "rdms": setup.rdm_epochs * n * R * m["rdm_train"],
                                      "student": student_stage}
    if A:
        chain = [T, *A]
        methods["takd"] = {f"assistant_{k}": ea * n * (chain[k] + A[k]) for k in range(len(A))}
        methods["takd"]["student"] = ek * n * (A[-1] + S)
        methods["dgkd"] = {f"assistant_{k}": ea * n * (sum(chain[: k + 1]) + A[k]) for k in range(len(A))}
        methods["dgkd"]["student"] = ek * n * (sum(chain) + S)
    totals = {name: sum(stages.values()) for name, stages in methods.items()}
    return {
        "setup": asdict(setup),
        "per_sample_macs": m,
        "methods": {name: {"total_macs": totals[name], "stages_macs": stages,
                           "relative_to_kd": totals[name] / totals["kd"],
                           "relative_to_cifd": totals[name] / totals["cifd"]}
                    for name, stages in methods.items()},
        "conventions": __doc__.split("conventions are D.2's, stated in the output:")[1].strip(),
    }


def format_table(result: dict[str, Any]) -> str:
    rows = [f"{'method':<22}{'total (PMACs)':>15}{'x KD':>8}{'x CIFD':>8}"]
    for name, r in result["methods"].items():
        rows.append(f"{name:<22}{r['total_macs'] / 1e15:>15.4g}{r['relative_to_kd']:>8.3f}{r['relative_to_cifd']:>8.3f}")
    per = ", ".join(f"{k} {v / 1e6:.4g}" for k, v in result["per_sample_macs"].items())
    return "\n".join(rows) + f"\nforward MMACs per sample: {per}\n"


def add_arguments(p) -> None:
    p.add_argument("--pair", choices=sorted(PRESETS), default=None,
                   help="a preset: imagenet (Fig. 1b: ResNet34 -> ResNet18) or table1 (CIFAR-100 CNN10 -> CNN2)")
    p.add_argument("--teacher", default=None, help="model spec, e.g. timm:resnet34 (default: the preset's)")
    p.add_argument("--student", default=None, help="model spec, e.g. timm:resnet18")
    p.add_argument("--assistants", nargs="*", default=None, help="TAKD/DGKD assistant specs, largest first")
    p.add_argument("--dataset", choices=["imagenet", "cifar100"], default=None,
                   help="size preset: imagenet (1,281,167 images, 224 px, 1000 classes) or cifar100 (50k, 32 px, 100)")
    for name in ("train_samples", "image_size", "in_channels", "num_classes", "num_rdms"):
        p.add_argument(f"--{name}", type=int, default=None)
    for name in ("kd_epochs", "student_epochs", "rdm_epochs", "assistant_epochs"):
        p.add_argument(f"--{name}", type=float, default=None)
    p.add_argument("--json", default=None, help="write the full result (stages, per-sample MACs, conventions) here")


def setup_from_args(args) -> CostSetup:
    base = args.pair or ("table1" if args.dataset == "cifar100" else "imagenet")
    setup = CostSetup(**{**asdict(PRESETS[base])})
    if args.dataset == "cifar100" and args.pair is None:
        setup.rdm = "paper_cifar_cnn"
    for name in ("teacher", "student", "assistants", "train_samples", "image_size", "in_channels", "num_classes", "num_rdms",
                 "kd_epochs", "student_epochs", "rdm_epochs", "assistant_epochs"):
        value = getattr(args, name)
        if value is not None:
            setattr(setup, name, value)
    return setup


def run_from_args(args) -> dict[str, Any]:
    result = training_costs(setup_from_args(args))
    print(format_table(result), end="")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result
