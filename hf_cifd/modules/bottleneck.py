"""Learned non-parametric entropy bottleneck (Ballé et al. 2017, CIFD ref. [24]) over vectors.

A thin wrapper around compressai's ``EntropyBottleneck`` that

* takes embeddings of shape ``(N, C)`` instead of images,
* returns the rate in **bits per sample** (shape ``(N,)``),
* exposes the auxiliary loss that trains the quantile parameters (they get no gradient from the main loss),
* loads a state dict saved after ``update()`` into a fresh module (compressai's CDF buffers change size on
  ``update()``, which makes a plain ``load_state_dict`` fail).
"""

from __future__ import annotations

import torch
from torch import nn

from .density import factorized_rate_bits

# Buffers that compressai's EntropyBottleneck.update() resizes.
_RESIZED_BUFFERS = ("_offset", "_quantized_cdf", "_cdf_length")


class EntropyBottleneck1d(nn.Module):
    """Entropy bottleneck for ``(N, C)`` embeddings.

    Training: adds U(-0.5, 0.5) noise. Eval: rounds around the learned medians (the paper's inference mode).
    """

    def __init__(self, channels: int, *, filters: tuple[int, ...] = (3, 3, 3, 3), init_scale: float = 10.0):
        super().__init__()
        # compressai's __init__ imports torchvision and torch_geometric (~4 s): import it only when needed.
        from compressai.entropy_models import EntropyBottleneck

        self.channels = channels
        self.entropy_bottleneck = EntropyBottleneck(channels, filters=filters, init_scale=init_scale)

    def forward(self, y: torch.Tensor, with_rate: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Returns ``(y_hat, bits)``: the noisy / quantised values and the rate in bits per sample.

        ``with_rate=False`` skips the density evaluation (most of the cost) and returns ``(y_hat, None)``: what a
        frozen RDM needs while a student trains.
        """
        if not with_rate:
            eb = self.entropy_bottleneck
            medians = eb._get_medians()[:, 0, 0]
            y_hat = y + torch.empty_like(y).uniform_(-0.5, 0.5) if self.training else torch.round(y - medians) + medians
            return y_hat, None
        # The likelihoods in the entropy model's own dtype (float32 unless DeepSpeed cast it), never autocast's: bf16
        # cumulative logits make the rate meaningless.
        with torch.autocast(y.device.type, enabled=False):
            y_hat, bits = self._forward_with_rate(y.to(self.entropy_bottleneck.quantiles.dtype))
        return y_hat.to(y.dtype), bits

    def _forward_with_rate(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """compressai's ``EntropyBottleneck.forward`` + bits, the density at y^ - 1/2 and y^ + 1/2 evaluated in ONE
        pass through its per-channel MLP, as one autograd node (density.py: the IBM's cost per step for a small
        student). Same noise draws, values and gradients."""
        eb = self.entropy_bottleneck
        values = y.t().unsqueeze(1)  # compressai's (C, 1, N) layout
        if eb.training:  # compressai's "noise" mode, drawn in the same (C, 1, N) order
            y_hat = values + torch.empty(values.shape, dtype=values.dtype, device=values.device).uniform_(-0.5, 0.5)
        else:  # "dequantize": round around the medians
            medians = eb._get_medians()
            y_hat = torch.round(values - medians) + medians
        return y_hat.squeeze(1).t(), factorized_rate_bits(eb, y_hat)

    def aux_loss(self) -> torch.Tensor:
        """compressai's quantile loss: trains the medians used for rounding at eval (and for coding)."""
        return self.entropy_bottleneck.loss()

    def update(self, force: bool = True) -> bool:
        """Builds the quantised CDF tables used for actual entropy coding (compressai ``update``)."""
        return self.entropy_bottleneck.update(force=force)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Resize the CDF buffers to what was saved, so that a state dict written after update() loads.
        for name in _RESIZED_BUFFERS:
            key = f"{prefix}entropy_bottleneck.{name}"
            if key in state_dict:
                current = getattr(self.entropy_bottleneck, name)
                setattr(self.entropy_bottleneck, name, torch.empty_like(current).resize_(state_dict[key].shape))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
