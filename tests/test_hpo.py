"""DistillationTrainer.hyperparameter_search (Optuna): fresh container per trial, objective reported, resumable study."""

import pytest
import torch
from transformers import TrainerCallback

from hf_cifd import DistillationConfig, DistillationInputError, DistillationTrainer, RateDistortionModule
from hf_cifd.hpo import config_overrides, default_hp_space, train_validation_split

from helpers import TinyNet, toy_dataset

optuna = pytest.importorskip("optuna")


class InitialWeights(TrainerCallback):
    """Records, at the start of each trial's training, the container's initial parameters and the args it sees."""

    def __init__(self):
        self.runs = []

    def on_train_begin(self, args, state, control, model=None, **kw):
        self.runs.append({"model": model, "seed": args.seed, "lr": args.learning_rate,
                          "params": {k: v.detach().clone() for k, v in model.named_parameters()}})


def _args(tmp_path, method, **kw):
    return DistillationConfig(output_dir=str(tmp_path / "out"), method=method, report_to=[], use_cpu=True,
                              save_strategy="no", eval_strategy="epoch", per_device_train_batch_size=8,
                              learning_rate=0.05, optim="sgd", disable_tqdm=True, num_train_epochs=2, seed=7, **kw)


@pytest.mark.parametrize("method", ["kd", "cifd"])
def test_each_trial_trains_a_fresh_container_and_reports_its_objective(tmp_path, method):
    train, val = train_validation_split(toy_dataset(48), fraction=0.25, seed=0)
    assert len(train) == 36 and len(val) == 12
    torch.manual_seed(0)
    teacher = TinyNet(embed_dim=12)
    made = []

    def rdms(config):  # a callable: the trainer calls it per distinct set of rates (here: untrained RDMs)
        made.append(list(config.rdm_rates))
        return [RateDistortionModule(12, hidden_dims=(8, 4, 8), num_classes=4, rate_weight=r) for r in config.rdm_rates]

    extra = {"num_rdms": 2, "rdm_rates": [2.0, 0.5]} if method == "cifd" else {}
    record = InitialWeights()
    trainer = DistillationTrainer(model_init=lambda trial: TinyNet(), teacher=teacher, args=_args(tmp_path, method, **extra),
                                  train_dataset=train, eval_dataset=val, callbacks=[record],
                                  rdms=rdms if method == "cifd" else None)
    storage = tmp_path / "study.db"
    best = trainer.hyperparameter_search(n_trials=2, storage=str(storage))

    assert len(record.runs) == 2
    first, second = record.runs
    assert first["model"] is not second["model"]  # a new container, not the same one trained twice
    assert (first["seed"], second["seed"]) == (7, 8)  # seed + trial number
    # Every module of the container (student; for cifd also the IBM) starts from the weights its seed gives.
    names = set(first["params"])
    assert any(n.startswith("student.") for n in names)
    if method == "cifd":
        assert any(n.startswith("ibms.") for n in names)
    for run in record.runs:
        torch.manual_seed(run["seed"])
        reference = TinyNet()
        for k, v in reference.named_parameters():
            torch.testing.assert_close(run["params"][f"student.{k}"], v)
    random_init = [n for n in names if n.endswith(".weight")]  # linear layers (the density model starts constant)
    assert any(n.startswith("ibms.") for n in random_init) == (method == "cifd")
    for n in random_init:
        assert not torch.equal(first["params"][n], second["params"][n]), n

    study = optuna.load_study(study_name=f"hf_cifd-{method}", storage=f"sqlite:///{storage}")
    trials = study.get_trials()
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE] * 2
    for t, run in zip(trials, record.runs):
        assert run["lr"] == pytest.approx(t.params["learning_rate"])  # the trial's values reached the config
        assert 0.0 <= t.value <= 100.0 and t.intermediate_values  # accuracy on the validation split, per epoch
        assert t.value == pytest.approx(t.intermediate_values[max(t.intermediate_values)])
    assert float(best.objective) == max(t.value for t in trials)
    assert set(best.hyperparameters) >= {"learning_rate", "temperature", "lambda_kl"}
    if method == "cifd":
        assert {"lambda_ibm", "kd_dropout", "embedding_weight", "rdm_rate_0", "rdm_rate_1"} <= set(best.hyperparameters)
        assert made[0] == [2.0, 0.5] and len(made) == 3  # the initial rates, then one RDM set per trial
        assert config_overrides(best.hyperparameters)["rdm_rates"] == [best.hyperparameters["rdm_rate_0"],
                                                                      best.hyperparameters["rdm_rate_1"]]

    # Resume: the study already holds 2 finished trials, so n_trials=3 runs exactly one more.
    trainer.hyperparameter_search(n_trials=3, storage=str(storage))
    assert len(record.runs) == 3 and record.runs[-1]["seed"] == 9
    assert len(optuna.load_study(study_name=f"hf_cifd-{method}", storage=f"sqlite:///{storage}").trials) == 3


def test_search_needs_model_init_and_a_validation_split(tmp_path):
    ds = toy_dataset(16)
    trainer = DistillationTrainer(model=TinyNet(), teacher=TinyNet(embed_dim=12), args=_args(tmp_path, "kd"),
                                  train_dataset=ds, eval_dataset=ds)
    with pytest.raises(DistillationInputError, match="model_init"):
        trainer.hyperparameter_search(n_trials=1)
    trainer = DistillationTrainer(model_init=TinyNet, teacher=TinyNet(embed_dim=12), train_dataset=ds,
                                  args=_args(tmp_path, "kd").set_evaluate(strategy="no"))
    with pytest.raises(DistillationInputError, match="validation split"):
        trainer.hyperparameter_search(n_trials=1)
    with pytest.raises(DistillationInputError, match="exactly one"):
        DistillationTrainer(model=TinyNet(), model_init=TinyNet, args=_args(tmp_path, "student"), train_dataset=ds)


def test_default_space_lists_each_methods_knobs_and_keeps_its_ranges_fixed(tmp_path):
    config = _args(tmp_path, "cifd", num_rdms=2, rdm_rates=[10.0, 1.0], use_ibm=False)
    space = default_hp_space(config, tune_rdm_rates=True)
    trial = optuna.trial.FixedTrial({"learning_rate": 0.5, "temperature": 3.0, "lambda_ce": 1.0, "lambda_kl": 2.0,
                                     "kd_dropout": 0.1, "embedding_weight": 5.0, "rdm_weight_0": 1.0,
                                     "rdm_weight_1": 0.5, "rdm_rate_0": 50.0, "rdm_rate_1": 0.2})
    params = space(trial)
    assert "lambda_ibm" not in params  # no IBM, no lambda_I
    assert params["rdm_rates"] == [50.0, 0.2] and params["rdm_weights"] == [1.0, 0.5]
    config.learning_rate = 0.5  # a trial changed the config: the space's lr range must not move with it
    study = optuna.create_study()
    space(study.ask())
    dist = study.trials[0].distributions
    assert (dist["learning_rate"].low, dist["learning_rate"].high) == pytest.approx((0.005, 0.5))
    assert (dist["rdm_rate_0"].low, dist["rdm_rate_0"].high) == pytest.approx((1.0, 100.0))
    student_space = default_hp_space(_args(tmp_path, "student"))
    assert set(student_space(optuna.create_study().ask())) == {"learning_rate"}

