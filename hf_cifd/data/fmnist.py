"""Fashion-MNIST as in-memory samples of the batch contract (``pixel_values`` (1, 28, 28) in [0, 1], ``labels``,
``sample_key``), from local idx-ubyte(.gz) files (Debian's ``dataset-fashion-mnist``:
/usr/share/datasets/fashion-mnist/) or from the Hub (``zalando-datasets/fashion_mnist``)."""

from __future__ import annotations

import gzip
import os

import numpy as np
import torch

from ..checks import DistillationInputError

DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"
HUB_ID = "zalando-datasets/fashion_mnist"
_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
          "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def _read_idx(path: str) -> np.ndarray:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    magic = int.from_bytes(data[:4], "big")
    if magic >> 8 != 0x08:  # 0x08 = unsigned byte
        raise DistillationInputError(f"{path} is not an idx file of unsigned bytes (magic {magic:#x}).")
    ndim = magic & 0xFF
    shape = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _find(root: str, name: str) -> str | None:
    for candidate in (name + ".gz", name):
        if os.path.exists(os.path.join(root, candidate)):
            return os.path.join(root, candidate)
    return None


def load_fashion_mnist_arrays(split: str, root: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(images uint8 (N, 28, 28), labels int64 (N,))`` of ``split`` ("train": 60,000, "test": 10,000).

    ``root`` (default: /usr/share/datasets/fashion-mnist when it exists) holds the idx files; without local files
    the split is read from the Hub with ``datasets.load_dataset("zalando-datasets/fashion_mnist")``."""
    if split not in _FILES:
        raise DistillationInputError(f"split must be 'train' or 'test', got {split!r}.")
    root = root if root is not None else (DEBIAN_DIR if os.path.isdir(DEBIAN_DIR) else None)
    if root is not None:
        paths = [_find(root, name) for name in _FILES[split]]
        if None in paths:
            raise DistillationInputError(
                f"{root} lacks {_FILES[split]} (.gz or not): install `dataset-fashion-mnist` (Debian) or pass root=None "
                f"with Hub access ({HUB_ID}).")
        images, labels = (_read_idx(p) for p in paths)
    else:
        import datasets

        ds = datasets.load_dataset(HUB_ID, split=split)
        images = np.stack([np.asarray(im, dtype=np.uint8) for im in ds["image"]])
        labels = np.asarray(ds["label"])
    if images.shape[1:] != (28, 28) or len(images) != len(labels):
        raise DistillationInputError(f"unexpected Fashion-MNIST arrays: images {images.shape}, labels {labels.shape}.")
    return images, labels.astype(np.int64)


def fashion_mnist_samples(split: str, indices=None, root: str | None = None) -> list[dict]:
    """Samples of the batch contract (a plain list is a map-style dataset for Trainer), optionally a subset."""
    images, labels = load_fashion_mnist_arrays(split, root)
    idx = np.arange(len(labels)) if indices is None else np.asarray(indices)
    pixels = torch.from_numpy(images[idx].astype(np.float32) / 255.0).unsqueeze(1)
    targets = torch.from_numpy(labels[idx])
    return [{"pixel_values": pixels[j], "labels": targets[j], "sample_key": f"fmnist-{split}-{i}"}
            for j, i in enumerate(idx.tolist())]
