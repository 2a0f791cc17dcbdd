"""The RDM stage: train N Rate-Distortion Modules at different rates in ONE pass over the data.

Each batch runs the teacher once (or reads its cached outputs) and feeds the same embeddings to every RDM;
RDMs are independent, so one optimizer over all of them gives each exactly its own gradients. Afterwards each
RDM is evaluated in inference mode (rounding instead of noise): its rate in bits, its distortion and, with a
head, its accuracy -- the paper's Fig. 5 curve, saved as JSON and PNG -- and saved with ``save_pretrained``.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from . import losses
from .adapters import ModelAdapter
from .checks import DistillationInputError, check_positive, check_world_size
from .data.collate import collate as default_collate
from .modules import RateDistortionModule
from .teacher import TeacherRunner, embedding_fields

logger = logging.getLogger(__name__)


@dataclass
class RDMReport:
    """What :func:`train_rdms` did. ``metrics`` has one row per RDM (eval split when given, else train)."""

    rdms: dict[str, list[RateDistortionModule]]
    metrics: list[dict[str, Any]]
    teacher_calls: int
    steps: int
    teacher_accuracy: float | None = None
    history: list[dict[str, float]] = field(default_factory=list)  # per step: each RDM's total loss


class CacheKeysDataset(torch.utils.data.Dataset):
    """A teacher cache's sample keys (+ labels when known) as a dataset of ``{"sample_key", "labels"}`` rows: RDMs
    train from the cache alone and read no image. Without labels, eq. (5) loses its CE term (the KL to the teacher's
    logits stays)."""

    def __init__(self, cache, keys: Sequence[str] | None = None, labels: Mapping[str, int] | None = None):
        self.cache, self.labels = cache, labels
        self.keys = list(keys if keys is not None else (sorted(labels) if labels is not None else cache.keys))
        cache.check_covers(self.keys)

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, i: int) -> dict[str, Any]:
        key = self.keys[int(i)]
        return {"sample_key": key} if self.labels is None else {"sample_key": key, "labels": int(self.labels[key])}

    def split(self, fraction: float, seed: int = 0) -> tuple["CacheKeysDataset", "CacheKeysDataset"]:
        """A seeded (1 - fraction, fraction) split of the keys, e.g. the paper's 95/5 train/validation split."""
        if not 0.0 < fraction < 1.0:
            raise DistillationInputError(f"the held-out fraction must be in (0, 1), got {fraction}.")
        order = torch.randperm(len(self.keys), generator=torch.Generator().manual_seed(seed)).tolist()
        n_out = max(1, int(round(fraction * len(order))))
        keys = [self.keys[i] for i in order]
        return (CacheKeysDataset(self.cache, keys[n_out:], self.labels),
                CacheKeysDataset(self.cache, keys[:n_out], self.labels))


class _RDMBank(nn.Module):
    """All RDMs in one module, so that one forward (and one DDP wrapper) serves them all."""

    def __init__(self, rdms: Mapping[str, Sequence[RateDistortionModule]]):
        super().__init__()
        self.rdms = nn.ModuleDict({m: nn.ModuleList(r) for m, r in rdms.items()})

    def forward(self, embeddings: Mapping[str, torch.Tensor]):
        return {m: [rdm(embeddings[m]) for rdm in mods] for m, mods in self.rdms.items()}


RDM_ARCHITECTURES = ("paper_imagenet", "paper_cifar_cnn", "custom")


