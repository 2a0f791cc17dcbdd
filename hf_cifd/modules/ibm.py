"""Information Bottleneck Module (CIFD, Sec. 3.2, eq.(7), Fig. 8).

Training only: the student backbone is the encoder (W = student embedding); the IBM adds U(-0.5, 0.5) noise
(W^), scores it under its own learned density r (rate -log2 r(W^), bits per sample), and decodes W^ with
1-2 linear layers to each target embedding width (teacher / RDM embeddings). In eval mode it returns the
student embedding untouched and computes nothing, so it is never part of the exported student.
"""

from __future__ import annotations

from typing import Mapping, NamedTuple

import torch
from torch import nn

from ..checks import check_width
from .bottleneck import EntropyBottleneck1d
from .projector import Projector


class IBMOutput(NamedTuple):
    # A NamedTuple, not a dataclass: DeepSpeed ZeRO-3 hooks the tensors of a module's output only inside tuples,
    # lists and dicts (its backward fails on a dataclass output whose input gets a gradient).
    noisy: torch.Tensor  # W^ in training, W in eval: feed this to the student head
    rate: torch.Tensor | None  # bits per sample (N,), None in eval
    decoded: dict[str, torch.Tensor]  # U^ per target


class InformationBottleneck(nn.Module):
    """IBM over a ``dim``-wide student embedding.

    Args:
        dim: width of the student embedding W.
        target_dims: width of each embedding to reconstruct, by name (an int means one target, "teacher").
        decoder_layers: 1 or 2 linear layers per decoder (0 allowed when a target has the student's width).
    """

    def __init__(self, dim: int, target_dims: int | Mapping[str, int], decoder_layers: int = 1):
        super().__init__()
        targets = {"teacher": target_dims} if isinstance(target_dims, int) else dict(target_dims)
        self.dim = dim
        self.density = EntropyBottleneck1d(dim)
        # The IBM never quantises (eval is the identity): the medians / quantiles are unused, so freeze them rather
        # than leave DDP a parameter that never gets a gradient.
        self.density.entropy_bottleneck.quantiles.requires_grad_(False)
        self.decoders = nn.ModuleDict({name: Projector(dim, d, decoder_layers) for name, d in targets.items()})

    def forward(self, w: torch.Tensor) -> IBMOutput:
        check_width("IBM input (student embedding)", w, self.dim)
        w = w.to(next(self.parameters()).dtype)  # autocast then decides the compute dtype
        if not self.training:
            return IBMOutput(noisy=w, rate=None, decoded={n: dec(w) for n, dec in self.decoders.items()})
        w_hat, rate = self.density(w)
        return IBMOutput(noisy=w_hat, rate=rate, decoded={n: dec(w_hat) for n, dec in self.decoders.items()})
