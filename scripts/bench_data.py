"""Data benchmark (not a test): streamed decode+transform throughput with 1 vs 2 DataLoader workers, and teacher-cache
read throughput, measured side by side in one run on local files written here.

    python scripts/bench_data.py [--samples 768] [--image-size 256] [--crop 224] [--batch-size 64]

The images are random-noise JPEGs (worst case for JPEG decoding); the transform is the usual
RandomResizedCrop + flip + normalise for the student and Resize + CenterCrop for the teacher. The cache holds a
CLIP-L-like record per sample (768-d image and text embeddings, fp16) and is read in random batches of keys.
"""

from __future__ import annotations

import argparse
import io
import os
import random
import sys
import tarfile
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402


def write_shards(directory, n, n_shards, size):
    from PIL import Image

    rng = np.random.default_rng(0)
    files = []
    per = (n + n_shards - 1) // n_shards
    for s in range(n_shards):
        path = os.path.join(directory, f"bench-{s:04d}.tar")
        files.append(path)
        with tarfile.open(path, "w") as tf:
            for i in range(s * per, min(n, (s + 1) * per)):
                buf = io.BytesIO()
                Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, "JPEG", quality=90)
                for ext, data in (("jpg", buf.getvalue()), ("txt", f"a photo of thing {i}".encode())):
                    info = tarfile.TarInfo(f"{i:08d}.{ext}")
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
    return files


def transforms(crop):
    from torchvision import transforms as T

    norm = T.Normalize((0.48, 0.46, 0.41), (0.27, 0.26, 0.28))
    student = T.Compose([T.RandomResizedCrop(crop, antialias=True), T.RandomHorizontalFlip(), T.ToTensor(), norm])
    teacher = T.Compose([T.Resize(crop, antialias=True), T.CenterCrop(crop), T.ToTensor(), norm])
    return student, teacher


def bench_stream(files, num_workers, batch_size, crop):
    from hf_cifd.data import collate, load_image_dataset

    student, teacher = transforms(crop)
    ds = load_image_dataset("webdataset", task="image-text", data_files={"train": files}, transform=student,
                            teacher_transform=teacher, shuffle_buffer=256, seed=0)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, num_workers=num_workers, collate_fn=collate,
                                         persistent_workers=False)
    it = iter(loader)
    first = next(it)  # worker start-up and the first batch are not timed
    n, t0 = 0, time.perf_counter()
    for batch in it:
        n += len(batch["sample_key"])
    dt = time.perf_counter() - t0
    return n / dt, n + len(first["sample_key"])


def bench_cache(directory, n, batch_size, width=768):
    from hf_cifd.data import TeacherCache
    from hf_cifd.data.cache import _write_shard

    shard_dir = os.path.join(directory, "shards")
    os.makedirs(shard_dir, exist_ok=True)
    rng = np.random.default_rng(0)
    shard = 4096
    for j in range(0, n, shard):
        keys = [f"{i:08d}" for i in range(j, min(n, j + shard))]
        arrays = {f"teacher_{m}_embedding": rng.standard_normal((len(keys), width)).astype(np.float16)
                  for m in ("image", "text")}
        _write_shard(os.path.join(shard_dir, f"shard-{j // shard:06d}.arrow"), keys, arrays, {}, 0)
    t0 = time.perf_counter()
    cache = TeacherCache(directory)
    assert len(cache) == n
    open_s = time.perf_counter() - t0
    keys = [f"{i:08d}" for i in range(n)]
    random.Random(0).shuffle(keys)
    t0 = time.perf_counter()
    done = 0
    for b in range(0, n, batch_size):
        out = cache.get(keys[b:b + batch_size])
        done += out["teacher_image_embedding"].shape[0]
    dt = time.perf_counter() - t0
    bytes_per = 2 * width * 2
    return done / dt, open_s, bytes_per


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=768)
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--crop", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--cache-samples", type=int, default=100_000)
    a = p.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        files = write_shards(tmp, a.samples, n_shards=8, size=a.image_size)
        rows = []
        for w in (1, 2):
            rate, n = bench_stream(files, w, a.batch_size, a.crop)
            rows.append((f"stream decode+2 transforms, {w} worker(s)", rate, n))
        cache_rate, open_s, bytes_per = bench_cache(os.path.join(tmp, "cache"), a.cache_samples, 256)
        rows.append(("teacher cache read (random keys, batch 256)", cache_rate, a.cache_samples))
    base = rows[0][1]
    print(f"\nhf_cifd data benchmark: {os.cpu_count()} CPU core(s), torch threads 1, {a.image_size}px JPEGs -> "
          f"{a.crop}px crops, batch {a.batch_size}")
    print(f"{'measurement':48s} {'samples/s':>12s} {'x 1 worker':>11s} {'samples':>9s}")
    for name, rate, n in rows:
        print(f"{name:48s} {rate:12.1f} {rate / base:11.2f} {n:9d}")
    print(f"stream 2 workers / 1 worker: {rows[1][1] / rows[0][1]:.2f}x; cache read / stream (2 workers): "
          f"{rows[2][1] / rows[1][1]:.0f}x")
    print(f"cache: opened {a.cache_samples} keys in {open_s:.2f}s; {bytes_per} bytes/sample (2 x 768 fp16) -> "
          f"{bytes_per * 12e6 / 1e9:.1f} GB for 12M samples")


if __name__ == "__main__":
    main()
