"""Issue 10: inputs checked where they enter (every method, student included) and the non-finite loss policy."""

import copy

import datasets
import numpy as np
import pytest
import torch

from hf_cifd import DistillationConfig, DistillationInputError, DistillationTrainer, NonFiniteLossError, RateDistortionModule

from helpers import TinyNet, toy_dataset

METHODS = ["student", "kd", "fitnet", "rkd", "cifd", "ckd"]


def _args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "out"), report_to=[], use_cpu=True, save_strategy="no",
                per_device_train_batch_size=8, learning_rate=0.1, optim="sgd", disable_tqdm=True,
                lr_scheduler_type="constant", max_steps=3, seed=0, logging_steps=1, num_rdms=0)
    base.update(kw)
    return DistillationConfig(**base)


def _trainer(tmp_path, method, ds, **kw):
    teacher = None if method == "student" else TinyNet(embed_dim=12)
    return DistillationTrainer(model=TinyNet(), teacher=teacher, args=_args(tmp_path, method=method, **kw),
                               train_dataset=ds)


def _with(ds, row, **values):
    data = ds.with_format(None).to_dict()
    for k, v in values.items():
        data[k][row] = v
    return datasets.Dataset.from_dict(data, features=ds.features).with_format(
        "torch", columns=["pixel_values", "labels"], output_all_columns=True)


@pytest.mark.parametrize("method", METHODS)
def test_bad_map_style_inputs_fail_before_training_naming_the_sample(tmp_path, method):
    ds = toy_dataset(16)
    nan_pixels = np.zeros((1, 4, 4), np.float32).tolist()
    nan_pixels[0][2][3] = float("nan")
    cases = [(_with(ds, 5, pixel_values=nan_pixels), r"pixel_values has non-finite values .* \['s5'\]"),
             (_with(ds, 7, labels=4), r"label\(s\) \[4\] outside \[0, 4\) for sample\(s\) \['s7'\]"),
             (_with(ds, 2, labels=-100), r"\['s2'\]\. -100 \(PyTorch's ignore_index\) is not supported"),
             (ds.select([]), "the training dataset is empty"),
             (ds.remove_columns("labels"), "no 'labels'/'label' field")]
    for bad, message in cases:
        with pytest.raises(DistillationInputError, match=message):
            _trainer(tmp_path, method, bad)


def _stream(rows):
    def gen():
        yield from rows
    return datasets.IterableDataset.from_generator(gen).with_format("torch")


@pytest.mark.parametrize("method", ["student", "cifd"])
def test_bad_stream_sample_fails_at_its_batch_naming_the_key(tmp_path, method):
    g = np.random.default_rng(0)
    rows = [{"pixel_values": g.normal(size=(1, 4, 4)).astype(np.float32), "labels": int(i % 4), "sample_key": f"k{i}"}
            for i in range(40)]
    rows[27]["pixel_values"][0, 1, 1] = np.inf  # 4th batch of 8
    trainer = _trainer(tmp_path, method, _stream(rows), max_steps=5)
    steps = []
    trainer.add_callback(type("C", (__import__("transformers").TrainerCallback,), {
        "on_step_end": lambda self, args, state, control, **kw: steps.append(state.global_step)})())
    with pytest.raises(DistillationInputError, match=r"pixel_values has non-finite values .* \['k27'\]"):
        trainer.train()
    # the bad 4th batch stops the run before anything trains on it (accelerate fetches one batch ahead)
    assert steps == [1, 2]


def test_empty_stream_is_an_error(tmp_path):
    features = datasets.Features({"pixel_values": datasets.Array3D((1, 4, 4), "float32"),
                                  "labels": datasets.Value("int64"), "sample_key": datasets.Value("string")})
    empty = datasets.IterableDataset.from_generator(lambda: iter(()), features=features).with_format("torch")
    with pytest.raises(DistillationInputError, match="the training stream yielded no sample"):
        _trainer(tmp_path, "student", empty).train()


def test_missing_pixel_values_in_a_stream_is_named(tmp_path):
    rows = [{"image": np.zeros((1, 4, 4), np.float32), "labels": 0, "sample_key": f"k{i}"} for i in range(8)]
    trainer = _trainer(tmp_path, "student", _stream(rows))
    with pytest.raises(DistillationInputError, match=r"no \['pixel_values'\] field"):
        trainer.train()


def _inject_nan(trainer, term, at_step):
    original = trainer.method.loss_terms

    def loss_terms(*a, **kw):
        terms = original(*a, **kw)
        if trainer.state.global_step + 1 == at_step and trainer.model.training:
            terms[term] = terms[term] * float("nan")
        return terms
    trainer.method.loss_terms = loss_terms


def test_nonfinite_term_stop_names_term_and_step(tmp_path):
    trainer = _trainer(tmp_path, "kd", toy_dataset(32))
    _inject_nan(trainer, "kd_teacher", at_step=2)
    with pytest.raises(NonFiniteLossError, match=r"step 2: non-finite loss term\(s\) kd_teacher=nan"):
        trainer.train()
    assert trainer.state.global_step == 1


def test_nonfinite_term_skip_leaves_parameters_unchanged_and_counts_it(tmp_path, caplog):
    trainer = _trainer(tmp_path, "kd", toy_dataset(32), nonfinite_policy="skip", max_steps=3)
    _inject_nan(trainer, "kd_teacher", at_step=2)
    snapshots = {}
    from transformers import TrainerCallback

    class Snap(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kw):
            snapshots[state.global_step] = torch.cat([p.detach().flatten().clone() for p in model.parameters()])

    trainer.add_callback(Snap())
    with caplog.at_level("WARNING", logger="hf_cifd.trainer"):
        trainer.train()
    assert "step 2: non-finite loss term(s) kd_teacher=nan" in caplog.text
    assert torch.equal(snapshots[2], snapshots[1])  # the skipped step moved nothing
    assert not torch.equal(snapshots[3], snapshots[2]) and torch.isfinite(snapshots[3]).all()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["skipped_steps"] for h in logs] == [0, 1, 1]
    assert all(np.isfinite(h["loss/kd_teacher"]) for h in logs if "loss/kd_teacher" in h)
