"""`make demo` / `hf-cifd demo`: the whole CIFD pipeline, offline, on real images in ~2 minutes on 2 CPU cores.

scikit-learn's 8x8 handwritten digits (1,797 real images shipped inside the wheel), a stratified 70/30
train/test split. A 4-layer CNN teacher (620k parameters) is trained, its outputs cached once, RDMs trained
from the cache at the paper's ImageNet rates, then a far smaller student (one conv layer with 4 filters and an
8-wide embedding: 650 parameters) is trained with each method under the same budget and seeds. Every method
uses DistillationConfig's defaults (the paper's settings), except CIFD's embedding-loss weight, which is chosen
from {1, 10, 100} on a validation split carved from the training set, as the paper does (it searched this weight and
lambda_I on a 5% split of ImageNet's training set). The test split is used only for the reported accuracies.

Writes ``<output_dir>/results.json``, ``rdms/rd_curve.png`` (+ ``rdm_metrics.json``), ``cifd_student/`` and prints
a table whose numbers are read back from results.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import time
from typing import Any, Callable

import numpy as np
import torch

from .models import SimpleCNN

logger = logging.getLogger("hf_cifd.demo")


def teacher_model() -> SimpleCNN:
    return SimpleCNN(["C32", "C64", "MP", "C128", "FC256"], num_classes=10, in_channels=1, input_size=8)


def student_model() -> SimpleCNN:
    return SimpleCNN(["C4", "MP", "FC8"], num_classes=10, in_channels=1, input_size=8)


def load_digits_splits(test_fraction: float = 0.3, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Real images: sklearn's digits as in-memory samples of the batch contract (``pixel_values`` in [0, 1],
    ``labels``, ``sample_key``), split stratified. A plain list is a map-style dataset for Trainer; at 64 samples
    a step, Arrow formatting would cost more than the student's forward and backward together."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = torch.from_numpy((digits.images / 16.0).astype(np.float32)).unsqueeze(1)
    labels = torch.from_numpy(digits.target.astype(np.int64))
    idx_train, idx_test = train_test_split(np.arange(len(images)), test_size=test_fraction,
                                           stratify=digits.target, random_state=seed)

    def split(idx):
        return [{"pixel_values": images[i], "labels": labels[i], "sample_key": f"digits-{i}"} for i in idx]

    return split(idx_train), split(idx_test)


def validation_split(samples: list[dict], fraction: float = 0.15, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """A seeded (train, validation) split of the training samples, for choosing hyperparameters."""
    order = torch.randperm(len(samples), generator=torch.Generator().manual_seed(seed)).tolist()
    cut = int(round(fraction * len(samples)))
    return [samples[i] for i in order[cut:]], [samples[i] for i in order[:cut]]


def _config(output_dir, method, seed, epochs, **overrides):
    from .config import DistillationConfig

    return DistillationConfig(
        output_dir=output_dir, method=method, seed=seed, num_train_epochs=epochs, per_device_train_batch_size=64,
        per_device_eval_batch_size=256, learning_rate=overrides.pop("learning_rate", 3e-3), weight_decay=1e-4,
        lr_scheduler_type="cosine", logging_strategy="no", save_strategy="no", eval_strategy="no",
        report_to=[], use_cpu=True, disable_tqdm=True, dataloader_num_workers=0, **overrides,
    )


def _accuracy(trainer, test) -> float:
    """Test accuracy in % (eval_accuracy is a fraction)."""
    return round(100.0 * trainer.evaluate(test)["eval_accuracy"], 2)


def _method_setup(method, seed, epochs, output_dir, teacher, cache_dir, rdm_report, rdm_rates, num_train, **overrides):
    """Trainer arguments for one ``--methods`` entry: a method name, ``indistill+<method>`` (InDistill warm-up on
    the first conv layer, then the method) or ``ckd_budget`` (Comparative KD under a teacher-call budget of a
    quarter of the training set)."""
    from .methods.indistill import demo_indistill_layers

    name = method.split("+")[-1]
    kwargs: dict[str, Any] = {"teacher_cache": cache_dir if name != "student" else None}
    if name == "cifd":
        overrides.update(num_rdms=len(rdm_rates), rdm_rates=rdm_rates)
        kwargs["rdms"] = rdm_report.rdms
    if method.startswith("indistill+"):
        overrides["indistill_layers"] = demo_indistill_layers("digits")
        kwargs["teacher"] = teacher  # the warm-up reads the teacher's intermediate features
    if name == "ckd_budget":
        name = "ckd"
        budget = num_train // 4
        overrides.update(teacher_call_budget=budget, ckd_pool_size=4 * budget)
        kwargs = {"teacher": teacher}  # the budget mode runs (and counts) the teacher itself
    kwargs["args"] = _config(os.path.join(output_dir, method.replace("+", "_")), name, seed, epochs, **overrides)
    return kwargs


def run_demo(output_dir: str = "outputs/demo", methods=("student", "kd", "cifd"), seeds=(0, 1, 2),
             teacher_epochs: int = 15, student_epochs: int = 30, rdm_rates=(1e4, 5e3, 1e3), rdm_epochs: int = 30,
             embedding_weights=(1.0, 10.0, 100.0),
             progress: Callable[[str], None] = print) -> dict[str, Any]:
    from transformers.utils import logging as hf_logging

    from .data.cache import cache_teacher_outputs
    from .rdm_training import train_rdms
    from .trainer import DistillationTrainer

    hf_logging.set_verbosity_error()
    os.makedirs(output_dir, exist_ok=True)
    train, test = load_digits_splits()
    results: dict[str, Any] = {"dataset": f"sklearn digits 8x8: {len(train)} train / {len(test)} test (held out)",
                               "seeds": list(seeds), "teacher_calls": {}, "seconds": {}, "per_seed": {}}

    t0 = time.perf_counter()
    torch.manual_seed(0)
    teacher = teacher_model()
    trainer = DistillationTrainer(model=teacher, args=_config(os.path.join(output_dir, "teacher"), "student", 0, teacher_epochs),
                                  train_dataset=train)
    trainer.train()
    results["teacher"] = _accuracy(trainer, test)
    results["seconds"]["teacher"] = round(time.perf_counter() - t0, 1)
    progress(f"teacher: {results['teacher']:.2f}% test accuracy ({results['seconds']['teacher']} s)")

    # The teacher runs exactly once per sample, here; everything after reads the cache.
    t0 = time.perf_counter()
    cache_dir = os.path.join(output_dir, "teacher_cache")
    report = cache_teacher_outputs(teacher, train + test, cache_dir, dtype="float32", shard_size=512, progress=False)
    results["teacher_calls"]["cache"] = report.teacher_calls
    results["seconds"]["cache"] = round(time.perf_counter() - t0, 1)
    progress(f"teacher cache: {report.teacher_calls} teacher calls -> {cache_dir}")

    t0 = time.perf_counter()
    rdm_report = None
    if any(m.split("+")[-1] == "cifd" for m in methods):
        rdm_report = train_rdms(train, teacher_cache=cache_dir, rates=list(rdm_rates), eval_dataset=test,
                                output_dir=os.path.join(output_dir, "rdms"), epochs=rdm_epochs, batch_size=128,
                                hidden_dims=(256, 256, 256), progress=False)  # the paper scales RDM width with the teacher's
        results["rdms"] = rdm_report.metrics
        results["teacher_calls"]["rdms"] = rdm_report.teacher_calls
        results["seconds"]["rdms"] = round(time.perf_counter() - t0, 1)
        progress("RDMs: " + ", ".join(f"R={r['rate_weight']:g}: {r['accuracy']:.1f}% at {r['rate_bits']:.0f} bits"
                                      for r in rdm_report.metrics))

    def run(method, seed, train_set, **overrides):
        torch.manual_seed(seed)
        trainer = DistillationTrainer(model=student_model(), train_dataset=train_set,
                                      **_method_setup(method, seed, student_epochs, output_dir, teacher, cache_dir,
                                                      rdm_report, list(rdm_rates), len(train_set), **overrides))
        trainer.train()
        return trainer

    chosen: dict[str, Any] = {}
    if rdm_report is not None and len(embedding_weights) > 1:
        t0 = time.perf_counter()
        fit, held_out = validation_split(train)
        scores = {w: _accuracy(run("cifd", 0, fit, embedding_weight=w), held_out) for w in embedding_weights}
        chosen["embedding_weight"] = max(scores, key=scores.get)
        results["tuning"] = {"cifd_embedding_weight_validation_accuracy": {str(k): v for k, v in scores.items()},
                             "chosen": chosen, "validation": "15% of the training split, seed 0"}
        results["seconds"]["tuning"] = round(time.perf_counter() - t0, 1)
        progress(f"CIFD embedding weight on the validation split: {scores} -> {chosen['embedding_weight']:g}")

    for method in methods:
        t0, accs, calls = time.perf_counter(), [], 0
        for seed in seeds:
            trainer = run(method, seed, train, **(chosen if method.split("+")[-1] == "cifd" else {}))
            accs.append(_accuracy(trainer, test))
            calls += trainer.teacher_calls
            if method == "cifd" and seed == seeds[0]:
                trainer.save_model(os.path.join(output_dir, "cifd_student"))
        results[method] = round(statistics.mean(accs), 2)
        results["per_seed"][method] = accs
        results["teacher_calls"][method] = calls
        results["seconds"][method] = round(time.perf_counter() - t0, 1)
        progress(f"{method}: {results[method]:.2f}% (seeds {accs}, {results['seconds'][method]} s)")

    with open(os.path.join(output_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    return results


def format_table(results: dict[str, Any], methods) -> str:
    rows = [("teacher", results["teacher"], "-", results["seconds"]["teacher"])]
    for m in methods:
        spread = results["per_seed"][m]
        std = statistics.pstdev(spread) if len(spread) > 1 else 0.0
        rows.append((m, f"{results[m]:.2f} ± {std:.2f}", results["teacher_calls"][m], results["seconds"][m]))
    lines = [f"{'model':<14}{'test acc (%)':>16}{'teacher calls':>15}{'seconds':>10}"]
    lines += [f"{name:<14}{str(acc):>16}{str(calls):>15}{sec:>10}" for name, acc, calls, sec in rows]
    lines.append(f"(teacher outputs cached once: {results['teacher_calls']['cache']} calls; student: 1 conv layer with "
                 f"4 filters, 8-wide embedding, 650 parameters; mean ± std over seeds {results['seeds']})")
    if "tuning" in results:
        lines.append(f"(CIFD embedding-loss weight chosen on a validation split of the training set: "
                     f"{results['tuning']['chosen']['embedding_weight']:g}; validation accuracy by weight "
                     f"{results['tuning']['cifd_embedding_weight_validation_accuracy']})")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="hf-cifd demo", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    run_from_args(parser.parse_args(argv))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output_dir", default="outputs/demo")
    parser.add_argument("--methods", default="student,kd,cifd", help="comma-separated, e.g. student,kd,fitnet,rkd,cifd,ckd")
    parser.add_argument("--seeds", type=int, default=3, help="number of seeds per method (0..n-1)")
    parser.add_argument("--student_epochs", type=int, default=30)
    parser.add_argument("--no_tuning", action="store_true",
                        help="use the paper's embedding-loss weight (100) instead of choosing it on a validation split")


def run_from_args(args) -> dict[str, Any]:
    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    run_demo(args.output_dir, methods=methods, seeds=tuple(range(args.seeds)), student_epochs=args.student_epochs,
             embedding_weights=(100.0,) if args.no_tuning else (1.0, 10.0, 100.0))
    with open(os.path.join(args.output_dir, "results.json")) as f:
        results = json.load(f)  # print what the file says
    print(format_table(results, methods))
    print(f"results: {os.path.join(args.output_dir, 'results.json')}")
    return results


if __name__ == "__main__":
    main()
