"""`make demo` / `hf-cifd demo`: the whole CIFD pipeline, offline, on real images, in a setting where the teacher has
something to teach (about 2 minutes on 2 idle CPU cores).

Data: scikit-learn's 8x8 handwritten digits (1,797 real images shipped inside the wheel), a stratified 70/30
train/test split; 20% of the training split is carved off as the validation split that every choice is made on.

Setting (the lessons of scripts/study_fmnist.py and of the first demo, where no method beat plain training):
* the teacher (4-layer CNN, 620k parameters) trains on all 1,006 remaining training images with label smoothing 0.1
  (a calibrated teacher: its soft labels carry class similarities; an over-confident one teaches little);
* the student (one conv layer with 8 filters, a 16-wide embedding: 2.3k parameters) sees only ``n_labeled`` (200)
  of those images, for a fixed number of optimizer steps: the regime where soft labels help;
* three RDMs at visibly different rates, trained from the teacher-output cache: R = 3000, 400, 250 (about 37 / 13 /
  8 bits, 98 / 96 / 82% validation accuracy in a rate sweep over R = 200..3000 on the validation split: from
  teacher-like to student-like). Below R ~ 200 an RDM keeps no bits at all: R weighs an element-mean distortion
  (at most ~0.18 here) against bits summed over 64 channels;
* every method's knobs (learning rate, temperature, every lambda, KD dropout, lambda_I) are chosen by the same small
  Optuna search on the validation split (``DistillationTrainer.hyperparameter_search``, ``trials`` trials each),
  then ``seeds`` seeds are trained and scored on the test split, which nothing else looks at.

Writes ``<output_dir>/results.json`` (per-method test accuracies per seed, chosen knobs, the RDMs' rate / distortion /
accuracy), ``rdms/rd_curve.png`` and prints a table read back from results.json.
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

RDM_RATES = (3000.0, 400.0, 250.0)  # the RDMs' R (see the module docstring)


def teacher_model() -> SimpleCNN:
    return SimpleCNN(["C32", "C64", "MP", "C128", "FC256"], num_classes=10, in_channels=1, input_size=8)


def student_model() -> SimpleCNN:
    return SimpleCNN(["C8", "MP", "FC16"], num_classes=10, in_channels=1, input_size=8)


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


def _config(output_dir, method, seed, steps, **overrides):
    from .config import DistillationConfig

    base = dict(output_dir=output_dir, method=method, seed=seed, max_steps=steps, per_device_train_batch_size=32,
                per_device_eval_batch_size=512, learning_rate=3e-3, weight_decay=1e-4, lr_scheduler_type="cosine",
                logging_strategy="no", save_strategy="no", eval_strategy="no", report_to=[], use_cpu=True,
                disable_tqdm=True, dataloader_num_workers=0)
    base.update(overrides)
    return DistillationConfig(**base)


@torch.no_grad()
def _accuracy(model, samples) -> float:
    """Top-1 accuracy (%) of a model returning (embedding, logits), computed here in eval mode."""
    was = model.training
    model.eval()
    x = torch.stack([s["pixel_values"] for s in samples])
    y = torch.stack([s["labels"] for s in samples])
    acc = 100.0 * (model(x)[1].argmax(-1) == y).float().mean().item()
    model.train(was)
    return round(acc, 2)


def _method_kwargs(method, teacher, cache_dir, rdms, num_train, steps) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """(DistillationConfig method, trainer kwargs, config overrides) for one ``--methods`` entry: a method name,
    ``indistill+<method>`` (InDistill warm-up on the first conv layer, then the method) or ``ckd_budget``
    (Comparative KD under a teacher-call budget of a quarter of the training set)."""
    from .methods.indistill import demo_indistill_layers

    name = method.split("+")[-1]
    kwargs: dict[str, Any] = {"teacher_cache": cache_dir} if name != "student" else {}
    overrides: dict[str, Any] = {}
    if name == "cifd":
        overrides.update(num_rdms=len(rdms), rdm_rates=[r.rate_weight for r in rdms])
        kwargs["rdms"] = rdms
    if method.startswith("indistill+"):
        overrides.update(indistill_layers=demo_indistill_layers("digits"), indistill_durations=[max(1, steps // 4)],
                         indistill_unit="step")  # the first quarter of the steps
        kwargs["teacher"] = teacher  # the warm-up reads the teacher's intermediate features
    if name == "ckd_budget":
        name = "ckd"
        budget = num_train // 4
        overrides.update(teacher_call_budget=budget, ckd_pool_size=4 * budget)
        kwargs = {"teacher": teacher}  # the budget mode runs (and counts) the teacher itself
    return name, kwargs, overrides


def run_demo(output_dir: str = "outputs/demo", methods=("student", "kd", "cifd"), seeds=(0, 1, 2),
             n_labeled: int = 200, steps: int = 400, trials: int = 3, teacher_steps: int = 300,
             rdm_rates=RDM_RATES, rdm_epochs: int = 30,
             progress: Callable[[str], None] = print) -> dict[str, Any]:
    from transformers.utils import logging as hf_logging

    from .data.cache import cache_teacher_outputs
    from .hpo import config_overrides, train_validation_split
    from .modules import RateDistortionModule
    from .rdm_training import train_rdms
    from .trainer import DistillationTrainer

    hf_logging.set_verbosity_error()
    logging.getLogger("optuna").setLevel(logging.WARNING)
    # Models of a few thousand parameters gain nothing from intra-op threads, and on a busy CPU a second thread spins:
    # a teacher step measured 0.08 s with 1 thread vs 3.9 s with 2 on the loaded 2-core build machine.
    torch.set_num_threads(1)
    os.makedirs(output_dir, exist_ok=True)
    train_all, test = load_digits_splits()
    fit, val = train_validation_split(train_all, fraction=0.2, seed=0)
    labeled = fit[:n_labeled]
    results: dict[str, Any] = {
        "dataset": (f"sklearn digits 8x8: {len(train_all)} train ({len(fit)} for the teacher, the first {len(labeled)} "
                    f"of them for the students; {len(val)} validation) / {len(test)} test (held out)"),
        "seeds": list(seeds), "student_steps": steps, "trials_per_method": trials, "teacher_calls": {}, "seconds": {},
        "per_seed": {}, "chosen": {}, "validation_accuracy_of_chosen": {},
        "student_parameters": sum(p.numel() for p in student_model().parameters())}

    t0 = time.perf_counter()
    torch.manual_seed(0)
    teacher = teacher_model()
    DistillationTrainer(model=teacher, train_dataset=fit, args=_config(
        os.path.join(output_dir, "teacher"), "student", 0, teacher_steps, label_smoothing_factor=0.1)).train()
    teacher.eval()
    results["teacher"] = _accuracy(teacher, test)
    results["seconds"]["teacher"] = round(time.perf_counter() - t0, 1)
    progress(f"teacher: {results['teacher']:.2f}% test accuracy ({results['seconds']['teacher']} s)")

    # The teacher runs exactly once per image, here; everything after reads the cache (the test images are cached
    # only to score the RDMs).
    t0 = time.perf_counter()
    cache_dir = os.path.join(output_dir, "teacher_cache")
    report = cache_teacher_outputs(teacher, train_all + test, cache_dir, dtype="float32", shard_size=512, progress=False)
    results["teacher_calls"]["cache"] = report.teacher_calls
    progress(f"teacher cache: {report.teacher_calls} teacher calls -> {cache_dir}")

    rdms = []
    if any(m.split("+")[-1] == "cifd" for m in methods):
        t0 = time.perf_counter()
        torch.manual_seed(0)
        modules = [RateDistortionModule(256, hidden_dims=(128, 64, 128), num_classes=10, rate_weight=r) for r in rdm_rates]
        rdm_report = train_rdms(fit, teacher_cache=cache_dir, rdms=modules, eval_dataset=test,
                                output_dir=os.path.join(output_dir, "rdms"), epochs=rdm_epochs, batch_size=128,
                                progress=False)
        rdms = [r.eval() for r in rdm_report.rdms["image"]]
        results["rdms"] = rdm_report.metrics
        results["seconds"]["rdms"] = round(time.perf_counter() - t0, 1)
        progress("RDMs (test split): " + ", ".join(
            f"R={r['rate_weight']:g}: {r['accuracy']:.1f}% at {r['rate_bits']:.0f} bits" for r in rdm_report.metrics))

    def trainer_for(method, seed, *, search=False, **chosen):
        name, kwargs, overrides = _method_kwargs(method, teacher, cache_dir, rdms, len(labeled), steps)
        overrides.update(chosen)
        if search:  # evaluated 4 times per trial: the pruner's rungs
            overrides.update(eval_strategy="steps", eval_steps=max(1, steps // 4))
        args = _config(os.path.join(output_dir, method.replace("+", "_")), name, seed, steps, **overrides)
        if search:
            return DistillationTrainer(model_init=lambda trial: student_model(), args=args, train_dataset=labeled,
                                       eval_dataset=val, **kwargs)
        torch.manual_seed(seed)
        return DistillationTrainer(model=student_model(), args=args, train_dataset=labeled, **kwargs)

    for method in methods:
        t0 = time.perf_counter()
        chosen: dict[str, Any] = {}
        if trials > 0:
            best = trainer_for(method, 0, search=True).hyperparameter_search(n_trials=trials)
            chosen = config_overrides(best.hyperparameters)
            results["validation_accuracy_of_chosen"][method] = round(100.0 * float(best.objective), 2)  # a fraction
        results["chosen"][method] = chosen
        accs, calls = [], 0
        for seed in seeds:
            trainer = trainer_for(method, seed, **chosen)
            trainer.train()
            accs.append(_accuracy(trainer.model.student, test))
            calls += trainer.teacher_calls
        results[method] = round(statistics.mean(accs), 2)
        results["per_seed"][method] = accs
        results["teacher_calls"][method] = calls
        results["seconds"][method] = round(time.perf_counter() - t0, 1)
        progress(f"{method}: {results[method]:.2f}% (seeds {accs}; knobs chosen on validation: "
                 f"{ {k: (round(v, 4) if isinstance(v, float) else v) for k, v in chosen.items()} }; "
                 f"{results['seconds'][method]} s)")

    with open(os.path.join(output_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    return results


def format_table(results: dict[str, Any], methods) -> str:
    lines = [f"{'model':<16}{'test acc (%)':>16}{'val acc (chosen)':>18}{'teacher calls':>15}{'seconds':>10}",
             f"{'teacher':<16}{results['teacher']:>16.2f}{'-':>18}{'-':>15}{results['seconds']['teacher']:>10}"]
    for m in methods:
        spread = results["per_seed"][m]
        std = statistics.stdev(spread) if len(spread) > 1 else 0.0
        val = results["validation_accuracy_of_chosen"].get(m, "-")
        lines.append(f"{m:<16}{f'{results[m]:.2f} ± {std:.2f}':>16}{str(val):>18}{results['teacher_calls'][m]:>15}"
                     f"{results['seconds'][m]:>10}")
    lines.append(f"(mean ± std over seeds {results['seeds']}; student: {results['student_parameters']} parameters, "
                 f"{results['student_steps']} steps; each method's knobs chosen by {results['trials_per_method']} "
                 f"Optuna trials on the validation split; teacher outputs cached once: "
                 f"{results['teacher_calls']['cache']} calls)")
    for r in results.get("rdms", []):
        lines.append(f"RDM R={r['rate_weight']:g}: {r['accuracy']:.2f}% test accuracy, {r['rate_bits']:.0f} bits, "
                     f"distortion {r['distortion']:.4f}")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="hf-cifd demo", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    run_from_args(parser.parse_args(argv))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output_dir", default="outputs/demo")
    parser.add_argument("--methods", default="student,kd,cifd",
                        help="comma-separated, e.g. student,kd,fitnet,rkd,cifd,ckd,indistill+kd,ckd_budget")
    parser.add_argument("--seeds", type=int, default=3, help="number of seeds per method (0..n-1)")
    parser.add_argument("--steps", type=int, default=400, help="optimizer steps per student run")
    parser.add_argument("--n_labeled", type=int, default=200, help="training images the students see")
    parser.add_argument("--trials", type=int, default=3,
                        help="Optuna trials per method on the validation split (0: DistillationConfig's defaults)")


def run_from_args(args) -> dict[str, Any]:
    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    run_demo(args.output_dir, methods=methods, seeds=tuple(range(args.seeds)), steps=args.steps,
             n_labeled=args.n_labeled, trials=args.trials)
    with open(os.path.join(args.output_dir, "results.json")) as f:
        results = json.load(f)  # print what the file says
    table = format_table(results, methods)
    with open(os.path.join(args.output_dir, "table.txt"), "w") as f:
        f.write(table + "\n")
    print(table)
    print(f"results: {os.path.join(args.output_dir, 'results.json')}; RD curve: "
          f"{os.path.join(args.output_dir, 'rdms', 'rd_curve.png')}")
    return results


if __name__ == "__main__":
    main()
