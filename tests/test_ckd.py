"""Comparative KD (issue 6): the loss terms, the add-on, the pair pool / sampler, and the teacher-call budget."""

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hf_cifd import DistillationConfig, DistillationInputError, DistillationTrainer
from hf_cifd.adapters import Encoded
from hf_cifd.methods import StudentOutput, build_method
from hf_cifd.methods.ckd import PAIR_KEY, PairPoolSampler, WithComparativeKD, batch_pairs, build_pair_pool, with_ckd_addon


class Tiny(nn.Module):
    """Linear embedding + head; ``seen`` counts the samples it was run on (for teacher-call checks)."""

    def __init__(self, dim=6, num_classes=3, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.body = nn.Linear(12, dim)
        self.head = nn.Linear(dim, num_classes)
        self.embed_dim = dim
        self.seen = 0

    def forward(self, x):
        self.seen += x.shape[0]
        e = torch.tanh(self.body(x.flatten(1)))
        return e, self.head(e)


class AugData(torch.utils.data.Dataset):
    """Every read is a fresh augmentation (noise); ``reads`` records which indices were read."""

    def __init__(self, n=20, num_classes=3):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 12, generator=g)
        self.y = torch.arange(n) % num_classes
        self.reads = []

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        self.reads.append(int(i))
        return {"pixel_values": self.x[i] + 0.1 * torch.randn(12), "labels": int(self.y[i]), "sample_key": f"s{i}"}


def _config(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "out"), method="ckd", per_device_train_batch_size=4, logging_steps=1,
                save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True, learning_rate=1e-2, seed=0)
    base.update(kw)
    return DistillationConfig(**base)


def _ref_mse_of_differences(s, t, pairs):
    total = 0.0
    for i, j in pairs:
        total += ((s[i] - s[j]) - (t[i] - t[j])).pow(2).sum()
    return total / (len(pairs) * s.shape[1])


# ------------------------------------------------------------------------------------------------ loss terms
def test_ckd_method_terms_match_hand_computed_values(tmp_path):
    cfg = _config(tmp_path, ckd_weight=0.5, ckd_embedding_weight=2.0)
    method = build_method(cfg, "classification")
    assert method.matches_embeddings  # the embedding term needs the projector to the teacher width
    torch.manual_seed(0)
    s_logits, t_logits = torch.randn(4, 3), torch.randn(4, 3)
    s_emb, t_emb = torch.randn(4, 5), torch.randn(4, 5)
    labels = torch.tensor([0, 2, 1, 2])
    student = StudentOutput(encoded=Encoded(embeddings={"image": torch.randn(4, 2)}, logits=s_logits),
                            matched={"image": s_emb})
    teacher = Encoded(embeddings={"image": t_emb}, logits=t_logits)
    terms = method.loss_terms(student, teacher, {}, {"labels": labels}, None)
    pairs = [(i, j) for i in range(4) for j in range(i + 1, 4)]
    onehot = F.one_hot(labels, 3).float()
    assert terms["ce"].item() == 0.0  # CKD's default lambda_ce = 0: its objective has no per-sample CE
    torch.testing.assert_close(terms["ckd_teacher"], 0.5 * _ref_mse_of_differences(s_logits, t_logits, pairs))
    torch.testing.assert_close(terms["ckd_label"], 0.5 * _ref_mse_of_differences(s_logits, onehot, pairs))
    torch.testing.assert_close(terms["ckd_embedding"], 0.5 * 2.0 * _ref_mse_of_differences(s_emb, t_emb, pairs))
    # budget batches: only the pool pairs the batch was built from (rows sharing a ckd_pair id)
    terms = method.loss_terms(student, teacher, {}, {"labels": labels, PAIR_KEY: torch.tensor([7, 3, 7, 3])}, None)
    torch.testing.assert_close(terms["ckd_teacher"], 0.5 * _ref_mse_of_differences(s_logits, t_logits, [(1, 3), (0, 2)]))


def test_batch_pairs_groups_rows_by_pair_id():
    assert batch_pairs({PAIR_KEY: torch.tensor([7, 3, 7, 3, 9, 9])}, 6).tolist() == [[1, 3], [0, 2], [4, 5]]
    assert batch_pairs({}, 3).tolist() == [[0, 1], [0, 2], [1, 2]]


def test_ckd_addon_wraps_other_methods(tmp_path):
    cfg = _config(tmp_path, method="kd", ckd_addon=True, ckd_weight=2.0)
    method = with_ckd_addon(build_method(cfg, "classification"), cfg)
    assert isinstance(method, WithComparativeKD) and method.name == "kd" and not method.matches_embeddings
    s_logits, t_logits, labels = torch.randn(3, 3), torch.randn(3, 3), torch.tensor([0, 1, 2])
    student = StudentOutput(encoded=Encoded(embeddings={"image": torch.randn(3, 2)}, logits=s_logits))
    terms = method.loss_terms(student, Encoded(embeddings={"image": torch.randn(3, 2)}, logits=t_logits), {},
                              {"labels": labels}, None)
    assert sorted(terms) == ["ce", "ckd_label", "ckd_teacher", "kd_teacher"]
    pairs = [(0, 1), (0, 2), (1, 2)]
    torch.testing.assert_close(terms["ckd_teacher"], 2.0 * _ref_mse_of_differences(s_logits, t_logits, pairs))
    plain = _config(tmp_path, method="kd")
    assert with_ckd_addon(build_method(plain, "classification"), plain).__class__.__name__ == "KD"
    with pytest.raises(DistillationInputError, match="no teacher"):
        _config(tmp_path, method="student", ckd_addon=True)


