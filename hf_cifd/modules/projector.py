"""Width adapters between student and teacher embeddings."""

from __future__ import annotations

from torch import nn


class Projector(nn.Sequential):
    """Maps ``in_dim`` -> ``out_dim`` with 0, 1 or 2 linear layers (ReLU between two).

    ``num_layers=0`` is the identity and requires equal widths; it is what a matching student uses.
    """

    def __init__(self, in_dim: int, out_dim: int, num_layers: int = 1, hidden_dim: int | None = None):
        if num_layers == 0:
            if in_dim != out_dim:
                raise ValueError(
                    f"a 0-layer projector needs equal widths, got {in_dim} -> {out_dim}; use num_layers=1 or 2."
                )
            layers: list[nn.Module] = [nn.Identity()]
        elif num_layers == 1:
            layers = [nn.Linear(in_dim, out_dim)]
        elif num_layers == 2:
            hidden = hidden_dim or max(in_dim, out_dim)
            layers = [nn.Linear(in_dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, out_dim)]
        else:
            raise ValueError(f"num_layers must be 0, 1 or 2, got {num_layers}.")
        super().__init__(*layers)
        self.in_dim, self.out_dim = in_dim, out_dim