def build_rdm(architecture: str, embed_dim: int, num_classes: int | None, rate_weight: float, *,
              hidden_dims: Sequence[int] = (512, 512, 512), bottleneck_after: int = 2,
              activate: Sequence[bool] | None = (True, False, True), distortion: str = "smooth_l1") -> RateDistortionModule:
    """One RDM of a named architecture: ``paper_imagenet`` (A.2: X^ = the 3rd hidden layer, widths 512 / 1024 by the
    embedding), ``paper_cifar_cnn`` (A.1.1, Table 1: FC512, FC306, FC100 + head, no reconstruction, R must be 0) or
    ``custom`` (``hidden_dims`` + a linear layer back to the embedding)."""
    if architecture == "paper_imagenet":
        return RateDistortionModule.paper_imagenet(embed_dim, num_classes, rate_weight=rate_weight, distortion=distortion)
    if architecture == "paper_cifar_cnn":
        return RateDistortionModule.paper_cifar_cnn(embed_dim, num_classes, rate_weight=rate_weight, distortion=distortion)
    if architecture == "custom":
        return RateDistortionModule(embed_dim, hidden_dims=hidden_dims, bottleneck_after=bottleneck_after,
                                    activate=activate, num_classes=num_classes, rate_weight=rate_weight,
                                    distortion=distortion)
    raise DistillationInputError(f"RDM architecture must be one of {RDM_ARCHITECTURES}, got {architecture!r}.")


def _param_groups(bank: nn.Module, learning_rate: float, bottleneck_learning_rate: float | None) -> list[dict]:
    """Adam groups: the entropy models (``bottleneck.*`` of every RDM) at ``bottleneck_learning_rate``, the rest at
    ``learning_rate``."""
    if bottleneck_learning_rate is None:
        return [{"params": list(bank.parameters()), "lr": learning_rate}]
    density, rest = [], []
    for rdm in bank.modules():
        if isinstance(rdm, RateDistortionModule):
            ids = {id(p) for p in rdm.bottleneck.parameters()}
            for p in rdm.parameters():
                (density if id(p) in ids else rest).append(p)
    return [{"params": rest, "lr": learning_rate}, {"params": density, "lr": bottleneck_learning_rate}]


def _as_rates(rates, modalities) -> dict[str, list[float]]:
    if isinstance(rates, Mapping):
        return {m: [float(r) for r in rates[m]] for m in rates}
    return {m: [float(r) for r in rates] for m in modalities}


