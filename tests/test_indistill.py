"""InDistill warm-up stage (issue 6): channel selection, resizing, curriculum, hooks, trainer integration, errors."""

import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hf_cifd import DistillationConfig, DistillationInputError, DistillationTrainer
from hf_cifd.methods.indistill import (
    CurriculumSchedule,
    InDistillStage,
    LayerPair,
    curriculum_durations,
    filter_l1_norms,
    parse_layer_pairs,
    producing_layer,
    resize_like,
    select_channels,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------------------------------------------ tiny models / data
class TinyCNN(nn.Module):
    """conv1 (w0) -> block1 (conv, stride 2, w1) -> pool -> head; forward returns (embedding, logits)."""

    def __init__(self, w0=8, w1=16, num_classes=4, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv1 = nn.Conv2d(3, w0, 3, padding=1)
        self.act1 = nn.ReLU()
        self.block1 = nn.Sequential(nn.Conv2d(w0, w1, 3, stride=2, padding=1), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(w1, num_classes)
        self.embed_dim = w1

    def forward(self, x):
        e = self.pool(self.block1(self.act1(self.conv1(x)))).flatten(1)
        return e, self.head(e)


class TinyData(torch.utils.data.Dataset):
    def __init__(self, n=8, size=8, num_classes=4):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 3, size, size, generator=g)
        self.y = torch.arange(n) % num_classes

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"pixel_values": self.x[i], "labels": int(self.y[i])}


def _config(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "out"), method="kd", per_device_train_batch_size=4, logging_steps=1,
                save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True, learning_rate=1e-2, seed=0)
    base.update(kw)
    return DistillationConfig(**base)


def _no_hooks(*models):
    return all(not m._forward_hooks for model in models for m in model.modules())


# ------------------------------------------------------------------------------------------------ channel selection
def test_channel_selection_picks_exactly_the_top_k_l1_norm_filters():
    conv = nn.Conv2d(2, 6, kernel_size=1, bias=False)
    with torch.no_grad():
        conv.weight.zero_()
        # filter c has entries (a_c, -b_c): L1 norms by hand: 5, 1, 9, 3, 7, 2
        for c, (a, b) in enumerate([(2, 3), (1, 0), (4, 5), (0, 3), (-3, 4), (1, 1)]):
            conv.weight[c, 0, 0, 0], conv.weight[c, 1, 0, 0] = a, -b
    torch.testing.assert_close(filter_l1_norms(conv), torch.tensor([5.0, 1, 9, 3, 7, 2]))
    assert select_channels(conv, 3).tolist() == [0, 2, 4]  # norms 9, 7, 5, kept in original order
    assert select_channels(conv, 1).tolist() == [2]
    assert select_channels(conv, 6).tolist() == [0, 1, 2, 3, 4, 5]
    linear = nn.Linear(3, 4, bias=False)
    with torch.no_grad():
        linear.weight.copy_(torch.tensor([[1.0, 1, 1], [-5, 0, 0], [0, 0, 0.5], [2, -2, 0]]))  # rows: 3, 5, .5, 4
    assert select_channels(linear, 2).tolist() == [1, 3]
    with pytest.raises(DistillationInputError, match="wider"):
        select_channels(conv, 7)


def test_stage_loss_is_mse_against_selected_and_pooled_teacher_channels():
    teacher, student = TinyCNN(w0=6, w1=16, seed=1), TinyCNN(w0=3, w1=8, seed=2)
    stage = InDistillStage(teacher, student, [LayerPair("conv1", "conv1")], [1.0])
    norms = teacher.conv1.weight.detach().abs().sum(dim=(1, 2, 3))
    expected_idx = sorted(torch.argsort(norms, descending=True)[:3].tolist())
    assert stage.resolved[0].indices.tolist() == expected_idx
    t_map, s_map = torch.randn(2, 6, 8, 8), torch.randn(2, 3, 4, 4)
    ref = t_map[:, expected_idx]
    ref = ref.reshape(2, 3, 4, 2, 4, 2).mean(dim=(3, 5))  # 2x2 average pooling by hand
    loss = stage.feature_loss(0, t_map, s_map)
    torch.testing.assert_close(loss, ((s_map - ref) ** 2).mean())


