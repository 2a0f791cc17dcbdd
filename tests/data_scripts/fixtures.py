"""Local test data written on the fly: webdataset .tar shards with known good and bad records, tiny models."""

from __future__ import annotations

import io
import json
import os
import tarfile

import numpy as np


def jpeg_bytes(value: int, size: int = 8, mode: str = "RGB") -> bytes:
    from PIL import Image

    rng = np.random.default_rng(value)
    if mode == "L":
        arr = rng.integers(0, 255, (size, size), dtype=np.uint8)
    else:
        arr = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr, mode).save(buf, "JPEG")
    return buf.getvalue()


def write_wds(directory: str, *, n_shards: int = 4, per_shard: int = 10, task: str = "image-text",
              corrupt=(3,), empty_caption=(5,), missing_label=(), gray=(), small=(), size: int = 8) -> dict:
    """Writes ``n_shards`` tar files of ``per_shard`` records. Record i of each shard is corrupt (bytes that are not
    a JPEG) if ``i in corrupt``, has an empty caption if ``i in empty_caption``, label -1 if ``i in missing_label``,
    is grayscale if ``i in gray``, 4x4 pixels if ``i in small``. Returns {"files", "good", "bad": {key: reason}}."""
    os.makedirs(directory, exist_ok=True)
    files, good, bad = [], [], {}
    for s in range(n_shards):
        path = os.path.join(directory, f"shard-{s:05d}.tar")
        files.append(path)
        with tarfile.open(path, "w") as tf:
            for i in range(per_shard):
                key = f"s{s:02d}_{i:04d}"
                img = jpeg_bytes(s * 1000 + i, size=4 if i in small else size, mode="L" if i in gray else "RGB")
                reason = None
                if i in corrupt:
                    img, reason = b"\xff\xd8 this is not a jpeg", "undecodable_image"
                members = {"jpg": img}
                if task == "image-text":
                    cap = "   " if i in empty_caption else f"a photo number {s} {i}"
                    if i in empty_caption and reason is None:
                        reason = "empty_caption"
                    members["txt"] = cap.encode()
                else:
                    label = -1 if i in missing_label else (s * per_shard + i) % 5
                    if i in missing_label and reason is None:
                        reason = "missing_label"
                    members["cls"] = str(label).encode()
                if i in small and reason is None:
                    reason = "image_too_small"
                for ext, data in members.items():
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
                if reason:
                    bad[key] = reason
                else:
                    good.append(key)
    return {"files": files, "good": good, "bad": bad}


def tensor_transform(img):
    import torch

    arr = torch.from_numpy(np.asarray(img.resize((8, 8)), dtype=np.uint8).copy())
    return arr.permute(2, 0, 1).float() / 255.0


def teacher_transform(img):
    return tensor_transform(img) * 2.0 - 1.0


def tokenizer(text: str):
    import torch

    ids = [min(ord(c), 255) for c in text[:6]]
    return torch.tensor([ids + [0] * (6 - len(ids))])  # (1, L), like open_clip's tokenizer


def make_teacher(seed: int = 0):
    import torch
    from torch import nn

    class TinyTeacher(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 16), nn.Tanh())
            self.head = nn.Linear(16, 5)
            self.embed_dim = 16

        def forward(self, x):
            e = self.body(x)
            return e, self.head(e)

    torch.manual_seed(seed)
    return TinyTeacher()


def dump(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f)
    os.replace(tmp, path)


def _children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                if int(fields[1]) == pid:
                    out.append(int(entry))
            except (OSError, IndexError, ValueError):
                pass
    return out


def kill_tree(pid: int) -> list[int]:
    """SIGKILLs ``pid`` and all its descendants (torchrun starts its workers in their own sessions, so a process
    group kill is not enough). Stops the parents first so that nothing restarts the children."""
    import signal

    todo, pids = [pid], []
    while todo:
        p = todo.pop()
        pids.append(p)
        try:
            os.kill(p, signal.SIGSTOP)
        except ProcessLookupError:
            continue
        todo.extend(_children(p))
    for p in pids:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return pids
