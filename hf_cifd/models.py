"""The paper's simple CNNs (CIFD Table 8), as plain modules returning (embedding, logits).

A model is a list of layer tokens: ``C<n>`` a 3x3 conv (stride 1, padding 1) with n filters, ``MP`` a 2x2 max-pool,
``FC<n>`` a fully connected layer; a ReLU follows every conv / FC layer. The last FC layer's output is the
embedding (the teacher embedding an RDM reads), and a linear head maps it to the logits.
"""

from __future__ import annotations

from typing import Sequence

from torch import nn

from .modules.strict_hub import StrictHubMixin

# Table 8 of the CIFD paper (CIFAR-100, 32x32 inputs); the output layer FC100 is the head.
TABLE8 = {
    "cnn10": ["C32", "C32", "MP", "C64", "C64", "MP", "C128", "C128", "MP", "C256", "C256", "C256", "C256", "MP", "FC512"],
    "cnn8": ["C32", "C32", "MP", "C64", "C64", "MP", "C128", "C128", "MP", "C256", "C256", "MP", "FC64"],
    "cnn6": ["C32", "C32", "MP", "C64", "C64", "MP", "C128", "C128", "FC256"],
    "cnn4": ["C32", "C32", "MP", "C64", "C64", "MP", "FC256"],
    "cnn2": ["C32", "MP", "C32", "MP", "FC256"],
}


class SimpleCNN(nn.Module, StrictHubMixin, library_name="hf_cifd", tags=["image-classification", "cifd"]):
    """``features`` (convs, ReLUs, pools) -> flatten -> ``embed`` (FC layers + ReLU) -> ``head``."""

    def __init__(self, layers: Sequence[str], num_classes: int = 100, in_channels: int = 3, input_size: int = 32):
        super().__init__()
        feats: list[nn.Module] = []
        fcs: list[nn.Module] = [nn.Flatten()]
        channels, size, width = in_channels, input_size, None
        for token in layers:
            if token == "MP":
                feats.append(nn.MaxPool2d(2))
                size //= 2
            elif token.startswith("C") and width is None:
                feats += [nn.Conv2d(channels, int(token[1:]), 3, padding=1), nn.ReLU()]
                channels = int(token[1:])
            elif token.startswith("FC"):
                d_in = width if width is not None else channels * size * size
                width = int(token[2:])
                fcs += [nn.Linear(d_in, width), nn.ReLU()]
            else:
                raise ValueError(f"bad layer token {token!r}: use C<n>, MP, FC<n> (convs before FC layers).")
        if width is None:
            raise ValueError("the layer list needs at least one FC<n> layer: its output is the embedding.")
        self.features, self.embed = nn.Sequential(*feats), nn.Sequential(*fcs)
        self.head = nn.Linear(width, num_classes)
        self.embed_dim, self.num_classes = width, num_classes
        self.input_size, self.in_channels = input_size, in_channels

    @classmethod
    def from_table8(cls, name: str, num_classes: int = 100, **kwargs) -> "SimpleCNN":
        return cls(TABLE8[name], num_classes=num_classes, **kwargs)

    def forward(self, pixel_values):
        embedding = self.embed(self.features(pixel_values))
        return embedding, self.head(embedding)