def train_rdms(
    train_dataset,
    *,
    teacher: nn.Module | None = None,
    rates: Sequence[float] | Mapping[str, Sequence[float]] = (1e4, 5e3, 1e3),
    rdms: Mapping[str, Sequence[RateDistortionModule]] | Sequence[RateDistortionModule] | None = None,
    eval_dataset=None,
    output_dir: str | None = None,
    epochs: float = 30.0,
    max_steps: int | None = None,
    batch_size: int = 256,
    learning_rate: float = 1e-3,
    bottleneck_learning_rate: float | None = 1e-2,
    hidden_dims: Sequence[int] = (512, 512, 512),
    architecture: str = "custom",
    distortion: str = "smooth_l1",
    lambda_ce: float = 1.0,
    lambda_kl: float = 1.0,
    temperature: float = 2.0,
    teacher_adapter: ModelAdapter | None = None,
    teacher_cache=None,
    collate_fn: Callable | None = None,
    num_workers: int = 0,
    seed: int = 0,
    accelerator=None,
    progress: bool = True,
    teacher_name: str | None = None,
    teacher_hub_id: str | None = None,
) -> RDMReport:
    """Trains RDMs (eq. 4, or eq. 5/22 with a classifier head) on a teacher's embeddings.

    Args:
        train_dataset: samples in the batch contract (``pixel_values``, ``labels``, ``sample_key`` ...).
        teacher: the frozen teacher; not needed when ``teacher_cache`` covers the data.
        rates: the rate weight R of each RDM (a dict modality -> rates for CLIP's "image"/"text").
        rdms: RDMs to train instead of building them from ``rates``/``hidden_dims``.
        architecture: how RDMs are built from ``rates`` (:func:`build_rdm`): "custom" (``hidden_dims``),
            "paper_imagenet" or "paper_cifar_cnn" (the paper's exact RDMs).
        eval_dataset: held-out samples for the reported rate / distortion / accuracy.
        output_dir: where each RDM (``rdm-<modality>-<i>/``), ``rdm_metrics.json`` and ``rd_curve.png`` go.
        epochs / max_steps: length of training (max_steps wins; required for streaming datasets).
        learning_rate: Adam learning rate of the encoders, decoders and heads.
        bottleneck_learning_rate: Adam learning rate of the entropy models (the factorized density that measures the
            rate, and its quantiles); None = ``learning_rate``. The density starts wide (compressai's init_scale=10:
            ~5 bits per channel for small latents) and Adam moves each parameter by about its learning rate per
            step, so at 1e-3 it needs thousands of steps to fit the latents: until then the measured rate is the
            init's, whatever R is (the demo's RDMs at R = 100 / 10 / 1 after 240 steps at 1e-3: 177 / 175 / 175 bits).
            Eq. (4)/(5) are unchanged: only the optimizer.
        teacher_cache: a ``hf_cifd.data.TeacherCache`` or its directory: no teacher forward at all.
        teacher_name / teacher_hub_id: the teacher's id (``timm:resnet34.a1_in1k``) and the Hub repo of its pretrained
            weights (``timm/resnet34.a1_in1k``, :func:`hf_cifd.hub.model_hub_id`), for the RDMs' model cards.
    """
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    check_positive("epochs", epochs) if max_steps is None else check_positive("max_steps", max_steps)
    check_positive("learning_rate", learning_rate)
    if bottleneck_learning_rate is not None:
        check_positive("bottleneck_learning_rate", bottleneck_learning_rate)
    if teacher is None and teacher_cache is None:
        raise DistillationInputError("train_rdms needs a teacher or a teacher-output cache (teacher_cache=...).")
    accelerator = accelerator or Accelerator()
    check_world_size(accelerator.num_processes)
    set_seed(seed)
    collate = collate_fn or default_collate
    if teacher_cache is not None:
        from .data.cache import CachedTeacherCollator, TeacherCache

        cache = TeacherCache(teacher_cache) if isinstance(teacher_cache, (str, os.PathLike)) else teacher_cache
        collate = CachedTeacherCollator(cache, collate)
        widths = embedding_fields(cache.fields)
        num_classes = cache.fields.get("teacher_logits")
    runner = TeacherRunner(accelerator.prepare_model(teacher.eval().requires_grad_(False), evaluation_mode=True)
                           if teacher is not None else None, teacher_adapter)
    if teacher_cache is None:
        widths = runner.adapter.embedding_dims(teacher)
        num_classes = runner.adapter.num_classes(teacher)

    if rdms is None:
        rdms = {m: [build_rdm(architecture, widths[m], num_classes if m == "image" else None, r,
                              hidden_dims=hidden_dims, distortion=distortion) for r in rs]
                for m, rs in _as_rates(rates, widths).items()}
    elif not isinstance(rdms, Mapping):
        rdms = {"image": list(rdms)}
    for m, mods in rdms.items():
        for i, rdm in enumerate(mods):
            if m not in widths or rdm.embed_dim != widths[m]:
                raise DistillationInputError(
                    f"RDM {i} ({m}) expects width {rdm.embed_dim}, the teacher gives {widths.get(m)} for {m!r}."
                )

    bank = _RDMBank(rdms)
    # fused: one pass over the parameters per step (the RDM stage from a cache is optimizer-bound)
    optimizer = torch.optim.Adam(_param_groups(bank, learning_rate, bottleneck_learning_rate), fused=True)
    loader = DataLoader(train_dataset, batch_size=batch_size, shuffle=not isinstance(train_dataset, torch.utils.data.IterableDataset),
                        collate_fn=collate, num_workers=num_workers, drop_last=False)
    bank, optimizer, loader = accelerator.prepare(bank, optimizer, loader)
    if max_steps is None:
        try:
            max_steps = math.ceil(epochs * len(loader))
        except TypeError:
            raise DistillationInputError("a streaming dataset has no length: give train_rdms max_steps=...") from None

    history: list[dict[str, float]] = []
    bar = tqdm(total=max_steps, desc="RDM stage", disable=not (progress and accelerator.is_main_process))
    bank.train()
    step = 0
    while step < max_steps:
        for batch in loader:
            teacher_out = runner(batch)
            outputs = bank({m: teacher_out.embeddings[m].float() for m in rdms})
            per_rdm = {}
            for m, outs in outputs.items():
                for i, (rdm, out) in enumerate(zip(accelerator.unwrap_model(bank).rdms[m], outs)):
                    terms = rdm.loss(teacher_out.embeddings[m].float(), out, batch.get("labels"),
                                     teacher_out.logits if out.logits is not None else None,
                                     lambda_ce=lambda_ce, lambda_kl=lambda_kl, temperature=temperature)
                    per_rdm[f"{m}/{i}"] = losses.total_loss(terms)
            loss = torch.stack(list(per_rdm.values())).sum()
            optimizer.zero_grad(set_to_none=True)
            accelerator.backward(loss)
            optimizer.step()
            history.append({k: v.item() for k, v in per_rdm.items()})
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3g}")
            if step >= max_steps:
                break
    bar.close()

    trained = {m: list(mods) for m, mods in accelerator.unwrap_model(bank).rdms.items()}
    metrics, teacher_acc = evaluate_rdms(trained, eval_dataset if eval_dataset is not None else train_dataset, runner,
                                         collate, batch_size, accelerator)
    teacher_calls = int(accelerator.reduce(torch.tensor(float(runner.calls), device=accelerator.device), "sum").item())
    logger.info("RDM stage: %d steps, %d teacher calls", step, teacher_calls)
    report = RDMReport(rdms=trained, metrics=metrics, teacher_calls=teacher_calls, steps=step,
                       teacher_accuracy=teacher_acc, history=history)
    for row in metrics:
        trained[row["modality"]][row["index"]].card_info = {"teacher": teacher_name, "teacher_hub_id": teacher_hub_id,
                                                            **row}
    if output_dir and accelerator.is_main_process:
        save_rdm_report(report, output_dir, teacher_name, teacher_hub_id)
    return report


