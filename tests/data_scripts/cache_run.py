"""Writes a teacher cache from local webdataset shards with every process of `accelerate launch`.

python -m accelerate.commands.launch --num_processes 2 --cpu cache_run.py WDS_DIR OUT_DIR REPORT.json [--sleep S]
--sleep makes each teacher batch slow so that a test can kill the run part-way.
"""

import argparse
import glob
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

torch.set_num_threads(1)

from accelerate import Accelerator  # noqa: E402

from data_scripts.fixtures import dump, make_teacher, tensor_transform  # noqa: E402
from hf_cifd.data import cache_teacher_outputs, load_image_dataset  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("wds_dir")
    p.add_argument("out_dir")
    p.add_argument("report")
    p.add_argument("--sleep", type=float, default=0.0)
    p.add_argument("--also", nargs=2, metavar=("OUT_DIR", "REPORT"), help="then write a second cache (uninterrupted)")
    args = p.parse_args()
    accelerator = Accelerator(cpu=True)
    teacher = make_teacher(0)
    if args.sleep:
        hook = lambda *a: time.sleep(args.sleep)  # noqa: E731
        teacher.register_forward_pre_hook(hook)
    files = sorted(glob.glob(os.path.join(args.wds_dir, "*.tar")))
    ds = load_image_dataset("webdataset", task="image-text", data_files={"train": files}, transform=tensor_transform)
    jobs = [(args.out_dir, args.report)] + ([tuple(args.also)] if args.also else [])
    for out_dir, report_path in jobs:
        report = cache_teacher_outputs(teacher, ds, out_dir, batch_size=2, shard_size=4, accelerator=accelerator,
                                       progress=False)
        if accelerator.is_main_process:
            dump(report_path, report.__dict__)
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    main()
