"""Small models and datasets shared by the tests."""

import datasets
import numpy as np
import torch
from torch import nn


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