def test_resize_cnn_bilinear_and_vit_tokens_keep_cls():
    t = torch.randn(2, 3, 6, 6)
    torch.testing.assert_close(resize_like(t, torch.zeros(2, 3, 4, 4)),
                               F.interpolate(t, size=(4, 4), mode="bilinear", align_corners=False))
    tokens = torch.randn(2, 1 + 16, 5)  # CLS + 4x4 patches -> CLS + 2x2
    out = resize_like(tokens, torch.zeros(2, 1 + 4, 5))
    assert out.shape == (2, 5, 5)
    torch.testing.assert_close(out[:, 0], tokens[:, 0])
    grid = tokens[:, 1:].reshape(2, 4, 4, 5)  # row-major patches
    torch.testing.assert_close(out[:, 1], grid[:, :2, :2].mean(dim=(1, 2)))  # bilinear 4->2 = 2x2 mean


def test_producer_of_timm_stage_and_open_clip_block():
    import open_clip
    import timm

    resnet = timm.create_model("resnet10t", pretrained=False, num_classes=4)
    name, layer = producing_layer(resnet.layer2)
    assert name == "0.conv2" and layer is resnet.layer2[0].conv2  # not the downsample shortcut
    clip = open_clip.CLIP(embed_dim=16, vision_cfg=dict(image_size=16, layers=1, width=32, patch_size=8, head_width=16),
                          text_cfg=dict(context_length=4, vocab_size=10, width=16, heads=1, layers=1))
    name, layer = producing_layer(clip.visual.transformer.resblocks[0])
    assert name == "mlp.c_proj"


# ------------------------------------------------------------------------------------------------ curriculum
def test_curriculum_defaults_follow_the_paper_code():
    assert curriculum_durations(3) == [3.0, 4.0, 5.0]  # a + 1 + l, a = 2
    assert curriculum_durations(2, a=0) == [1.0, 2.0]
    assert curriculum_durations(2, durations=[7, 1]) == [7.0, 1.0]
    with pytest.raises(DistillationInputError, match="one per pair"):
        curriculum_durations(3, durations=[1, 2])


def test_schedule_activates_one_pair_at_a_time_in_order_for_its_epochs():
    schedule = CurriculumSchedule(curriculum_durations(3), "epoch")
    active = [schedule.active(e / 2) for e in range(0, 28)]  # epochs 0, 0.5, ..., 13.5
    expected = [0] * 6 + [1] * 8 + [2] * 10 + [None] * 4  # 3, 4, 5 epochs, then the main method from epoch 12
    assert active == expected
    steps = CurriculumSchedule([2, 3], "step")
    assert [steps.position(SimpleNamespace(global_step=s)) for s in range(2)] == [0.0, 1.0]
    assert [steps.active(s) for s in range(7)] == [0, 0, 1, 1, 1, None, None]


def test_stage_hooks_follow_the_fake_trainer_state_and_are_removed():
    teacher, student = TinyCNN(w0=8, w1=16), TinyCNN(w0=8, w1=16, seed=3)
    stage = InDistillStage(teacher, student, parse_layer_pairs(["conv1:conv1", "block1:block1"]),
                           curriculum_durations(2), "epoch")
    seen = []
    for epoch in [0, 1, 2.5, 3, 6.9, 7, 8]:
        index = stage.active(SimpleNamespace(epoch=epoch, global_step=0))
        hooked = [name for name, m in (("conv1", teacher.conv1), ("block1", teacher.block1)) if m._forward_hooks]
        s_hooked = [name for name, m in (("conv1", student.conv1), ("block1", student.block1)) if m._forward_hooks]
        seen.append((index, hooked, s_hooked))
    # durations 3, 4 epochs: pair 0 on [0, 3), pair 1 on [3, 7), the main method from epoch 7
    assert seen == [(0, ["conv1"], ["conv1"])] * 3 + [(1, ["block1"], ["block1"])] * 2 + [(None, [], [])] * 2
    assert [h[2] for h in stage.history] == [0, 1, None]
    assert _no_hooks(teacher, student)


