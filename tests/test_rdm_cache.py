"""Frozen RDMs' outputs computed once from the teacher cache (data/rdm_cache.py) give the same values and the same
training losses as running the RDMs at every step."""

import copy

import pytest
import torch

from hf_cifd import DistillationConfig, DistillationTrainer, RateDistortionModule
from hf_cifd.data import TeacherCache, cache_teacher_outputs
from hf_cifd.data.rdm_cache import compute_rdm_outputs, rdm_field

from helpers import TinyNet, toy_dataset


def _rdms(reconstruction="linear"):
    torch.manual_seed(1)
    rates = (2.0, 0.5) if reconstruction != "none" else (0.0, 0.0)  # no X^: eq. (5) without its distortion
    return [RateDistortionModule(12, hidden_dims=(8, 4, 8), num_classes=4, rate_weight=r,
                                 reconstruction=reconstruction).eval() for r in rates]


def test_cached_rdm_outputs_equal_each_rdm_on_the_cached_embedding(tmp_path):
    ds = toy_dataset(20)
    cache_teacher_outputs(TinyNet(embed_dim=12), ds, str(tmp_path / "cache"), dtype="float16", shard_size=8,
                          progress=False)
    cache = TeacherCache(str(tmp_path / "cache"))
    rdms = _rdms()
    keys = ["s7", "s0", "s19", "s8"]  # across the 3 shards, out of order
    x = cache.get(keys)["teacher_image_embedding"]
    for chunk in (3, 1024):  # chunking of the one-off pass does not matter
        (tmp_path / str(chunk)).mkdir()
        table = compute_rdm_outputs({"image": rdms}, cache, str(tmp_path / str(chunk)), batch_size=chunk)
        got = table.get(keys)
        assert sorted(got) == sorted(rdm_field("image", i, k) for i in (0, 1) for k in ("embedding", "logits"))
        with torch.no_grad():
            for i, rdm in enumerate(rdms):
                out = rdm(x, with_rate=False)
                torch.testing.assert_close(got[rdm_field("image", i, "embedding")], out.embedding, rtol=1e-6, atol=1e-6)
                torch.testing.assert_close(got[rdm_field("image", i, "logits")], out.logits, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("reconstruction", ["linear", "none"])  # "none": the RDMs give logits only
def test_training_with_cached_rdm_outputs_gives_the_live_losses_without_running_the_rdms(tmp_path, reconstruction):
    ds = toy_dataset(32)
    torch.manual_seed(0)
    teacher, student = TinyNet(embed_dim=12), TinyNet()
    cache_teacher_outputs(teacher, ds, str(tmp_path / "cache"), dtype="float32", progress=False)
    rdms = _rdms(reconstruction)
    runs = []
    # live teacher and RDMs / cache + RDMs every step / cache + RDM outputs cached (KD dropout and IBM noise on)
    for name, cache, rdm_cache in (("live", None, False), ("cache", "cache", False), ("rdm_cache", "cache", True)):
        args = DistillationConfig(
            output_dir=str(tmp_path / name), report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True,
            per_device_train_batch_size=8, learning_rate=0.05, max_steps=4, logging_steps=1, seed=0, method="cifd",
            num_rdms=2, rdm_rates=[2.0, 0.5], rdm_output_cache=rdm_cache)
        trainer = DistillationTrainer(model=copy.deepcopy(student), teacher=None if cache else copy.deepcopy(teacher),
                                      args=args, train_dataset=ds, eval_dataset=ds, rdms=copy.deepcopy(rdms),
                                      teacher_cache=str(tmp_path / cache) if cache else None)
        calls = []
        for rdm in trainer.rdms["image"]:
            rdm.register_forward_pre_hook(lambda *_: calls.append(1))
        trainer.train()
        logs = [{k: v for k, v in h.items() if k == "loss" or k.startswith("loss/")}
                for h in trainer.state.log_history if "loss" in h]
        runs.append((logs, trainer.evaluate()["eval_loss"], len(calls)))
    (live, live_eval, live_calls), (cached, cached_eval, cached_calls), (rdm, rdm_eval, rdm_calls) = runs
    assert len(live) == 4 and "loss/kd_rdm_1" in live[0] and ("loss/emb_rdm_0" in live[0]) == (reconstruction != "none")
    for other in (cached, rdm):
        for a, b in zip(live, other):
            assert a.keys() == b.keys()
            for k in a:
                assert b[k] == pytest.approx(a[k], rel=1e-6, abs=1e-7), k
    assert rdm_eval == pytest.approx(live_eval, rel=1e-6) and cached_eval == pytest.approx(live_eval, rel=1e-6)
    # 4 training steps + 4 eval batches, 2 RDMs each, when they run per step; never with their outputs cached.
    assert live_calls == cached_calls == 16 and rdm_calls == 0
