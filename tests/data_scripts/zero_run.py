"""Tiny CIFD runs under DeepSpeed ZeRO, started by
``DS_ACCELERATOR=cpu torchrun --nproc_per_node 2 zero_run.py DS_JSON OUT_DIR`` with DS_JSON a shipped
DeepSpeed config (recipes/configs/deepspeed/zero<S>.json, read unchanged: its "auto" values are filled from the
DistillationConfig).

CPU override: accelerate 1.15 never enables DeepSpeed together with ``use_cpu`` / ACCELERATE_USE_CPU (it would run
plain DDP instead), and without them a GPU-less process sees no backend (one process). So this script configures
the process state itself, as a GPU launcher would: DeepSpeed over gloo on the CPU, then
``accelerator_config={"use_configured_state": True}``.

For a timm classifier pair: 4 steps with a checkpoint at step 2 and the student exported,
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


def run(task, make, outputs_of):
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()  # each Trainer gets its own Accelerator here; the process group stays
    out = os.path.join(OUT, task)
    student, teacher, data, rdms, extra = make()
    trainer = DistillationTrainer(copy.deepcopy(student), copy.deepcopy(teacher), args=_args(out, **extra),
                                  train_dataset=data(), rdms=copy.deepcopy(rdms))
    trainer.train()
    trainer.save_model()
    full = _student_params(trainer)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    reference = outputs_of(trainer)  # the trained student's outputs, for the exported copy to reproduce
    AcceleratorState._reset_state()
    resumed = DistillationTrainer(copy.deepcopy(student), copy.deepcopy(teacher), args=_args(out + "_resumed", **extra),
                                  train_dataset=data(), rdms=copy.deepcopy(rdms))
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


if __name__ == "__main__":
    run("cls", make_cls, cls_outputs)