# ------------------------------------------------------------------------------------------------ real Trainer runs
def test_trainer_runs_the_warmup_then_the_main_method_and_removes_hooks(tmp_path):
    teacher, student = TinyCNN(w0=12, w1=16, seed=1), TinyCNN(w0=8, w1=16, seed=2)
    head_before = student.head.weight.detach().clone()
    # a = 0: pair 0 for 1 epoch, pair 1 for 2 epochs, then KD for the 4th epoch; 8 samples / batch 4 = 2 steps/epoch
    args = _config(tmp_path, num_train_epochs=4, indistill_layers=["conv1:conv1", "block1:block1"], indistill_a=0)
    trainer = DistillationTrainer(student, teacher, args=args, train_dataset=TinyData())
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["indistill_pair"] for h in logs] == [0, 0, 1, 1, 1, 1, -1, -1]
    assert all("loss/indistill_mse" in h and "loss/kd_teacher" not in h for h in logs[:6])
    assert all("loss/kd_teacher" in h and "loss/indistill_mse" not in h for h in logs[6:])
    assert [h[2] for h in trainer.indistill.history] == [0, 1, None]
    assert trainer.indistill.resolved[0].indices.numel() == 8  # conv1: 12 teacher channels -> 8 selected
    assert _no_hooks(teacher, student)
    # the warm-up teacher passes are counted as teacher calls (6 steps x 4 samples), then 2 KD steps x 4
    assert trainer.teacher_calls == 32 and logs[-1]["teacher_calls"] == 32
    assert not torch.equal(head_before, student.head.weight)  # the main method trained the head afterwards


def test_step_schedule_in_a_max_steps_run(tmp_path):
    teacher, student = TinyCNN(seed=1), TinyCNN(seed=2)
    args = _config(tmp_path, max_steps=5, indistill_layers=["conv1:conv1", "block1:block1"],
                   indistill_unit="step", indistill_durations=[1, 2])
    trainer = DistillationTrainer(student, teacher, args=args, train_dataset=TinyData())
    trainer.train()
    assert [h["indistill_pair"] for h in trainer.state.log_history if "loss" in h] == [0, 1, 1, -1, -1]
    assert _no_hooks(teacher, student)


def test_hooks_are_removed_when_training_fails(tmp_path):
    teacher, student = TinyCNN(seed=1), TinyCNN(seed=2)
    args = _config(tmp_path, max_steps=2, indistill_layers=["conv1:conv1"], indistill_durations=[5])

    class Boom(torch.utils.data.Dataset):
        def __len__(self):
            return 8

        def __getitem__(self, i):
            if i == 7:
                raise RuntimeError("bad record")
            return TinyData()[i]

    trainer = DistillationTrainer(student, teacher, args=args, train_dataset=Boom())
    with pytest.raises(RuntimeError):
        trainer.train()
    assert _no_hooks(teacher, student)


