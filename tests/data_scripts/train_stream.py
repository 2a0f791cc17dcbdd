"""A streaming `DistillationTrainer` run (method "student") on local webdataset shards that logs, per optimizer step,
the sample keys it trained on (fsynced), so that a test can SIGKILL it and check the resumed run. The trainer adds
the StreamResumeCallback itself for a streamed dataset.

python train_stream.py WDS_DIR OUT_DIR KEYLOG [--sleep S] [--resume | --resume-from CKPT] [--max-steps N]
"""

import argparse
import glob
import json
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_DISABLED", "true")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from torch import nn  # noqa: E402

torch.set_num_threads(1)

from transformers import TrainerCallback  # noqa: E402

from data_scripts.fixtures import dump, tensor_transform  # noqa: E402
from hf_cifd import DistillationConfig, DistillationTrainer  # noqa: E402
from hf_cifd.data import StreamResumeCallback, load_image_dataset  # noqa: E402

SHUFFLE_BUFFER, SEED, BATCH, WORKERS = 8, 1, 4, 2


def build_dataset(wds_dir):
    files = sorted(glob.glob(os.path.join(wds_dir, "*.tar")))
    return load_image_dataset("webdataset", task="classification", data_files={"train": files},
                              transform=tensor_transform, shuffle_buffer=SHUFFLE_BUFFER, seed=SEED,
                              min_records_for_ceiling=10**9)


class TinyModel(nn.Module):
    """Returns (embedding, logits); ``pending`` collects the keys of the batches the trainer fed it."""

    def __init__(self, sleep=0.0):
        super().__init__()
        self.embed = nn.Linear(3 * 8 * 8, 6)
        self.head = nn.Linear(6, 5)
        self.sleep = sleep
        self.pending = []

    def forward(self, pixel_values):
        if self.sleep:
            time.sleep(self.sleep)
        embedding = self.embed(pixel_values.flatten(1))
        return embedding, self.head(embedding)


def record_keys(model):
    def hook(module, args, kwargs):  # the container gets the whole batch, keys included
        model.pending.extend(kwargs["sample_key"])
    return hook


class KeyLogger(TrainerCallback):
    def __init__(self, model, path, stream_cb):
        self.model, self.path, self.stream_cb = model, path, stream_cb

    def on_step_end(self, args, state, control, **kwargs):
        line = json.dumps({"step": state.global_step, "epoch": self.stream_cb.tracker.epoch, "keys": self.model.pending})
        with open(self.path, "a") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.model.pending = []

    def on_epoch_end(self, args, state, control, **kwargs):  # runs after StreamResumeCallback.on_epoch_end
        line = json.dumps({"epoch_end": self.stream_cb.tracker.epoch - 1, "counts": self.stream_cb.tracker.finished})
        with open(self.path, "a") as f:
            f.write(line + "\n")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("wds_dir")
    p.add_argument("out_dir")
    p.add_argument("keylog")
    p.add_argument("--sleep", type=float, default=0.0)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--max-steps", type=int, default=16)
    p.add_argument("--resume-from", default=None, help="a checkpoint directory (anywhere) to resume from")
    a = p.parse_args()
    torch.manual_seed(0)
    model = TinyModel(a.sleep)
    args = DistillationConfig(
        output_dir=a.out_dir, method="student", max_steps=a.max_steps, per_device_train_batch_size=BATCH,
        learning_rate=0.1, save_strategy="steps", save_steps=2, logging_steps=1000, report_to=[], use_cpu=True,
        disable_tqdm=True, dataloader_num_workers=WORKERS, seed=0,
    )
    trainer = DistillationTrainer(model=model, args=args, train_dataset=build_dataset(a.wds_dir))
    (stream_cb,) = [c for c in trainer.callback_handler.callbacks if isinstance(c, StreamResumeCallback)]
    trainer.model.register_forward_pre_hook(record_keys(model), with_kwargs=True)
    trainer.add_callback(KeyLogger(model, a.keylog, stream_cb))
    trainer.train(resume_from_checkpoint=a.resume_from or (True if a.resume else None))
    dump(os.path.join(a.out_dir, "final_stream_state.json"), stream_cb.tracker.state_dict())


if __name__ == "__main__":
    main()
