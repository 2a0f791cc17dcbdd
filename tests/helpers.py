"""Small models and datasets shared by the tests."""

import math
import sys

import datasets
import numpy as np
import pytest
import torch
from torch import nn

# Two CPU processes the way the README documents it (run with ACCELERATE_USE_CPU=1 in the environment);
# --standalone picks a free rendezvous port.
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


class TinyNet(nn.Module):
    """Returns (embedding, logits) like the paper's simple CNNs; ``forward_calls`` counts forwards."""

    def __init__(self, embed_dim=8, num_classes=4, in_features=16, hidden=16):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, embed_dim), nn.ReLU())
        self.head = nn.Linear(embed_dim, num_classes)
        self.embed_dim, self.num_classes = embed_dim, num_classes
        self.forward_calls = 0

    def forward(self, pixel_values):
        self.forward_calls += 1
        embedding = self.body(pixel_values)
        return embedding, self.head(embedding)


def toy_dataset(n=64, num_classes=4, seed=0, shape=(1, 4, 4), keys=True):
    g = np.random.default_rng(seed)
    data = {"pixel_values": g.normal(size=(n, *shape)).astype(np.float32),
            "labels": g.integers(0, num_classes, size=n).astype(np.int64)}
    if keys:
        data["sample_key"] = [f"s{i}" for i in range(n)]
    features = {"pixel_values": datasets.Array3D(shape, "float32"), "labels": datasets.Value("int64")}
    if keys:
        features["sample_key"] = datasets.Value("string")
    cols = ["pixel_values", "labels"]
    return datasets.Dataset.from_dict(data, features=datasets.Features(features)).with_format(
        "torch", columns=cols, output_all_columns=True)


# ---- a hand-checked image<->text retrieval case (2-D unit vectors given by angles) ----
def at(deg, scale=1.0):
    r = math.radians(deg)
    return [scale * math.cos(r), scale * math.sin(r)]


# Images at 0, 90, 180 degrees; image 0 scaled x3 (normalised inside, so the scale must not matter).
IMAGE_DEG = [0, 90, 180]
IMAGES = torch.tensor([at(0, 3.0), at(90), at(180)])
# Texts (caption -> image): T0 60deg->I0, T1 10deg->I0, T2 100deg->I1, T3 200deg->I1, T4 250deg->I2 (x4).
TEXT_DEG = [60, 10, 100, 200, 250]
TEXTS = torch.tensor([at(60), at(10), at(100), at(200, 5.0), at(250, 4.0)])
TEXT_TO_IMAGE = torch.tensor([0, 0, 1, 1, 2])
# By angular distance (smaller = more similar):
# text -> image:  T0: I1 30 < I0 60           -> rank 1   (unnormalised, 3*cos60 would wrongly win)
#                 T1: I0 10                   -> rank 0
#                 T2: I1 10                   -> rank 0
#                 T3: I2 20 < I1 110          -> rank 1
#                 T4: I2 70 < I1 160, I0 110  -> rank 0
#   R@1 = 3/5 = 60 %, R@2 = 100 %
# image -> text (any caption):
#   I0: T1 10, T0 60, T2 100, T4 110, T3 160  -> best positive T1 at rank 0
#   I1: T2 10, T1 80, T0 30 ... order T2 T0 T1 T3 T4 -> best positive T2 at rank 0
#   I2: T3 20, T4 70, T2 80, T1 170, T0 120   -> T4 at rank 1 (unnormalised, 4*cos70 would wrongly win)
#   R@1 = 2/3, R@2 = 100 %
EXPECTED = {
    "image_retrieval_recall@1": 60.0,
    "image_retrieval_recall@2": 100.0,
    "image_retrieval_recall@10": 100.0,
    "text_retrieval_recall@1": pytest.approx(200 / 3),
    "text_retrieval_recall@2": 100.0,
    "text_retrieval_recall@10": 100.0,
}


def hand_similarity():
    """cos(angle difference): rows = texts, columns = images."""
    return torch.tensor([[math.cos(math.radians(t - i)) for i in IMAGE_DEG] for t in TEXT_DEG])