# ------------------------------------------------------------------------------------------------ pool and sampler
def test_pool_holds_all_pairs_of_a_small_subset_and_a_seeded_sample_of_a_large_one():
    assert build_pair_pool(5).tolist() == [[0, 1], [0, 2], [0, 3], [0, 4], [1, 2], [1, 3], [1, 4], [2, 3], [2, 4], [3, 4]]
    pool = build_pair_pool(1000, pool_size=500, seed=3)
    assert pool.shape == (500, 2) and (pool[:, 0] < pool[:, 1]).all() and pool.max() < 1000
    assert len({tuple(p) for p in pool.tolist()}) == 500
    assert torch.equal(pool, build_pair_pool(1000, pool_size=500, seed=3))
    assert not torch.equal(pool, build_pair_pool(1000, pool_size=500, seed=4))


def test_sampler_draws_cross_batch_pairs_and_keeps_each_pair_in_one_batch():
    n, batch = 8, 4
    sampler = PairPoolSampler(build_pair_pool(n), pairs_per_step=batch // 2, seed=0)
    assert len(sampler) == 2 * 28  # all 28 pairs of 8 samples: 28 is a multiple of 2 pairs per step
    items = list(sampler)
    batches = [items[k:k + batch] for k in range(0, len(items), batch)]
    seen = set()
    for b in batches:
        ids = [pid for _, pid in b]
        assert ids[0] == ids[1] and ids[2] == ids[3] and ids[0] != ids[2]  # whole pairs only
        seen |= {tuple(sorted((b[0][0], b[1][0]))), tuple(sorted((b[2][0], b[3][0])))}
    # One epoch visits every pair of the subset. In-batch pairing of a shuffled epoch (2 batches of 4 out of 8
    # samples) can only ever form 2 * 6 = 12 of the 28 pairs: 16 pairs here join samples from different batches.
    assert len(seen) == 28
    # two processes (accelerate shards whole batches): every pair still lands in one process's batch
    from accelerate.data_loader import BatchSamplerShard
    from torch.utils.data import BatchSampler

    sampler = PairPoolSampler(build_pair_pool(n), pairs_per_step=batch * 2 // 2, seed=0)
    for rank in range(2):
        shard = BatchSamplerShard(BatchSampler(sampler, batch, drop_last=False), num_processes=2, process_index=rank)
        for b in shard:
            ids = [pid for _, pid in b]
            assert len(b) == batch and ids[0] == ids[1] and ids[2] == ids[3]
    sampler.set_epoch(1)
    assert [pid for _, pid in sampler][0] == 28  # pair ids continue across epochs (unique within a batch)


# ------------------------------------------------------------------------------------------------ budget mode
def test_budget_run_calls_the_teacher_exactly_n_times(tmp_path):
    data, teacher, student = AugData(20), Tiny(seed=1), Tiny(seed=2)
    args = _config(tmp_path, teacher_call_budget=6, num_train_epochs=2, per_device_eval_batch_size=4)
    trainer = DistillationTrainer(student, teacher, args=args, train_dataset=data, eval_dataset=AugData(8))
    subset = set(trainer.ckd_budget.indices)
    assert len(subset) == 6 and teacher.seen == 6 and trainer.teacher_calls == 6
    data.reads.clear()
    trainer.train()
    trainer.evaluate()  # evaluation never runs the teacher in budget mode
    assert teacher.seen == 6 and trainer.teacher_calls == 6
    logged = [h["teacher_calls"] for h in trainer.state.log_history if "teacher_calls" in h]
    assert logged and all(c == 6 for c in logged)
    assert set(data.reads) == subset  # training only reads the budget samples (each read: a fresh augmentation)
    # 15 pairs of 6 samples, 2 pairs per step of 4 -> 14 pairs = 7 steps per epoch
    assert trainer.state.global_step == 14
    assert "loss/ckd_teacher" in trainer.state.log_history[0]


def test_budget_mode_works_with_kd_plus_ckd_addon_and_a_repeated_small_pool(tmp_path):
    data, teacher = AugData(10), Tiny(seed=1)
    # 3 samples = 3 pairs; batch 8 needs 4 pairs per step: the pool is repeated to fill one step
    args = _config(tmp_path, method="kd", ckd_addon=True, teacher_call_budget=3, max_steps=2,
                   per_device_train_batch_size=8)
    trainer = DistillationTrainer(Tiny(seed=2), teacher, args=args, train_dataset=data)
    trainer.train()
    assert teacher.seen == 3 and trainer.teacher_calls == 3
    assert {"loss/kd_teacher", "loss/ckd_teacher", "loss/ckd_label"} <= set(trainer.state.log_history[0])


def test_budget_errors_before_training(tmp_path):
    with pytest.raises(DistillationInputError, match="larger than the training dataset"):
        DistillationTrainer(Tiny(), Tiny(), args=_config(tmp_path, teacher_call_budget=21), train_dataset=AugData(20))
    with pytest.raises(DistillationInputError, match="must be even"):
        DistillationTrainer(Tiny(), Tiny(), args=_config(tmp_path, teacher_call_budget=4, per_device_train_batch_size=3),
                            train_dataset=AugData(20))
    with pytest.raises(DistillationInputError, match="no teacher"):
        _config(tmp_path, method="student", teacher_call_budget=4)
