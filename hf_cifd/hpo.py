"""Hyperparameter search for `DistillationTrainer` through `Trainer.hyperparameter_search` (Optuna).

What the paper did (CIFD Appendix A.1.1): every method, baselines included, tuned with Optuna + ASHA over the
temperature, the learning rate, KD dropout and all lambdas, selected on data held out from the training set. Here:

* :func:`default_hp_space` is that space for the configured method (only the knobs the method reads):

  ==============================  ===================================  =======================================
  knob (DistillationConfig)       range                                methods
  ==============================  ===================================  =======================================
  learning_rate                   lr/10 .. lr*10 (log; lr as given)    all
  temperature                     1 .. 8                               every method with a teacher KL (kd, cifd, ...)
  lambda_ce, lambda_kl            0.1 .. 2, 0.1 .. 10 (log)            same
  kd_dropout                      0 .. 0.5                             cifd
  dgkd_drop_num                   0 .. 2 (int)                         dgkd
  embedding_weight                0.1 .. 100 (log)                     cifd, fitnet
  lambda_ibm                      1e-4 .. 0.1 (log)                    cifd with use_ibm
  rdm_weights[n]                  0.1 .. 2 (log), one per RDM          cifd
  rdm_rates[n]                    R_n/10 .. R_n*10 (log)               cifd, only when ``rdms`` is a callable
                                                                       (each trial trains its RDMs)
  rkd_*_weight, ckd_weight,       1 .. 100, 0.1 .. 10 (log)            rkd, ckd / ckd_addon, indistill
  indistill_weight, pkt_weight    0.1 .. 10, 1e3 .. 1e5 (log)          pkt
  ==============================  ===================================  =======================================

* the pruner defaults to Optuna's ``SuccessiveHalvingPruner`` (asynchronous successive halving: the ASHA the paper
  used); it acts on the objective reported at each evaluation, so set ``eval_strategy="epoch"`` (or steps).
* ``storage="study.db"`` (or any Optuna storage URL) persists the study: ``n_trials`` is the study's total, and a
  search started again after an interruption runs only the trials still missing (complete + pruned ones count).
* the objective is ``eval_accuracy`` (maximised) for classifiers, else ``eval_loss`` (minimised), on
  ``eval_dataset``: a validation split carved from the training data (:func:`train_validation_split`), never the
  test split.
* each trial starts from a fresh container (student, IBMs, projectors, method modules) seeded ``seed + trial
  number``; see ``DistillationTrainer.call_model_init``.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Mapping

import torch

from .checks import DistillationInputError

logger = logging.getLogger(__name__)

# knob -> (low, high, log scale); ranges relative to the configured value are resolved in default_hp_space
RANGES: dict[str, tuple[float, float, bool]] = {
    "temperature": (1.0, 8.0, False),
    "lambda_ce": (0.1, 2.0, True),
    "lambda_kl": (0.1, 10.0, True),
    "kd_dropout": (0.0, 0.5, False),
    "embedding_weight": (0.1, 100.0, True),
    "lambda_ibm": (1e-4, 0.1, True),
    "rkd_distance_weight": (1.0, 100.0, True),
    "rkd_angle_weight": (1.0, 100.0, True),
    "ckd_weight": (0.1, 10.0, True),
    "pkt_weight": (1e3, 1e5, True),
    "indistill_weight": (0.1, 10.0, True),
}
_KL = ("temperature", "lambda_ce", "lambda_kl")
INT_RANGES: dict[str, tuple[int, int]] = {"dgkd_drop_num": (0, 2)}  # DGKD: teacher/assistant terms dropped per step
METHOD_KNOBS: dict[str, tuple[str, ...]] = {
    "student": (),
    "kd": _KL,
    "takd": _KL,
    "dgkd": (*_KL, "dgkd_drop_num"),
    "cifd": (*_KL, "kd_dropout", "embedding_weight"),
    "fitnet": ("lambda_ce", "embedding_weight"),
    "rkd": ("lambda_ce", "rkd_distance_weight", "rkd_angle_weight"),
    "ckd": ("ckd_weight",),
    "pkt": ("lambda_ce", "pkt_weight"),
}


def method_knobs(config) -> list[str]:
    """The DistillationConfig fields the configured method reads (the default search space, without lr / RDMs)."""
    knobs = list(METHOD_KNOBS.get(config.method, _KL))
    if config.method == "cifd" and config.use_ibm:
        knobs.append("lambda_ibm")
    if getattr(config, "ckd_addon", False):
        knobs.append("ckd_weight")
    if getattr(config, "indistill_layers", None):
        knobs.append("indistill_weight")
    return [k for k in knobs if hasattr(config, k)]


def default_hp_space(config, *, tune_rdm_rates: bool = False, lr_factor: float = 10.0,
                     rate_factor: float = 10.0, ranges: Mapping[str, tuple[float, float, bool]] | None = None
                     ) -> Callable[[Any], dict[str, Any]]:
    """The default Optuna space for ``config.method`` (table in the module docstring). Ranges that depend on the
    configuration (learning rate, RDM rates) are fixed here, from the values ``config`` has now, so that later
    trials (which change ``config``) keep sampling the same distributions. ``ranges`` overrides entries of
    :data:`RANGES`."""
    table = {**RANGES, **(ranges or {})}
    lr0 = float(config.learning_rate)
    knobs = method_knobs(config)
    n_rdms = config.num_rdms if config.method == "cifd" else 0
    rates0 = list(config.rdm_rates)[:n_rdms]

    def space(trial) -> dict[str, Any]:
        params: dict[str, Any] = {"learning_rate": trial.suggest_float("learning_rate", lr0 / lr_factor,
                                                                       lr0 * lr_factor, log=True)}
        for name in knobs:
            if name in INT_RANGES:
                params[name] = trial.suggest_int(name, *INT_RANGES[name])
                continue
            low, high, log = table[name]
            params[name] = trial.suggest_float(name, low, high, log=log)
        if n_rdms:
            params["rdm_weights"] = [trial.suggest_float(f"rdm_weight_{i}", 0.1, 2.0, log=True) for i in range(n_rdms)]
            if tune_rdm_rates:
                params["rdm_rates"] = [trial.suggest_float(f"rdm_rate_{i}", r / rate_factor, r * rate_factor, log=True)
                                       for i, r in enumerate(rates0)]
        return params

    return space


def config_overrides(params: Mapping[str, Any]) -> dict[str, Any]:
    """Optuna's flat parameter names (a study's ``best_params``) -> DistillationConfig fields (``rdm_rate_0``,
    ``rdm_rate_1``, ... -> ``rdm_rates``; ``rdm_weight_i`` -> ``rdm_weights``)."""
    out: dict[str, Any] = {}
    lists: dict[str, dict[int, float]] = {}
    for key, value in params.items():
        for prefix, field in (("rdm_rate_", "rdm_rates"), ("rdm_weight_", "rdm_weights")):
            if key.startswith(prefix) and key[len(prefix):].isdigit():
                lists.setdefault(field, {})[int(key[len(prefix):])] = float(value)
                break
        else:
            out[key] = value
    for field, items in lists.items():
        out[field] = [items[i] for i in sorted(items)]
    return out


def apply_trial_params(trainer, trial) -> None:
    """Sets the trial's values on ``trainer.args`` (Trainer does this only after building the model, too late for
    the container) and the trial's seed (``seed`` at search start + trial number)."""
    params = trainer.hp_space(trial)
    for key, value in params.items():
        if not hasattr(trainer.args, key):
            raise DistillationInputError(f"the search space sets {key!r}, which is not a DistillationConfig field.")
        setattr(trainer.args, key, list(value) if isinstance(value, (list, tuple)) else value)
    number = getattr(trial, "number", None)
    if number is not None:
        trainer.args.seed = getattr(trainer, "_hp_base_seed", trainer.args.seed) + int(number)


