"""Tiny CIFD runs under DeepSpeed ZeRO, started by
``DS_ACCELERATOR=cpu torchrun --nproc_per_node 2 zero_run.py DS_JSON OUT_DIR [clip]`` with DS_JSON a shipped
DeepSpeed config (recipes/configs/deepspeed/zero<S>.json, read unchanged: its "auto" values are filled from the
DistillationConfig).

CPU override: accelerate 1.15 never enables DeepSpeed together with ``use_cpu`` / ACCELERATE_USE_CPU (it would run
plain DDP instead), and without them a GPU-less process sees no backend (one process). So this script configures
the process state itself, as a GPU launcher would: DeepSpeed over gloo on the CPU, then
``accelerator_config={"use_configured_state": True}``.

For a timm classifier pair (or, with ``clip``, a tiny open_clip pair on generated shapes shards): 4 steps with a checkpoint at step 2 and the student exported,
then a second trainer resumed from that checkpoint to step 4. Rank 0 writes OUT_DIR/<task>/result.json: logged
losses, the trained student's outputs on fixed inputs (gathered under ZeRO-3), the resumed student's parameters'
distance to the uninterrupted ones."""

import copy
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from helpers import toy_dataset  # noqa: E402

from hf_cifd import DistillationConfig, DistillationTrainer, RateDistortionModule  # noqa: E402

DS_JSON, OUT = sys.argv[1], sys.argv[2]
torch.set_num_threads(1)
os.environ.update(ACCELERATE_USE_DEEPSPEED="true", ACCELERATE_TORCH_DEVICE="cpu")
from accelerate import PartialState  # noqa: E402

PartialState(backend="gloo")


def _args(out, **kw):
    base = dict(output_dir=out, report_to=[], per_device_train_batch_size=4, max_steps=4, logging_steps=1,
                save_steps=2, save_strategy="steps", learning_rate=5e-3, lr_scheduler_type="constant", seed=0,
                disable_tqdm=True, num_rdms=1, rdm_rates=[1.0], kd_dropout=0.0, deepspeed=DS_JSON,
                accelerator_config={"use_configured_state": True, "dispatch_batches": False})
    base.update(kw)
    return DistillationConfig(**base)


def _student_params(trainer):
    student = trainer.accelerator.unwrap_model(trainer.model_wrapped).student
    params = list(student.parameters())
    if trainer.accelerator.state.deepspeed_plugin.zero_stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(params):
            return torch.cat([p.detach().float().flatten().clone() for p in params])
    return torch.cat([p.detach().float().flatten().clone() for p in params])


def run(task, make, outputs_of, **trainer_kw):
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()  # each Trainer gets its own Accelerator here; the process group stays
    out = os.path.join(OUT, task)
    student, teacher, data, rdms, extra = make()
    trainer = DistillationTrainer(copy.deepcopy(student), copy.deepcopy(teacher), args=_args(out, **extra),
                                  train_dataset=data(), rdms=copy.deepcopy(rdms), **trainer_kw)
    trainer.train()
    trainer.save_model()
    full = _student_params(trainer)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    reference = outputs_of(trainer)  # the trained student's outputs, for the exported copy to reproduce
    AcceleratorState._reset_state()
    resumed = DistillationTrainer(copy.deepcopy(student), copy.deepcopy(teacher), args=_args(out + "_resumed", **extra),
                                  train_dataset=data(), rdms=copy.deepcopy(rdms), **trainer_kw)
    resumed.train(resume_from_checkpoint=os.path.join(out, "checkpoint-2"))
    again = _student_params(resumed)
    if trainer.accelerator.is_main_process:
        with open(os.path.join(out, "result.json"), "w") as f:
            json.dump({"losses": losses, "outputs": reference, "num_processes": trainer.accelerator.num_processes,
                       "resume_max_abs_diff": (again - full).abs().max().item(), "param_count": full.numel(),
                       "zero_stage": trainer.accelerator.state.deepspeed_plugin.zero_stage,
                       "resumed_steps": resumed.state.global_step}, f)


def _gathered_forward(trainer, fn):
    student = trainer.accelerator.unwrap_model(trainer.model_wrapped).student
    was = student.training
    student.eval()
    params = list(student.parameters())
    if trainer.accelerator.state.deepspeed_plugin.zero_stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(params), torch.no_grad():
            result = fn(student)
    else:
        with torch.no_grad():
            result = fn(student)
    student.train(was)
    return result


# ---------------------------------------------------------------------------------------- timm classification
def make_cls():
    import timm

    torch.manual_seed(0)
    teacher = timm.create_model("resnet10t", num_classes=4)
    student = timm.create_model("resnet10t", num_classes=4)
    rdms = [RateDistortionModule(teacher.num_features, hidden_dims=(16, 8, 16), num_classes=4, rate_weight=1.0)]
    return student, teacher, lambda: toy_dataset(16, shape=(3, 32, 32)), rdms, {}


def cls_outputs(trainer):
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    return _gathered_forward(trainer, lambda s: s(x.to(next(s.parameters()).dtype)).float().tolist())


# ---------------------------------------------------------------------------------------------- open_clip CLIP
CLIP_TEXTS = ["a red circle", "a small blue square"]


def make_clip():
    from hf_cifd.adapters.open_clip import create_openclip
    from hf_cifd.data import shapes
    from hf_cifd.data.loading import load_image_dataset

    from test_clip_adapter import S_PP, STUDENT, T_PP, TEACHER

    torch.manual_seed(0)
    teacher, _, t_pre, t_tok = create_openclip(TEACHER, preprocess_cfg=T_PP)
    student, _, s_pre, s_tok = create_openclip(STUDENT, preprocess_cfg=S_PP)
    rank = int(os.environ.get("RANK", 0))
    shards = shapes.write_webdataset(os.path.join(OUT, f"shapes-{rank}"), 32, seed=0, shard_size=16)

    def data():
        return load_image_dataset("webdataset", task="image-text", data_files={"train": shards}, streaming=True,
                                  transform=s_pre, tokenizer=s_tok, teacher_transform=t_pre, teacher_tokenizer=t_tok)

    rdms = {m: [RateDistortionModule(24, hidden_dims=(16, 16, 16), rate_weight=10.0)] for m in ("image", "text")}
    return student, teacher, data, rdms, {"learning_rate": 1e-3, "rdm_rates": [10.0]}


def clip_outputs(trainer):
    x = torch.randn(2, 3, 24, 24, generator=torch.Generator().manual_seed(1))

    def fn(s):
        ids = s.hf_cifd_tokenizer(CLIP_TEXTS)
        return {"image": s.encode_image(x, normalize=False).float().tolist(),
                "text": s.encode_text(ids, normalize=False).float().tolist(),
                "logit_scale": s.logit_scale.exp().float().flatten().tolist()}

    return _gathered_forward(trainer, fn)


if __name__ == "__main__":
    if sys.argv[3:] == ["clip"]:
        from hf_cifd.data.collate import collate

        run("clip", make_clip, clip_outputs, data_collator=collate)
    else:
        run("cls", make_cls, cls_outputs)
