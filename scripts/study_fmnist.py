"""The CIFD paper's Table 1 setting on real data, offline: Fashion-MNIST, 10-layer CNN teacher -> 2-layer CNN student.

    make study        # = python scripts/study_fmnist.py --budget default (installs the Debian data set first)

Resumable: every finished unit of work (teacher, cache, pilot run, rate sweep, TA, tuning trial, final seed) is
appended to ``<results_dir>/runs.jsonl`` (models and caches go to ``<work_dir>``, tuning studies to
``<work_dir>/hpo.db``); a restart skips what is recorded. ``--budget`` picks the size (``default``: sized for a
2-core CPU shared with other jobs, well under an hour; ``smoke``: a couple of minutes), and every size knob can be
overridden (``--n_train``, ``--epochs``, ``--trials``, ``--seeds``, ...). ``--report_only`` rebuilds the JSON,
table and plots from runs.jsonl.

Protocol (what a demanding reader needs to trust the table):
* data: a validation split of ``n_val`` images carved from Fashion-MNIST's training set; the teacher's training pool
  (``n_teacher`` other training images); the students' training set = the first ``n_train`` images of that pool;
  the test split (10,000 images) is used only for the final numbers.
* regime: the teacher (trained on the larger pool) has something to teach a student that sees only ``n_train``
  images. Pilot runs (untuned, one seed) of student vs KD at several ``n_train`` document that choice.
* models: the paper's Table 8 CNNs adapted to 28x28x1 (``hf_cifd.models.TABLE8``): teacher cnn10, student cnn2,
  teacher assistants cnn8 / cnn6 / cnn4 (TAKD: a KD chain teacher -> cnn8 -> cnn6 -> cnn4 -> student; DGKD: the
  same TAs all distilling into the student at once, with KD dropout).
* RDMs: first a rate sweep (RDMs at many R trained from the cached teacher embeddings of the pool, scored on the
  validation split: ``rd_curve.png``), then R chosen so that the 1 / 3 / 5 RDMs' validation accuracies spread
  between the student's and the teacher's.
* tuning: every method gets the same number of Optuna trials (``DistillationTrainer.hyperparameter_search``, default
  space of ``hf_cifd.hpo`` with the ranges below, successive-halving pruner), selected on validation accuracy; then
  ``--seeds`` seeds at the chosen setting, scored on the test split.
* cost: training MACs counted as the paper's Appendix D.2 does (forward passes only; every model run during the
  student's training counted per image and epoch, as if the teacher ran live, plus the method's own extra stages:
  TA training for TAKD/DGKD, the RDM stage with one cached teacher pass for CIFD; the teacher's own training, shared by
  all, excluded); measured wall seconds; teacher calls = teacher forwards made during training (cached outputs cost
  none; the one cache fill is reported separately).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time
from typing import Any

import torch

BUDGETS: dict[str, dict[str, Any]] = {
    # the regime the pilot runs chose (README: teacher 88% on 10k images; students on 250 images for 30 epochs, where
    # untuned KD leads the student by ~4 points on validation), sized for a 2-core CPU shared with other jobs
    "default": dict(n_train=250, n_teacher=10000, n_val=500, test_max=10000, teacher_epochs=4, epochs=30,
                    ta_epochs=30, rdm_epochs=60, trials=3, seeds=3, pilot_sizes=[250], pilot_epochs=[4, 15, 30],
                    pilot_temperatures=[2.0, 4.0]),
    "smoke": dict(n_train=300, n_teacher=600, n_val=200, test_max=500, teacher_epochs=1, epochs=2, ta_epochs=1,
                  rdm_epochs=2, trials=2, seeds=2, pilot_sizes=[300], pilot_epochs=[2], pilot_temperatures=[2.0]),
}
RATE_GRID = [100.0, 1000.0, 1500.0, 2000.0, 3000.0, 5000.0, 7000.0, 10000.0, 30000.0]
# Search ranges (hf_cifd.hpo.RANGES overrides): the learning rate within x/÷ 3 of lr below, the rest as hf_cifd.hpo.
LR, LR_FACTOR = 3e-3, 3.0
BATCH = 32

logger = logging.getLogger("study_fmnist")


# ---------------------------------------------------------------------------------------------------- bookkeeping
class Runs:
    """runs.jsonl: one JSON object per finished unit, keyed by ``id``; a restart skips recorded ids."""

    def __init__(self, path: str):
        self.path = path
        self.rows: dict[str, dict] = {}
        if os.path.exists(path):
            with open(path) as f:
                for line in f:
                    if line.strip():
                        row = json.loads(line)
                        self.rows[row["id"]] = row

    def __contains__(self, key: str) -> bool:
        return key in self.rows

    def __getitem__(self, key: str) -> dict:
        return self.rows[key]

    def add(self, row: dict) -> dict:
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        self.rows[row["id"]] = row
        logger.info("recorded %s: %s", row["id"], {k: v for k, v in row.items() if k in ("val_accuracy", "test_accuracy", "seconds")})
        return row


def per_image_macs() -> dict[str, int]:
    """Forward MACs per image of every model of the study, counted by ``hf_cifd.cost`` (``hf-cifd cost``) at
    28x28x1: the Table 8 CNNs, and the study's RDM with its density model (RDM stage) and without (frozen, student
    stage), and the IBM."""
    from hf_cifd.cost import forward_macs, image_model_macs
    from hf_cifd.modules import InformationBottleneck

    out = {name: image_model_macs(f"cnn:{name}", 28, 10, in_channels=1)[0] for name in ("cnn10", "cnn8", "cnn6", "cnn4", "cnn2")}
    rdm, x = rdm_for(1.0).eval(), torch.randn(1, 512)
    out["rdm_train"], out["rdm_frozen"] = forward_macs(rdm, x), forward_macs(rdm, x, with_rate=False)
    out["ibm"] = forward_macs(InformationBottleneck(256, 512, 1).train(), torch.randn(1, 256))
    return out


# ---------------------------------------------------------------------------------------------------- models, data
def cnn(name: str):
    """A Table 8 CNN; the deep ones (teacher, assistants) with He initialisation, the usual one for plain VGG-style
    ReLU stacks: with PyTorch's default init the 10-layer CNN reached only 43% / 60% test accuracy after 2 / 5 epochs
    on 3,000 images (measured), below the 2-layer student."""
    from hf_cifd.models import TABLE8, SimpleCNN

    model = SimpleCNN(TABLE8[name], num_classes=10, in_channels=1, input_size=28)
    if name != "cnn2":
        for m in model.modules():
            if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
                torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                torch.nn.init.zeros_(m.bias)
    return model


def rdm_for(rate: float, embed_dim: int = 512):
    """The paper's Table 1 RDM widths (FC512, FC306, [bottleneck], FC100, output FC10) plus a reconstruction layer back
    to the 512-wide embedding: ``RateDistortionModule.paper_cifar_cnn`` has no reconstruction (R = 0), so R could not
    move its rate; here R weighs the reconstruction distortion against the bits (eq. 4/5)."""
    from hf_cifd import RateDistortionModule

    return RateDistortionModule(embed_dim, hidden_dims=(512, 306, 100), bottleneck_after=2, activate=(True, False, True),
                                num_classes=10, rate_weight=rate)


def enqueue_defaults(args, storage: str, name: str) -> None:
    """Trial 0 of every method's study = the config's defaults (the paper's settings: tau, lambdas, KD dropout,
    lambda_I, the learning rate ``LR``), the rest sampled by TPE: with a budget of a few trials, every method then
    starts from the same sensible point instead of from a random draw."""
    import optuna

    from hf_cifd.hpo import method_knobs, storage_url

    study = optuna.create_study(storage=storage_url(storage), study_name=name, load_if_exists=True, direction="maximize")
    states = optuna.trial.TrialState
    trials = study.get_trials(deepcopy=False)
    if any(t.state in (states.COMPLETE, states.PRUNED, states.WAITING) for t in trials):
        return
    for t in trials:  # a run interrupted before any trial finished: its RUNNING trial is dead (one process per method)
        if t.state == states.RUNNING:
            study._storage.set_trial_state_values(t._trial_id, states.FAIL)
    params = {"learning_rate": args.learning_rate, **{k: getattr(args, k) for k in method_knobs(args)}}
    params.update({f"rdm_weight_{i}": 1.0 for i in range(args.num_rdms if args.method == "cifd" else 0)})
    study.enqueue_trial(params)


def config(out, method, seed, epochs, **kw):
    from hf_cifd import DistillationConfig

    base = dict(output_dir=out, method=method, seed=seed, num_train_epochs=epochs, per_device_train_batch_size=BATCH,
                per_device_eval_batch_size=500, learning_rate=LR, weight_decay=1e-4, lr_scheduler_type="cosine",
                logging_strategy="no", save_strategy="no", eval_strategy="no", report_to=[], use_cpu=True,
                disable_tqdm=True, dataloader_num_workers=0)
    base.update(kw)
    return DistillationConfig(**base)


def accuracy(trainer, samples) -> float:
    """Top-1 accuracy (%) of the trainer's student on ``samples``, computed here (the student alone, eval mode)."""
    return model_accuracy(trainer.accelerator.unwrap_model(trainer.model).student, samples)


