"""Started by torchrun with 2 processes but WITHOUT ACCELERATE_USE_CPU / use_cpu on a GPU-less host: each process's
accelerator sees one process. train_rdms and DistillationTrainer must both refuse to start (the trainer's error is
left uncaught, so the process exits non-zero)."""

import os
import sys

import torch
from accelerate import Accelerator

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from helpers import TinyNet, toy_dataset  # noqa: E402

from hf_cifd import DistillationConfig, DistillationInputError, DistillationTrainer, train_rdms  # noqa: E402

rank = os.environ["RANK"]
try:
    train_rdms(toy_dataset(8), teacher=TinyNet(), rates=[1.0], hidden_dims=(8, 8, 8), max_steps=1,
               accelerator=Accelerator())
    print(f"rank {rank} train_rdms: started", flush=True)
except DistillationInputError as e:
    print(f"rank {rank} train_rdms: {e}", flush=True)
args = DistillationConfig(output_dir=sys.argv[1], method="kd", use_cpu=False, report_to=[], max_steps=1)
DistillationTrainer(TinyNet(), TinyNet(), args=args, train_dataset=toy_dataset(8))
print(f"rank {rank} trainer: started", flush=True)
