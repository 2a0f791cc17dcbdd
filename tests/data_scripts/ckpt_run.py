"""A tiny CIFD run (IBM, one RDM, AdamW, linear schedule, KD dropout: every kind of resumable state) that saves every
2 steps and dumps its final parameters; ``--kill-at-save N`` SIGKILLs itself in the middle of the step-N checkpoint
save (after the weights and optimizer, before the RNG state), ``--resume`` resumes with resume_from_checkpoint=True.

python ckpt_run.py OUT_DIR RESULT.json [--kill-at-save N] [--resume]
"""

import argparse
import json
import logging
import os
import signal
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

torch.set_num_threads(1)

from helpers import TinyNet, toy_dataset  # noqa: E402
from hf_cifd import DistillationConfig, DistillationTrainer, RateDistortionModule  # noqa: E402


def build(out_dir, max_steps=6):
    torch.manual_seed(0)
    teacher, student = TinyNet(embed_dim=12), TinyNet()
    rdm = RateDistortionModule(12, hidden_dims=(8, 4, 8), num_classes=4, rate_weight=1.0)
    args = DistillationConfig(
        output_dir=out_dir, method="cifd", num_rdms=1, rdm_rates=[1.0], kd_dropout=0.5, max_steps=max_steps,
        per_device_train_batch_size=8, learning_rate=0.05, optim="adamw_torch", lr_scheduler_type="linear",
        save_strategy="steps", save_steps=2, logging_steps=1, report_to=[], use_cpu=True, disable_tqdm=True, seed=0)
    return DistillationTrainer(model=student, teacher=teacher, args=args, train_dataset=toy_dataset(64), rdms=[rdm])


def main():
    p = argparse.ArgumentParser()
    p.add_argument("out_dir")
    p.add_argument("result")
    p.add_argument("--kill-at-save", type=int, default=0)
    p.add_argument("--resume", action="store_true")
    a = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    trainer = build(a.out_dir)
    if a.kill_at_save:
        original = type(trainer)._save_rng_state

        def save_rng_state(self, output_dir):
            if self.state.global_step == a.kill_at_save:
                os.kill(os.getpid(), signal.SIGKILL)
            return original(self, output_dir)
        type(trainer)._save_rng_state = save_rng_state
    trainer.train(resume_from_checkpoint=True if a.resume else None)
    params = torch.cat([p.detach().flatten() for p in trainer.model.parameters()])
    with open(a.result, "w") as f:
        json.dump({"params": params.tolist(), "teacher_calls": trainer.teacher_calls,
                   "log": [h for h in trainer.state.log_history if "loss" in h]}, f)


if __name__ == "__main__":
    main()
