"""A generated image-text dataset of coloured shapes ("a red circle") that a tiny CLIP can learn offline.

6 colours x 4 shapes = 24 classes (chance 1/24 = 4.2% top-1). Each image is a shape of random size and position on a
random grey, noisy background; its caption names colour and shape in one of a few phrasings. Written as
webdataset ``.tar`` shards (``<key>.jpg``, ``<key>.txt``, ``<key>.cls``; read with
``load_dataset("webdataset", data_files=..., streaming=True)`` like ``pixparse/cc12m-wds``) together with the
clip-benchmark files ``classnames.txt`` and ``zeroshot_classification_templates.txt``, or as a ``datasets.Dataset``.
"""

from __future__ import annotations

import io
import json
import math
import os
import random
import tarfile
from typing import Any

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30), "green": (30, 180, 40), "blue": (30, 60, 230),
    "yellow": (235, 220, 30), "purple": (150, 40, 190), "orange": (250, 140, 20),
}
SHAPES = ("circle", "square", "triangle", "cross")
CAPTION_TEMPLATES = ("a {c}", "a {c}.", "a photo of a {c}", "a picture of a {c}.", "an image of a {c}", "a small {c}",
                     "a big {c}")
ZERO_SHOT_TEMPLATES = ("a {c}.", "a photo of a {c}.", "an image of a {c}.")


def classnames() -> list[str]:
    """Class id -> name ("red circle", ...): colour-major order."""
    return [f"{colour} {shape}" for colour in COLOURS for shape in SHAPES]


def render(label: int, rng: random.Random, size: int = 32):
    """A PIL RGB image of class ``label``."""
    from PIL import Image, ImageDraw

    colour = list(COLOURS.values())[label // len(SHAPES)]
    shape = SHAPES[label % len(SHAPES)]
    grey = rng.randint(70, 190)
    img = Image.new("RGB", (size, size), (grey, grey, grey))
    draw = ImageDraw.Draw(img)
    r = rng.uniform(0.25, 0.42) * size
    cx, cy = rng.uniform(r, size - r), rng.uniform(r, size - r)
    jitter = tuple(max(0, min(255, v + rng.randint(-20, 20))) for v in colour)
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=jitter)
    elif shape == "square":
        s = r * 0.85
        draw.rectangle([cx - s, cy - s, cx + s, cy + s], fill=jitter)
    elif shape == "triangle":
        a = rng.uniform(0, 2 * math.pi / 3) * 0.2
        pts = [(cx + r * math.sin(a + k * 2 * math.pi / 3), cy - r * math.cos(a + k * 2 * math.pi / 3)) for k in range(3)]
        draw.polygon(pts, fill=jitter)
    else:  # cross
        w = r * 0.35
        draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=jitter)
        draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=jitter)
    # light pixel noise so that images are not trivially identical
    px = img.load()
    for _ in range(size * size // 8):
        x, y = rng.randrange(size), rng.randrange(size)
        v = rng.randint(-25, 25)
        p = px[x, y]
        px[x, y] = tuple(max(0, min(255, c + v)) for c in p)
    return img


def caption(label: int, rng: random.Random) -> str:
    return rng.choice(CAPTION_TEMPLATES).replace("{c}", classnames()[label])


def samples(n: int, seed: int = 0, size: int = 32, captions_per_image: int = 1) -> list[dict[str, Any]]:
    """``n`` samples ``{"image": PIL, "text": str (captions joined by newlines), "label": int, "key": str}``,
    classes balanced (round-robin, shuffled)."""
    rng = random.Random(seed)
    labels = [i % len(classnames()) for i in range(n)]
    rng.shuffle(labels)
    out = []
    for i, label in enumerate(labels):
        texts = [caption(label, rng) for _ in range(captions_per_image)]
        out.append({"image": render(label, rng, size), "text": "\n".join(texts), "label": label,
                    "key": f"s{seed:03d}_{i:06d}"})
    return out


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_metadata(output_dir: str) -> None:
    """clip-benchmark style ``classnames.txt`` and ``zeroshot_classification_templates.txt``."""
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, "classnames.txt"), "w") as f:
        f.write("\n".join(classnames()) + "\n")
    with open(os.path.join(output_dir, "zeroshot_classification_templates.txt"), "w") as f:
        f.write("\n".join(ZERO_SHOT_TEMPLATES) + "\n")


def write_webdataset(output_dir: str, n: int, *, seed: int = 0, size: int = 32, shard_size: int = 256,
                     captions_per_image: int = 1, prefix: str = "shapes") -> list[str]:
    """Writes ``n`` samples as webdataset shards ``<prefix>-00000.tar`` ... (+ the metadata files); returns the
    shard paths. JPEG quality 95 (the format of the CC12M / clip-benchmark shards)."""
    write_metadata(output_dir)
    paths = []
    items = samples(n, seed, size, captions_per_image)
    for start in range(0, n, shard_size):
        path = os.path.join(output_dir, f"{prefix}-{start // shard_size:05d}.tar")
        tmp = path + ".tmp"
        with tarfile.open(tmp, "w") as tar:
            for s in items[start:start + shard_size]:
                buf = io.BytesIO()
                s["image"].save(buf, format="JPEG", quality=95)
                _add(tar, f"{s['key']}.jpg", buf.getvalue())
                _add(tar, f"{s['key']}.txt", s["text"].encode())
                _add(tar, f"{s['key']}.cls", str(s["label"]).encode())
        os.replace(tmp, path)
        paths.append(path)
    with open(os.path.join(output_dir, "info.json"), "w") as f:
        json.dump({"num_samples": n, "seed": seed, "size": size, "num_classes": len(classnames()),
                   "captions_per_image": captions_per_image, "shards": [os.path.basename(p) for p in paths]}, f)
    return paths


def as_dataset(n: int, *, seed: int = 0, size: int = 32, captions_per_image: int = 1):
    """The samples as a ``datasets.Dataset`` (columns image, text, label (ClassLabel), key)."""
    import datasets

    items = samples(n, seed, size, captions_per_image)
    features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=classnames()), "key": datasets.Value("string")})
    return datasets.Dataset.from_dict({k: [s[k] for s in items] for k in ("image", "text", "label", "key")},
                                      features=features)