@torch.no_grad()
def model_accuracy(student, samples) -> float:
    was = student.training
    student.eval()
    correct = 0
    for i in range(0, len(samples), 500):
        chunk = samples[i:i + 500]
        x = torch.stack([s["pixel_values"] for s in chunk])
        y = torch.stack([s["labels"] for s in chunk])
        correct += int((student(x)[1].argmax(-1) == y).sum())
    student.train(was)
    return 100.0 * correct / len(samples)


class Study:
    def __init__(self, a):
        self.a = a
        os.makedirs(a.work_dir, exist_ok=True)
        os.makedirs(a.results_dir, exist_ok=True)
        self.runs = Runs(os.path.join(a.results_dir, "runs.jsonl"))
        self.hpo_db = os.path.join(a.work_dir, "hpo.db")
        self._data = None
        self._teacher = None
        self._rdm_bank = None
        self._tas: dict[str, Any] = {}

    # ---------------------------------------------------------------- data
    def data(self):
        if self._data is None:
            from hf_cifd.data.fmnist import fashion_mnist_samples

            a = self.a
            order = torch.randperm(60000, generator=torch.Generator().manual_seed(0)).tolist()
            val_idx, pool_idx = order[:a.n_val], order[a.n_val:a.n_val + a.n_teacher]
            train_all = fashion_mnist_samples("train", val_idx + pool_idx)
            val, pool = train_all[:a.n_val], train_all[a.n_val:]
            test = fashion_mnist_samples("test", range(min(a.test_max, 10000)))
            self._data = {"val": val, "pool": pool, "train": pool[:a.n_train], "test": test}
        return self._data

    def train_set(self, n=None):
        return self.data()["pool"][: (n or self.a.n_train)]

    # ---------------------------------------------------------------- teacher + cache
    def teacher(self):
        from hf_cifd import DistillationTrainer
        from hf_cifd.models import SimpleCNN

        path = os.path.join(self.a.work_dir, "teacher")
        if self._teacher is None and "teacher" in self.runs and os.path.isdir(path):
            self._teacher = SimpleCNN.from_pretrained(path)
        if self._teacher is None:
            d = self.data()
            t0 = time.perf_counter()
            torch.manual_seed(0)
            model = cnn("cnn10")
            trainer = DistillationTrainer(model=model, args=config(path, "student", 0, self.a.teacher_epochs, learning_rate=2e-3),
                                          train_dataset=d["pool"])
            trainer.train()
            model.save_pretrained(path)
            self.runs.add({"id": "teacher", "model": "cnn10", "train_images": len(d["pool"]),
                           "epochs": self.a.teacher_epochs, "val_accuracy": accuracy(trainer, d["val"]),
                           "test_accuracy": accuracy(trainer, d["test"]), "seconds": round(time.perf_counter() - t0, 1)})
            self._teacher = model
        key = f"teacher/test_images={len(self.data()['test'])}"
        if key not in self.runs:  # the test split's size is a budget knob: the teacher's row is kept per size
            self.runs.add({"id": key, "test_accuracy": model_accuracy(self._teacher.eval(), self.data()["test"])})
        return self._teacher.eval()

    def cache(self, name="teacher", model=None, samples=None):
        """Outputs of ``model`` (default: the teacher) over the pool + validation images, computed once."""
        from hf_cifd.data import cache_teacher_outputs

        path = os.path.join(self.a.work_dir, f"cache_{name}")
        key = f"cache/{name}"
        if key not in self.runs:
            d = self.data()
            t0 = time.perf_counter()
            report = cache_teacher_outputs(model if model is not None else self.teacher(),
                                           samples if samples is not None else d["pool"] + d["val"], path,
                                           dtype="float32", shard_size=2048, batch_size=500, progress=False)
            self.runs.add({"id": key, "teacher_calls": report.teacher_calls, "seconds": round(time.perf_counter() - t0, 1)})
        return path

    # ---------------------------------------------------------------- one student run / one search
    def trainer(self, method_spec: dict, seed: int, train, eval_set=None, model_init=None, **overrides):
        from hf_cifd import DistillationTrainer

        spec = dict(method_spec)
        kw: dict[str, Any] = {}
        method = spec.pop("method")
        teacher_source = spec.pop("teacher_source", "teacher")
        if method != "student":
            kw["teacher_cache"] = self.cache() if teacher_source == "teacher" else self.ta_cache(teacher_source)
        if spec.pop("indistill", False):
            kw["teacher"] = self.teacher()  # the warm-up reads the teacher's feature maps (live)
        if spec.pop("dgkd", False):  # the TAKD chain's assistants, run live beside the cached teacher
            kw["assistants"] = [self.ta(n) for n in ("cnn8", "cnn6", "cnn4")]
        n_rdms = spec.pop("rdms", 0)
        rates = spec.pop("rates", None)  # explicit R per RDM (diagnostics); default: the chosen rates
        if n_rdms:
            rates = rates or self.chosen_rates(n_rdms)
            kw["rdms"] = self.rdms_at(rates)
            spec.update(num_rdms=n_rdms, rdm_rates=rates)
        elif method == "cifd":
            spec.update(num_rdms=0)
        spec.update(overrides)
        out = os.path.join(self.a.work_dir, "runs", method)
        args = config(out, method, seed, self.a.epochs, **spec)
        if model_init is None:
            torch.manual_seed(seed)
            kw["model"] = cnn("cnn2")
        else:
            kw["model_init"] = model_init
        return DistillationTrainer(args=args, train_dataset=train, eval_dataset=eval_set, **kw)

    def tune(self, name: str, spec: dict) -> dict:
        key = f"tune/{name}"
        if key in self.runs:
            return self.runs[key]
        import optuna

        from hf_cifd.hpo import config_overrides, default_hp_space, finished_trials, storage_url

        d = self.data()
        t0 = time.perf_counter()
        # the pruner sees the validation accuracy every 5 epochs (per-epoch evaluation doubled a trial's cost on the
        # shared CPU); the objective is the last one, after the final epoch, either way
        steps_per_epoch = -(-self.a.n_train // BATCH)
        trainer = self.trainer(spec, 0, self.train_set(), d["val"], model_init=lambda trial: cnn("cnn2"),
                               eval_strategy="steps", eval_steps=steps_per_epoch * max(1, self.a.epochs // 6))
        space = default_hp_space(trainer.args, lr_factor=LR_FACTOR)
        if self.a.trials > 0:
            enqueue_defaults(trainer.args, self.hpo_db, name)
            best = trainer.hyperparameter_search(n_trials=self.a.trials, storage=self.hpo_db, study_name=name,
                                                 hp_space=space)
            params = config_overrides(best.hyperparameters)
            objective = 100.0 * float(best.objective)  # eval_accuracy is a fraction
        else:
            params, objective = {}, None
        study = optuna.load_study(study_name=name, storage=storage_url(self.hpo_db)) if self.a.trials > 0 else None
        trials = [{"number": t.number, "state": t.state.name, "value": t.value, "params": t.params,
                   "epochs_reported": len(t.intermediate_values)} for t in (study.trials if study else [])]
        return self.runs.add({"id": key, "method": name, "chosen": params, "val_accuracy": objective,
                              "trial_budget": self.a.trials, "finished_trials": finished_trials(study) if study else 0,
                              "trials": trials, "seconds": round(time.perf_counter() - t0, 1)})

    def final(self, name: str, spec: dict, seed: int) -> dict:
        key = f"final/{name}/seed={seed}"
        if key in self.runs:
            return self.runs[key]
        chosen = self.tune(name, spec)["chosen"]
        d = self.data()
        t0 = time.perf_counter()
        trainer = self.trainer(spec, seed, self.train_set(), **chosen)
        trainer.train()
        seconds = time.perf_counter() - t0
        return self.runs.add({"id": key, "method": name, "seed": seed, "test_accuracy": accuracy(trainer, d["test"]),
                              "val_accuracy": accuracy(trainer, d["val"]), "seconds": round(seconds, 1),
                              "teacher_calls": int(trainer.teacher_calls), "settings": chosen})

    # ---------------------------------------------------------------- regime pilot
    def pilot(self):
        """Untuned student vs KD (one seed, the config defaults; KD at each ``pilot_temperatures``) at every
        (n_train, epochs) of the pilot grid."""
        d = self.data()
        for n in self.a.pilot_sizes:
            for epochs in self.a.pilot_epochs:
                for method, temperature in [("student", None)] + [("kd", t) for t in self.a.pilot_temperatures]:
                    key = self.pilot_key(method, n, epochs, temperature)
                    if key in self.runs:
                        continue
                    t0 = time.perf_counter()
                    extra = {} if temperature is None else {"temperature": temperature}
                    trainer = self.trainer({"method": method}, 0, self.train_set(n), num_train_epochs=epochs, **extra)
                    trainer.train()
                    self.runs.add({"id": key, "method": method, "n_train": n, "epochs": epochs, **extra,
                                   "teacher_val_accuracy": self.runs["teacher"]["val_accuracy"],
                                   "val_accuracy": accuracy(trainer, d["val"]), "seconds": round(time.perf_counter() - t0, 1)})

    @staticmethod
    def pilot_key(method: str, n: int, epochs: int, temperature: float | None = None) -> str:
        # KD at the config's default temperature (2) keeps the key of the first pilot runs
        suffix = "" if temperature in (None, 2.0) else f"/T={temperature:g}"
        return f"pilot/{method}/n={n}/epochs={epochs}{suffix}"

    # ---------------------------------------------------------------- RDMs: rate sweep, chosen rates
    def rate_sweep(self) -> dict:
        if "sweep" in self.runs and os.path.isdir(os.path.join(self.a.work_dir, "rdms_sweep")):
            return self.runs["sweep"]
        from hf_cifd import train_rdms

        d = self.data()
        t0 = time.perf_counter()
        torch.manual_seed(0)
        # the RDMs, like the assistants, train on the student's training set (the paper's RDM and student stages
        # share the N images), from the cached teacher outputs
        report = train_rdms(self.train_set(), teacher_cache=self.cache(), rdms=[rdm_for(r) for r in RATE_GRID],
                            eval_dataset=d["val"], output_dir=os.path.join(self.a.work_dir, "rdms_sweep"),
                            epochs=self.a.rdm_epochs, batch_size=64, progress=False)
        return self.runs.add({"id": "sweep", "rates": RATE_GRID, "metrics": report.metrics,
                              "teacher_val_accuracy": report.teacher_accuracy, "rdm_epochs": self.a.rdm_epochs,
                              "train_images": self.a.n_train, "seconds": round(time.perf_counter() - t0, 1)})

    def chosen_rates(self, n: int) -> list[float]:
        """R for n RDMs: validation accuracies spread evenly between the student's (pilot, untuned) and the teacher's;
        for each target the swept R whose RDM is closest, highest R first (the paper's order)."""
        sweep = self.rate_sweep()
        key = self.pilot_key("student", self.a.n_train, self.a.epochs)
        lo = self.runs[key]["val_accuracy"] if key in self.runs else None
        hi = sweep["teacher_val_accuracy"]
        lo = lo if lo is not None else min(m["accuracy"] for m in sweep["metrics"])
        targets = [lo + (hi - lo) * (i + 1) / (n + 1) for i in range(n)]
        rows = sorted(sweep["metrics"], key=lambda m: m["rate_weight"])
        chosen: list[float] = []
        for target in sorted(targets, reverse=True):
            free = [m for m in rows if m["rate_weight"] not in chosen] or rows
            chosen.append(min(free, key=lambda m: abs(m["accuracy"] - target))["rate_weight"])
        return sorted(chosen, reverse=True)

    def rdms_at(self, rates):
        from hf_cifd import RateDistortionModule

        out = []
        for r in rates:
            i = RATE_GRID.index(r)
            out.append(RateDistortionModule.from_pretrained(os.path.join(self.a.work_dir, "rdms_sweep", f"rdm-image-{i}")).eval())
        return out

    # ---------------------------------------------------------------- teacher assistants (TAKD chain; DGKD's TAs)
    def ta(self, name: str):
        from hf_cifd import DistillationTrainer
        from hf_cifd.models import SimpleCNN

        if name in self._tas:
            return self._tas[name]
        path = os.path.join(self.a.work_dir, f"ta_{name}")
        key = f"ta/{name}"
        if key in self.runs and os.path.isdir(path):
            self._tas[name] = SimpleCNN.from_pretrained(path).eval()
            return self._tas[name]
        upstream = {"cnn8": "teacher", "cnn6": "cnn8", "cnn4": "cnn6"}[name]
        cache = self.cache() if upstream == "teacher" else self.ta_cache(upstream)
        d = self.data()
        t0 = time.perf_counter()
        torch.manual_seed(0)
        model = cnn(name)
        trainer = DistillationTrainer(model=model, args=config(path, "kd", 0, self.a.ta_epochs), teacher_cache=cache,
                                      train_dataset=self.train_set())
        trainer.train()
        model.save_pretrained(path)
        self.runs.add({"id": key, "upstream": upstream, "epochs": self.a.ta_epochs, "train_images": self.a.n_train,
                       "val_accuracy": accuracy(trainer, d["val"]), "seconds": round(time.perf_counter() - t0, 1)})
        self._tas[name] = model.eval()
        return self._tas[name]

    def ta_cache(self, name: str) -> str:
        d = self.data()
        return self.cache(f"ta_{name}", self.ta(name), self.train_set() + d["val"])


def method_specs(available: set[str]) -> dict[str, dict]:
    """Every method of the study: name -> DistillationConfig overrides (+ study keys: rdms, teacher_source, ...)."""
    specs = {"student": {"method": "student"}, "kd": {"method": "kd"}}
    for n in (3, 1, 5):  # most informative first: a budget that runs out still has these
        specs[f"cifd_{n}rdm"] = {"method": "cifd", "rdms": n, "use_ibm": True}
    specs["takd"] = {"method": "kd", "teacher_source": "cnn4"}  # the last link of the chain teacher->cnn8->cnn6->cnn4
    if "dgkd" in available:
        specs["dgkd"] = {"method": "dgkd", "dgkd": True}
    specs["ckd"] = {"method": "ckd"}
    specs["indistill+kd"] = {"method": "kd", "indistill": True,
                             "indistill_layers": ["features.1:features.1", "features.6:features.4"],
                             "indistill_durations": [1.0, 1.0]}
    for n in (1, 3, 5):
        specs[f"cifd_{n}rdm_noibm"] = {"method": "cifd", "rdms": n, "use_ibm": False}
    return specs


# CIFD variants at KD's chosen setting, one seed, scored on validation only (``--diagnostics``): which CIFD term costs
# accuracy here. name -> (study spec, config overrides on top of KD's chosen hyperparameters)
DIAGNOSTICS = {
    "3rdm_ibm_emb0": ({"method": "cifd", "rdms": 3, "use_ibm": True}, dict(embedding_weight=0.0, kd_dropout=0.0)),
    "3rdm_ibm_emb0_teacherlike": ({"method": "cifd", "rdms": 3, "use_ibm": True, "rates": [30000.0, 10000.0, 7000.0]},
                                  dict(embedding_weight=0.0, kd_dropout=0.0)),
    "0rdm_ibm_emb8.7": ({"method": "cifd", "rdms": 0, "use_ibm": True}, dict(embedding_weight=8.66, kd_dropout=0.0)),
    "3rdm_noibm_emb0_drop0": ({"method": "cifd", "rdms": 3, "use_ibm": False}, dict(embedding_weight=0.0, kd_dropout=0.0)),
}


def diagnose(study: Study) -> None:
    kd = dict(study.tune("kd", {"method": "kd"})["chosen"])
    for name, (spec, extra) in DIAGNOSTICS.items():
        key = f"diag/{name}"
        if key in study.runs:
            continue
        t0 = time.perf_counter()
        trainer = study.trainer(spec, 0, study.train_set(), **{**kd, **extra})
        trainer.train()
        study.runs.add({"id": key, "base": "tune/kd chosen", "spec": spec, "overrides": {**kd, **extra},
                        "val_accuracy": accuracy(trainer, study.data()["val"]),
                        "seconds": round(time.perf_counter() - t0, 1)})


# ---------------------------------------------------------------------------------------------------- report
def training_macs(study: Study, name: str, spec: dict, m: dict[str, int]) -> dict[str, float]:
    """Forward MACs of the student stage (+ the method's extra stages), as the paper's Appendix D.2 (and
    ``hf_cifd.cost``) counts them, from the per-image counts ``m`` of :func:`per_image_macs`."""
    a = study.a
    images = a.n_train * a.epochs
    teacher = m["cnn10"]
    stage = m["cnn2"] * images
    extra = 0.0
    if spec["method"] != "student":
        stage += m[spec.get("teacher_source", "cnn10").replace("teacher", "cnn10")] * images
    if spec.get("rdms"):
        stage += (spec["rdms"] * m["rdm_frozen"] + (m["ibm"] if spec.get("use_ibm") else 0)) * images
        # RDM stage: one cached teacher pass over the training set + the RDMs' training passes
        extra += teacher * a.n_train + spec["rdms"] * m["rdm_train"] * a.n_train * a.rdm_epochs
    if spec.get("indistill"):
        stage += teacher * a.n_train * sum(spec["indistill_durations"])  # the warm-up runs the teacher live
    if spec.get("teacher_source") == "cnn4" or spec.get("dgkd"):
        chain = ("cnn10", "cnn8", "cnn6", "cnn4")
        for k in range(1, 4):  # the TAKD chain: each assistant from its predecessor (DGKD reuses these assistants)
            extra += (m[chain[k]] + m[chain[k - 1]]) * a.n_train * a.ta_epochs
    if spec.get("dgkd"):
        stage += (m["cnn8"] + m["cnn6"] + m["cnn4"]) * images
    return {"student_stage": stage, "extra_stages": extra, "total": stage + extra}


def report(study: Study, specs: dict[str, dict]) -> dict:
    a, runs = study.a, study.runs
    out: dict[str, Any] = {
        "command": "make study  (= python scripts/study_fmnist.py --budget %s)" % a.budget,
        "budget": {k: getattr(a, k) for k in BUDGETS["default"]},
        "protocol": (__doc__ or "").split("Protocol")[1].strip() if __doc__ and "Protocol" in __doc__ else "",
        "data": {"validation": a.n_val, "teacher_pool": a.n_teacher, "student_train": a.n_train,
                 "test": min(a.test_max, 10000), "source": "Fashion-MNIST (Debian dataset-fashion-mnist)"},
        "teacher": ({**runs["teacher"], "test_images": min(a.test_max, 10000),
                     "test_accuracy": runs[f"teacher/test_images={min(a.test_max, 10000)}"]["test_accuracy"]}
                    if f"teacher/test_images={min(a.test_max, 10000)}" in runs else None),
        "teacher_attempts": ("With PyTorch's default initialisation the 10-layer CNN reached 42.65% test accuracy after "
                             "2 epochs at lr 1e-3 and 60.5% after 5 epochs at lr 2e-3 (3,000 images): below the 2-layer "
                             "student. He initialisation (kaiming_normal, the VGG convention) gave the teacher used here."),
        "methods_not_run": [m for m in specs if not any(k.startswith(f"final/{m}/") for k in runs.rows)],
        "teacher_cache": runs["cache/teacher"] if "cache/teacher" in runs else None,
        "pilot": [runs[k] for k in runs.rows if k.startswith("pilot/")],
        "rate_sweep": runs["sweep"] if "sweep" in runs else None,
        "rate_sweep_pilot": runs["sweep_pilot"] if "sweep_pilot" in runs else None,
        "teacher_assistants": {k.split("/")[1]: runs[k] for k in runs.rows if k.startswith("ta/")},
        "cifd_diagnostics": [runs[k] for k in runs.rows if k.startswith("diag/")],
        "methods": {},
    }
    if out["rate_sweep"]:
        out["chosen_rates"] = {n: study.chosen_rates(n) for n in (1, 3, 5)}
    per_image = per_image_macs()
    out["forward_macs_per_image"] = per_image
    base = None
    for name, spec in specs.items():
        seeds = [runs[f"final/{name}/seed={s}"] for s in range(a.seeds) if f"final/{name}/seed={s}" in runs]
        if not seeds:
            continue
        accs = [r["test_accuracy"] for r in seeds]
        macs = training_macs(study, name, spec, per_image)
        tune = dict(runs[f"tune/{name}"])
        if tune["val_accuracy"] is not None and tune["val_accuracy"] <= 1.0:  # recorded as a fraction by an older run
            tune["val_accuracy"] *= 100.0
        row = {"test_accuracy_per_seed": accs, "test_accuracy_mean": round(statistics.mean(accs), 2),
               "test_accuracy_std": round(statistics.stdev(accs), 2) if len(accs) > 1 else 0.0,
               "seeds": [r["seed"] for r in seeds], "chosen_hyperparameters": tune["chosen"],
               "validation_accuracy_of_chosen": tune["val_accuracy"], "trial_budget": tune["trial_budget"],
               "trials": tune["trials"], "tuning_seconds": tune["seconds"],
               "seconds_per_run": round(statistics.mean(r["seconds"] for r in seeds), 1),
               "teacher_calls_per_run": int(statistics.mean(r["teacher_calls"] for r in seeds)),
               "training_macs": macs}
        if spec.get("rdms"):
            row["rdm_rates"] = study.chosen_rates(spec["rdms"])
        out["methods"][name] = row
        if name == "kd":
            base = macs["total"]
    tuned = {m: out["methods"][m]["validation_accuracy_of_chosen"] for m in ("student", "kd") if m in out["methods"]}
    if len(tuned) == 2:  # the regime condition, on validation
        out["regime_check"] = {"tuned_kd_val": tuned["kd"], "tuned_student_val": tuned["student"],
                               "kd_at_least_student": tuned["kd"] >= tuned["student"]}
    if base:
        for row in out["methods"].values():
            row["training_macs_vs_kd"] = round(row["training_macs"]["total"] / base, 3)
    with open(os.path.join(a.results_dir, "results.json"), "w") as f:
        json.dump(out, f, indent=2)
    table = format_table(out)
    with open(os.path.join(a.results_dir, "table.md"), "w") as f:
        f.write(table + "\n")
    plot(out, a.results_dir)
    print(table)
    return out


def format_table(out: dict) -> str:
    t = out.get("teacher") or {}
    lines = ["| method | test accuracy (%) mean ± std | per seed | val. acc. of chosen (%) | training MACs (x KD) | "
             "seconds / run | teacher calls / run |", "|---|---|---|---|---|---|---|"]
    if t:
        lines.append(f"| teacher (cnn10, {out['data']['teacher_pool']} images) | {t['test_accuracy']:.2f} | - | "
                     f"{t['val_accuracy']:.2f} | - | {t['seconds']} | - |")
    for name, r in out["methods"].items():
        rates = f" (R = {', '.join(f'{x:g}' for x in r['rdm_rates'])})" if "rdm_rates" in r else ""
        lines.append(f"| {name}{rates} | {r['test_accuracy_mean']:.2f} ± {r['test_accuracy_std']:.2f} | "
                     f"{', '.join(f'{x:.2f}' for x in r['test_accuracy_per_seed'])} | "
                     f"{r['validation_accuracy_of_chosen'] if r['validation_accuracy_of_chosen'] is None else round(r['validation_accuracy_of_chosen'], 2)} | "
                     f"{r['training_macs']['total'] / 1e12:.3f} T ({r.get('training_macs_vs_kd', float('nan')):.2f}x) | "
                     f"{r['seconds_per_run']} | {r['teacher_calls_per_run']} |")
    return "\n".join(lines)


def plot(out: dict, results_dir: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweep = out.get("rate_sweep")
    if sweep:
        rows = sorted(sweep["metrics"], key=lambda m: m["rate_weight"])
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.5))
        ax1.semilogx([m["rate_weight"] for m in rows], [m["accuracy"] for m in rows], "o-", label="RDM")
        ax2.plot([m["rate_bits"] for m in rows], [m["accuracy"] for m in rows], "o-", label="RDM")
        for ax in (ax1, ax2):
            ax.axhline(sweep["teacher_val_accuracy"], color="gray", ls="--", label="teacher")
            pilot = [p for p in out["pilot"] if p["method"] == "student" and p["n_train"] == out["data"]["student_train"]
                     and p.get("epochs") == out["budget"]["epochs"]]
            if pilot:
                ax.axhline(pilot[0]["val_accuracy"], color="tab:red", ls=":", label="student (pilot)")
            ax.set_ylabel("validation accuracy (%)")
        ax1.set_xlabel("rate weight R")
        ax2.set_xscale("symlog", linthresh=1.0)
        ax2.set_xlim(left=0)
        ax2.set_xlabel("rate (bits / image, eval mode)")
        for r in out.get("chosen_rates", {}).get(5, []):
            ax1.axvline(r, color="tab:green", alpha=0.3)
        ax1.legend(fontsize=7)
        fig.suptitle("Fashion-MNIST: RDM accuracy vs rate (cnn10 teacher embedding)")
        fig.tight_layout()
        fig.savefig(os.path.join(results_dir, "rd_curve.png"), dpi=110)
        plt.close(fig)
    if out["methods"]:
        fig, ax = plt.subplots(figsize=(7.5, 4.5))
        floor = out["methods"]["student"]["test_accuracy_mean"] - 5 if "student" in out["methods"] else -1.0
        off = []
        markers = "osD^v<>pPX*h"
        for i, (name, r) in enumerate(out["methods"].items()):
            if r["test_accuracy_mean"] < floor:  # e.g. a collapsed method: named below instead of squashing the axis
                off.append(f"{name} {r['test_accuracy_mean']:.1f} ± {r['test_accuracy_std']:.1f}")
                continue
            ax.errorbar(r["training_macs"]["total"] / 1e12, r["test_accuracy_mean"], yerr=r["test_accuracy_std"],
                        fmt=markers[i % len(markers)], capsize=3, label=name)
        if off:
            ax.text(0.02, 0.02, "off scale: " + "; ".join(off), transform=ax.transAxes, fontsize=7)
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
        ax.set_xscale("log")
        ax.set_xlabel("training cost (forward TMACs, paper App. D.2 convention)")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title("Fashion-MNIST, cnn10 -> cnn2: accuracy vs training cost")
        fig.tight_layout()
        fig.savefig(os.path.join(results_dir, "accuracy_vs_cost.png"), dpi=110)
        plt.close(fig)


# ---------------------------------------------------------------------------------------------------- main
def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget", choices=sorted(BUDGETS), default="default")
    p.add_argument("--results_dir", default="results/fmnist")
    p.add_argument("--work_dir", default="outputs/study_fmnist")
    p.add_argument("--methods", default=None,
                   help="comma-separated subset of the study's methods, run in this order (default: all)")
    p.add_argument("--report_only", action="store_true")
    p.add_argument("--diagnostics", action="store_true",
                   help="after the methods, run the CIFD variants of DIAGNOSTICS (one seed, validation only)")
    for k, v in BUDGETS["default"].items():
        p.add_argument(f"--{k}", type=type(v) if not isinstance(v, list) else type(v[0]), nargs="+" if isinstance(v, list) else None,
                       default=None)
    a = p.parse_args(argv)
    for k, v in BUDGETS[a.budget].items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    return a


def main(argv=None):
    a = parse(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    logging.getLogger("optuna").setLevel(logging.WARNING)
    torch.set_num_threads(1)  # on an oversubscribed CPU a second thread mostly spins
    from hf_cifd.config import CLASSIFICATION_METHODS

    specs = method_specs(set(CLASSIFICATION_METHODS))
    if a.methods:
        wanted = [m.strip() for m in a.methods.split(",")]
        unknown = set(wanted) - set(specs)
        if unknown:
            sys.exit(f"unknown methods {sorted(unknown)}; the study has {sorted(specs)}")
        specs = {k: specs[k] for k in wanted}  # in the order given: two processes can share a study from both ends
    study = Study(a)
    if not a.report_only:
        t0 = time.perf_counter()
        study.teacher()
        study.cache()
        study.pilot()
        if any(spec.get("rdms") for spec in specs.values()):  # the RDM-free methods need no sweep
            study.rate_sweep()
        for name, spec in specs.items():
            study.runs = Runs(study.runs.path)  # another process may have finished runs meanwhile
            try:
                study.tune(name, spec)
                for seed in range(a.seeds):
                    study.final(name, spec, seed)
            except Exception:  # one broken method must not cost the others their runs; the log has the traceback
                logger.exception("method %s failed; continuing with the next", name)
                continue
            logger.info("%s done (%.0f s since start)", name, time.perf_counter() - t0)
        if a.diagnostics:
            diagnose(study)
    report(study, specs)


if __name__ == "__main__":
    main()