def accuracy_objective(metrics: Mapping[str, float]) -> float:
    return float(metrics["eval_accuracy"])


def loss_objective(metrics: Mapping[str, float]) -> float:
    return float(metrics["eval_loss"])


def storage_url(storage: str | None) -> str | None:
    """A file path becomes an SQLite URL; URLs (``sqlite:///...``, ``postgresql://...``) pass through."""
    if storage is None or "://" in storage:
        return storage
    import os

    return "sqlite:///" + os.path.abspath(storage)


def finished_trials(study) -> int:
    import optuna

    states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    return sum(t.state in states for t in study.get_trials(deepcopy=False))


def run_search(trainer, parent_search, *, hp_space=None, compute_objective=None, n_trials: int = 20,
               direction: str | None = None, backend: str | None = "optuna", hp_name=None, storage: str | None = None,
               study_name: str | None = None, pruner=None, sampler=None, tune_rdm_rates: bool | None = None, **kwargs):
    """``DistillationTrainer.hyperparameter_search``. Arguments as Trainer's, plus:

    * ``storage``: an SQLite file path or Optuna storage URL; the study persists there and resumes: ``n_trials`` is
      the total wanted, trials already complete or pruned are not run again. ``study_name`` defaults to
      ``hf_cifd-<method>``.
    * ``pruner`` (default ``SuccessiveHalvingPruner()``), ``sampler`` (default ``TPESampler(seed=args.seed)``).
    * ``tune_rdm_rates``: search the RDM rates too (default: when the trainer's ``rdms`` is a callable that
      trains RDMs for given rates).

    Returns Trainer's ``BestRun``; :func:`config_overrides` turns its ``hyperparameters`` into config fields. The
    trainer's model is released after the search (Trainer's behaviour): train the chosen setting in a new trainer.
    """
    if backend not in ("optuna", None):
        raise DistillationInputError(f"DistillationTrainer's hyperparameter search uses Optuna; got backend={backend!r}.")
    if trainer.model_init is None:
        raise DistillationInputError("hyperparameter_search builds a fresh student per trial: create the trainer with "
                                     "model_init=<callable returning a new student> instead of model=...")
    if trainer.eval_dataset is None:
        raise DistillationInputError(
            "hyperparameter_search selects on eval_dataset: pass a validation split carved from the training data "
            "(hf_cifd.hpo.train_validation_split), never the test split.")
    try:
        import optuna
    except ImportError:
        raise DistillationInputError("hyperparameter_search needs Optuna: pip install optuna") from None
    args = trainer.args
    if args.eval_strategy == "no":
        logger.warning("eval_strategy='no': trials report one objective at the end and the pruner cannot stop any "
                       "early; set eval_strategy='epoch' to prune as ASHA does.")
    classification = trainer.student_adapter.task == "classification"
    if compute_objective is None:
        compute_objective = accuracy_objective if classification else loss_objective
        direction = direction or ("maximize" if classification else "minimize")
    direction = direction or "minimize"
    if tune_rdm_rates is None:
        tune_rdm_rates = trainer._rdm_factory is not None
    if tune_rdm_rates and trainer._rdm_factory is None:
        raise DistillationInputError("tune_rdm_rates=True trains RDMs per trial: pass rdms=<callable(config) -> "
                                     "list of trained RDMs> to the trainer.")
    if hp_space is None:
        hp_space = default_hp_space(args, tune_rdm_rates=tune_rdm_rates)
    trainer._hp_base_seed = args.seed
    # Trials write their values into args; the search leaves args as it found them (a second search, e.g. a resume in
    # the same process, must centre its ranges and seeds on the same values).
    saved = {k: getattr(args, k) for k in (*method_knobs(args), "learning_rate", "seed", "rdm_rates", "rdm_weights")}
    study_kwargs = {"pruner": pruner or optuna.pruners.SuccessiveHalvingPruner(),
                    "sampler": sampler or optuna.samplers.TPESampler(seed=args.seed), **kwargs}
    url = storage_url(storage)
    if url is not None:
        name = study_name or f"hf_cifd-{args.method}"
        study = optuna.create_study(storage=url, study_name=name, load_if_exists=True, direction=direction)
        done = finished_trials(study)
        if done:
            logger.info("study %r in %s: %d of %d trials done; running the other %d", name, url, done, n_trials,
                        max(n_trials - done, 0))
        n_trials = max(n_trials - done, 0)
        study_kwargs.update(storage=url, study_name=name, load_if_exists=True)
    try:
        return parent_search(hp_space=hp_space, compute_objective=compute_objective, n_trials=n_trials,
                             direction=direction, backend="optuna", hp_name=hp_name, **study_kwargs)
    finally:
        for key, value in saved.items():
            setattr(args, key, value)


def train_validation_split(samples, fraction: float = 0.1, seed: int = 0):
    """A seeded (train, validation) split of the *training* data, for choosing hyperparameters. ``samples``: a list
    of samples or a map-style ``datasets.Dataset``; returns two objects of the same kind."""
    if not 0.0 < fraction < 1.0:
        raise DistillationInputError(f"the validation fraction must be in (0, 1), got {fraction!r}.")
    n = len(samples)
    cut = int(round(fraction * n))
    if cut < 1 or cut >= n:
        raise DistillationInputError(f"a validation fraction of {fraction} of {n} samples leaves an empty split.")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    if hasattr(samples, "select"):
        return samples.select(order[cut:]), samples.select(order[:cut])
    return [samples[i] for i in order[cut:]], [samples[i] for i in order[:cut]]


__all__ = ["RANGES", "METHOD_KNOBS", "default_hp_space", "config_overrides", "method_knobs", "run_search",
           "train_validation_split", "finished_trials", "storage_url"]