@torch.no_grad()
def evaluate_rdms(rdms, dataset, runner: TeacherRunner, collate, batch_size, accelerator):
    """Rate (bits/sample), distortion and accuracy of each RDM in inference mode (rounding), + the teacher's.

    Every process scores its share of ``dataset``; the per-sample values are gathered (``gather_for_metrics``,
    which drops the samples repeated to even out the last batch), so the metrics cover the whole set (``samples``).
    """
    loader = accelerator.prepare(DataLoader(dataset, batch_size=batch_size, collate_fn=collate))
    keys = [(m, i) for m, mods in rdms.items() for i in range(len(mods))]
    columns: list[torch.Tensor] = []  # per batch: (N, 1 + 4 * len(keys)) gathered rows
    has_labels = has_teacher_logits = False
    for mods in rdms.values():
        for rdm in mods:
            rdm.eval()
    for batch in loader:
        teacher_out = runner(batch)
        labels = batch.get("labels")
        n = next(iter(teacher_out.embeddings.values())).shape[0]
        has_labels, has_teacher_logits = labels is not None, teacher_out.logits is not None
        nan = torch.full((n,), float("nan"), device=accelerator.device)
        teacher_pred = teacher_out.logits.argmax(-1) if has_teacher_logits else None
        row = [(teacher_pred == labels).float() if has_labels and has_teacher_logits else nan]
        for m, i in keys:
            rdm, x = rdms[m][i], teacher_out.embeddings[m].float()
            out = rdm(x)
            pred = out.logits.argmax(-1) if out.logits is not None else None
            distortion = (losses.embedding_distortion(out.embedding, x, rdm.distortion, per_sample=True)
                          if out.embedding is not None else nan)  # reconstruction="none": no X^
            row += [out.rate.float(), distortion,
                    (pred == labels).float() if pred is not None and has_labels else nan,
                    (pred == teacher_pred).float() if pred is not None and has_teacher_logits else nan]
        columns.append(accelerator.gather_for_metrics(torch.stack(row, dim=1)))
    table = torch.cat(columns).double().cpu()
    count = table.shape[0]
    metrics = []
    for j, (m, i) in enumerate(keys):
        rdm = rdms[m][i]
        rate, distortion, correct, agree = table[:, 1 + 4 * j: 5 + 4 * j].mean(0).tolist()
        has_head = rdm.head is not None and has_teacher_logits
        metrics.append({
            "modality": m, "index": i, "rate_weight": rdm.rate_weight, "rate_bits": rate,
            "distortion": distortion if rdm.reconstruction != "none" else None,
            "accuracy": 100.0 * correct if has_head and has_labels else None,
            "teacher_agreement": 100.0 * agree if has_head else None, "samples": count,
        })
    for mods in rdms.values():
        for rdm in mods:
            rdm.train()
    teacher_acc = 100.0 * table[:, 0].mean().item() if has_labels and has_teacher_logits else None
    return metrics, teacher_acc