def test_timm_resnet50_to_mobilenetv1_pair_selects_and_resizes():
    import timm

    teacher = timm.create_model("resnet50", pretrained=False, num_classes=4).eval()
    student = timm.create_model("mobilenetv1_100", pretrained=False, num_classes=4).eval()
    # resnet50.layer1: 256 channels at 1/4 resolution; mobilenetv1 blocks.0: 64 channels at 1/2 resolution
    stage = InDistillStage(teacher, student, [LayerPair("layer1", "blocks.0")], [1.0])
    r = stage.resolved[0]
    assert r.producer is teacher.layer1[2].conv3 and (r.teacher_width, r.student_width) == (256, 64)
    assert r.indices.tolist() == select_channels(teacher.layer1[2].conv3, 64).tolist()
    from hf_cifd.adapters import adapter_for

    stage.teacher_adapter = adapter_for(teacher)
    batch = {"pixel_values": torch.randn(2, 3, 64, 64)}
    feats = {}
    hook = teacher.layer1.register_forward_hook(lambda m, i, o: feats.__setitem__("t", o))
    with torch.no_grad():
        teacher(batch["pixel_values"])
    hook.remove()
    stage.active(SimpleNamespace(epoch=0, global_step=0))
    terms, _ = stage.loss_terms(0, batch, lambda: student(batch["pixel_values"]))
    hook = student.blocks[0].register_forward_hook(lambda m, i, o: feats.__setitem__("s", o))
    with torch.no_grad():
        student(batch["pixel_values"])
    hook.remove()
    ref = F.interpolate(feats["t"][:, r.indices], size=(32, 32), mode="bilinear", align_corners=False)  # 16 -> 32
    torch.testing.assert_close(terms["indistill_mse"].detach(), F.mse_loss(feats["s"], ref))
    stage.close()
    assert _no_hooks(teacher, student)


def test_open_clip_vit_blocks_select_residual_channels_and_resize_tokens():
    import open_clip

    def tower(width, patch, seed):
        torch.manual_seed(seed)
        return open_clip.CLIP(embed_dim=16, vision_cfg=dict(image_size=32, layers=2, width=width, patch_size=patch,
                                                            head_width=16),
                              text_cfg=dict(context_length=4, vocab_size=10, width=16, heads=1, layers=1)).visual

    teacher, student = tower(64, 8, 0), tower(32, 16, 1)  # tokens 1+16 x 64 -> 1+4 x 32
    pair = LayerPair("transformer.resblocks.1", "transformer.resblocks.1")
    stage = InDistillStage(teacher, student, [pair], [1.0])
    c_proj = teacher.transformer.resblocks[1].mlp.c_proj
    idx = sorted(torch.topk(c_proj.weight.abs().sum(1), 32).indices.tolist())
    assert stage.resolved[0].indices.tolist() == idx
    x = torch.randn(2, 3, 32, 32)
    feats = {}
    h1 = teacher.transformer.resblocks[1].register_forward_hook(lambda m, i, o: feats.__setitem__("t", o))
    h2 = student.transformer.resblocks[1].register_forward_hook(lambda m, i, o: feats.__setitem__("s", o))
    with torch.no_grad():
        teacher(x), student(x)
    h1.remove(), h2.remove()
    t, s = feats["t"], feats["s"]
    assert t.shape == (2, 17, 64) and s.shape == (2, 5, 32)
    sel = t[..., idx]
    grid = F.interpolate(sel[:, 1:].transpose(1, 2).reshape(2, 32, 4, 4), size=(2, 2), mode="bilinear",
                         align_corners=False)
    ref = torch.cat([sel[:, :1], grid.flatten(2).transpose(1, 2)], dim=1)
    torch.testing.assert_close(stage.feature_loss(0, t, s), F.mse_loss(s, ref))


def test_auxiliary_teacher_is_the_warmup_teacher_and_eval_during_warmup_works(tmp_path):
    from hf_cifd.assistants import train_auxiliary_teacher

    teacher, aux, student = TinyCNN(w0=12, seed=1), TinyCNN(w0=10, seed=5), TinyCNN(w0=8, seed=2)
    aux_before = aux.conv1.weight.detach().clone()
    trained = train_auxiliary_teacher(aux, teacher, _config(tmp_path / "aux", max_steps=2), TinyData())
    assert trained is aux and not torch.equal(aux_before, aux.conv1.weight)  # distilled from the teacher first
    args = _config(tmp_path, num_train_epochs=2, indistill_layers=["conv1:conv1"], indistill_a=0)
    trainer = DistillationTrainer(student, teacher, args=args, train_dataset=TinyData(), indistill_teacher=aux)
    assert trainer.indistill.resolved[0].indices.tolist() == select_channels(aux.conv1, 8).tolist()
    assert trainer.indistill.active(trainer.state) == 0  # hooks armed on the aux teacher and the student
    assert "eval_loss" in trainer.evaluate(TinyData(4))  # evaluation (main method) is unaffected by the hooks
    calls_after_eval = trainer.teacher_calls
    trainer.train()
    # warm-up epoch (2 steps) reads the auxiliary teacher; only the 2 KD steps x 4 samples run the main teacher
    assert trainer.teacher_calls - calls_after_eval == 8
    assert _no_hooks(teacher, aux, student)


