"""train_rdms with every process of torchrun: held-out metrics must cover the whole held-out set.
Usage: ACCELERATE_USE_CPU=1 torchrun --nproc_per_node 2 rdm_gather.py OUT_DIR"""

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from helpers import TinyNet, toy_dataset  # noqa: E402

from hf_cifd import train_rdms  # noqa: E402

torch.manual_seed(0)
teacher = TinyNet()
report = train_rdms(toy_dataset(24), teacher=teacher, eval_dataset=toy_dataset(13, seed=1), rates=[1.0, 0.1],
                    hidden_dims=(8, 8, 8), max_steps=3, batch_size=4, output_dir=sys.argv[1], progress=False)
if int(os.environ["RANK"]) == 0:
    torch.save(teacher.state_dict(), os.path.join(sys.argv[1], "teacher.pt"))