def save_rdm_report(report: RDMReport, output_dir: str, teacher_name: str | None = None,
                    teacher_hub_id: str | None = None) -> None:
    """Saves each RDM (``save_pretrained``, with its card), ``rdm_metrics.json``, the rate-accuracy plot
    ``rd_curve.png`` and the folder's card ``README.md`` (pushable as one Hub repo: ``hf-cifd push``)."""
    from .hub import rdm_collection_card

    os.makedirs(output_dir, exist_ok=True)
    for m, mods in report.rdms.items():
        for i, rdm in enumerate(mods):
            path = os.path.join(output_dir, f"rdm-{m}-{i}")
            if os.path.exists(os.path.join(path, "README.md")):
                os.remove(os.path.join(path, "README.md"))  # the mixin never overwrites a card
            rdm.save_pretrained(path)
    summary = {"rdms": report.metrics, "teacher_accuracy": report.teacher_accuracy, "teacher": teacher_name,
               "teacher_calls": report.teacher_calls, "steps": report.steps}
    with open(os.path.join(output_dir, "rdm_metrics.json"), "w") as f:
        json.dump(summary, f, indent=2)
    plot_rd_curve(report.metrics, os.path.join(output_dir, "rd_curve.png"), report.teacher_accuracy)
    rdm_collection_card(summary, teacher_name, teacher_hub_id=teacher_hub_id).save(os.path.join(output_dir, "README.md"))


def _y_key(rows: Sequence[Mapping[str, Any]]) -> str:
    """What the RD plot shows: accuracy (labels), else agreement with the teacher, else distortion."""
    for key in ("accuracy", "teacher_agreement"):
        if rows and rows[0].get(key) is not None:
            return key
    return "distortion"


def plot_rd_curve(metrics: Sequence[Mapping[str, Any]], path: str, teacher_accuracy: float | None = None) -> None:
    """The paper's Fig. 5: each RDM's accuracy (or teacher agreement / distortion) against its rate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    y_key = _y_key(metrics)
    for m in sorted({row["modality"] for row in metrics}):
        rows = sorted((r for r in metrics if r["modality"] == m), key=lambda r: r["rate_bits"])
        ax.plot([r["rate_bits"] for r in rows], [r[_y_key(rows)] for r in rows], "o-", label=f"RDMs ({m})")
        for r in rows:
            ax.annotate(f"R={r['rate_weight']:g}", (r["rate_bits"], r[_y_key(rows)]), fontsize=7)
    if teacher_accuracy is not None and y_key == "accuracy":
        ax.axhline(teacher_accuracy, color="gray", ls="--", label="teacher")
    ax.set_xlabel("rate (bits / sample)")
    ax.set_ylabel({"accuracy": "accuracy (%)", "teacher_agreement": "agreement with teacher (%)"}.get(y_key, y_key))
    ax.set_title("RDM rate vs performance")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