def test_sequential_activation_uses_the_preceding_conv_as_producer():
    from hf_cifd.demo import student_model, teacher_model
    from hf_cifd.methods.indistill import demo_indistill_layers

    teacher, student = teacher_model(), student_model()
    stage = InDistillStage(teacher, student, parse_layer_pairs(demo_indistill_layers("digits")), [3.0])
    r = stage.resolved[0]  # features.1 is the ReLU after features.0 = Conv2d(1, 32)
    k = student.features[0].out_channels  # the demo student's first conv width
    assert r.producer is teacher.features[0] and (r.teacher_width, r.student_width) == (32, k)
    assert r.indices.tolist() == select_channels(teacher.features[0], k).tolist()


# ------------------------------------------------------------------------------------------------ bad input
def test_missing_module_path_lists_close_matches_before_training(tmp_path):
    args = _config(tmp_path, max_steps=1, indistill_layers=["conv1:blok1"])
    with pytest.raises(DistillationInputError, match=r"student.*no module 'blok1'.*block1"):
        DistillationTrainer(TinyCNN(), TinyCNN(), args=args, train_dataset=TinyData())
    args = _config(tmp_path, max_steps=1, indistill_layers=["con1:conv1"])
    with pytest.raises(DistillationInputError, match=r"teacher.*no module 'con1'.*conv1"):
        DistillationTrainer(TinyCNN(), TinyCNN(), args=args, train_dataset=TinyData())


def test_student_wider_than_teacher_is_an_error_before_training(tmp_path):
    args = _config(tmp_path, max_steps=1, indistill_layers=["conv1:conv1"])
    with pytest.raises(DistillationInputError, match="student layer has 16 channels, more than the teacher layer's 8"):
        DistillationTrainer(TinyCNN(w0=16), TinyCNN(w0=8), args=args, train_dataset=TinyData())


def test_config_errors():
    with pytest.raises(DistillationInputError, match="teacher.module.path:student.module.path"):
        DistillationConfig(output_dir="/tmp/x", method="kd", indistill_layers=["layer1"])
    with pytest.raises(DistillationInputError, match="not both"):
        DistillationConfig(output_dir="/tmp/x", method="kd", indistill_layers=["a:b"], teacher_call_budget=4)
    with pytest.raises(DistillationInputError, match="indistill_unit"):
        DistillationConfig(output_dir="/tmp/x", method="kd", indistill_layers=["a:b"], indistill_unit="batch")


# ------------------------------------------------------------------------------------------------ accelerate smoke
@pytest.mark.slow
def test_indistill_smoke_runs_under_accelerate_two_processes(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    # `accelerate launch --cpu` starts ONE process whatever --num_processes says; --multi_gpu runs torchrun with 2
    # processes, and the recipe's use_cpu=True makes them gloo CPU processes.
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--multi_gpu",
           os.path.join(ROOT, "recipes", "indistill_smoke.py"), "--smoke", "--output_dir", str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    import json

    with open(tmp_path / "smoke_results.json") as f:
        results = json.load(f)
    assert results["num_processes"] == 2
    assert results["cnn"]["pairs"] == [0, 1, -1] and results["cnn"]["hooks_removed"]
    assert results["vit"]["pairs"] == [0, 1, -1] and results["vit"]["hooks_removed"]
    assert results["ckd_budget"]["teacher_calls"] == results["ckd_budget"]["budget"]
