"""Streams local webdataset shards with every process of `accelerate launch` x 2 DataLoader workers for 2 epochs
and dumps, from rank 0, the keys every rank saw per epoch and the bad-record counts summed over workers+processes.

python -m accelerate.commands.launch --num_processes 2 --cpu shard_run.py WDS_DIR BAD_DIR OUT.json
"""

import glob
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

torch.set_num_threads(1)

from accelerate import Accelerator, DataLoaderConfiguration  # noqa: E402

from data_scripts.fixtures import dump, tensor_transform, tokenizer  # noqa: E402
from hf_cifd.data import StreamTracker, collate, load_image_dataset  # noqa: E402


def main():
    wds_dir, bad_dir, out = sys.argv[1:4]
    # dispatch_batches=False: each process reads its own shards (the default for an IterableDataset is that rank 0
    # reads everything and scatters tensor slices, which also leaves list fields such as sample_key unsliced).
    accelerator = Accelerator(cpu=True, dataloader_config=DataLoaderConfiguration(dispatch_batches=False))
    files = sorted(glob.glob(os.path.join(wds_dir, "*.tar")))
    ds = load_image_dataset("webdataset", task="image-text", data_files={"train": files}, transform=tensor_transform,
                            tokenizer=tokenizer, shuffle_buffer=8, seed=3, bad_records_dir=bad_dir,
                            min_records_for_ceiling=10**9)
    loader = accelerator.prepare(torch.utils.data.DataLoader(ds, batch_size=3, num_workers=2, collate_fn=collate))
    result = {"epochs": []}
    tracker = StreamTracker()
    for epoch in range(2):
        loader.set_epoch(epoch)
        keys, workers = [], set()
        for batch in loader:
            workers.update(batch["stream_state"])
            tracker.observe(batch)
            assert batch["pixel_values"].shape[0] == len(batch["sample_key"]) == batch["input_ids"].shape[0]
            keys.extend(batch["sample_key"])
        tracker.end_epoch()
        gathered = [None] * accelerator.num_processes
        torch.distributed.all_gather_object(gathered, {"keys": keys, "workers": sorted(workers)})
        result["epochs"].append({"per_rank": gathered, "counts": tracker.global_counts()})
    if accelerator.is_main_process:
        result["num_processes"] = accelerator.num_processes
        dump(out, result)
    accelerator.end_training()  # barrier-free teardown of the process group: no abort at exit


if __name__ == "__main__":
    main()
