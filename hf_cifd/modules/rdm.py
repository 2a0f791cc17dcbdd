"""Rate-Distortion Module (CIFD, Sec. 3.1, Fig. 1(a) and Fig. 7).

teacher embedding X -> encoder MLP -> entropy bottleneck (noise in training, rounding at eval) -> decoder MLP
-> reconstruction X^ (-> linear head -> logits). Trained with eq.(4)/(5)/(22); a larger rate weight ``R``
keeps more information (a bigger "teacher assistant"), a smaller one keeps less.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from .. import losses
from ..checks import check_finite, check_positive, check_width, DistillationInputError
from .bottleneck import EntropyBottleneck1d
from .strict_hub import StrictHubMixin


@dataclass
class RDMOutput:
    embedding: torch.Tensor  # reconstruction X^, (N, embed_dim)
    rate: torch.Tensor | None  # bits per sample, (N,); None when forward(..., with_rate=False)
    latent: torch.Tensor  # noisy / quantised code Y^, (N, bottleneck_dim)
    logits: torch.Tensor | None = None  # (N, num_classes) when the RDM has a head


def _mlp(dims: Sequence[int], activate: Sequence[bool], activation: str) -> nn.Sequential:
    act = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU}[activation]
    layers: list[nn.Module] = []
    for (d_in, d_out), use_act in zip(zip(dims[:-1], dims[1:]), activate):
        layers.append(nn.Linear(d_in, d_out))
        if use_act:
            layers.append(act())
    return nn.Sequential(*layers)


class RateDistortionModule(
    nn.Module,
    StrictHubMixin,
    library_name="hf_cifd",
    tags=["knowledge-distillation", "cifd", "rate-distortion-module"],
    repo_url="https://github.com/hf-cifd/hf_cifd",
):
    """A small MLP autoencoder over a teacher embedding with a learned entropy bottleneck.

    Defaults follow the paper's ImageNet RDM (Appendix A.2): three hidden layers of 512, activation after the
    1st and 3rd only, the bottleneck after the 2nd, smooth-L1 distortion, ``rate_weight`` R = 1e4.

    Args:
        embed_dim: width of the teacher embedding it reconstructs.
        hidden_dims: widths of the hidden layers; the bottleneck sits after layer ``bottleneck_after``.
        bottleneck_after: number of hidden layers in the encoder (the rest form the decoder).
        activate: per hidden layer, whether an activation follows it.
        num_classes: size of the linear classifier head on the reconstruction (None: no head).
        rate_weight: R in eq.(4): weight of the distortion against the rate (bits).
        distortion: "mse" or "smooth_l1" (summed over dims, averaged over the batch).
    """

    def __init__(
        self,
        embed_dim: int,
        hidden_dims: Sequence[int] = (512, 512, 512),
        bottleneck_after: int = 2,
        activate: Sequence[bool] | None = (True, False, True),
        num_classes: int | None = None,
        rate_weight: float = 1e4,
        distortion: str = "smooth_l1",
        activation: str = "relu",
    ):
        super().__init__()
        hidden_dims = list(hidden_dims)
        activate = [True] * len(hidden_dims) if activate is None else list(activate)
        if not 1 <= bottleneck_after <= len(hidden_dims):
            raise DistillationInputError(
                f"bottleneck_after must be between 1 and len(hidden_dims)={len(hidden_dims)}, got {bottleneck_after}."
            )
        if len(activate) != len(hidden_dims):
            raise DistillationInputError(f"activate needs one flag per hidden layer ({len(hidden_dims)}).")
        if distortion not in ("mse", "smooth_l1"):
            raise DistillationInputError(f"distortion must be 'mse' or 'smooth_l1', got {distortion!r}.")
        check_positive("rate_weight (R)", rate_weight)
        self.embed_dim, self.num_classes = embed_dim, num_classes
        self.rate_weight, self.distortion = float(rate_weight), distortion
        k = bottleneck_after
        self.encoder = _mlp([embed_dim, *hidden_dims[:k]], activate[:k], activation)
        self.bottleneck = EntropyBottleneck1d(hidden_dims[k - 1])
        # The decoder's last layer maps back to the embedding and has no activation.
        self.decoder = _mlp([*hidden_dims[k - 1 :], embed_dim], [*activate[k:], False], activation)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes else None

    @property
    def bottleneck_dim(self) -> int:
        return self.bottleneck.channels

    def forward(self, x: torch.Tensor, with_rate: bool = True) -> RDMOutput:
        """``with_rate=False`` skips the entropy model's density (the rate), which only the RDM's own loss needs."""
        check_width(
            "RDM input (teacher embedding)", x, self.embed_dim,
            hint=f"This RDM was trained for a teacher embedding of width {self.embed_dim}; train RDMs for this teacher.",
        )
        check_finite("RDM input (teacher embedding)", x)
        y_hat, rate = self.bottleneck(self.encoder(x), with_rate=with_rate)
        x_hat = self.decoder(y_hat)
        logits = self.head(x_hat) if self.head is not None else None
        return RDMOutput(embedding=x_hat, rate=rate, latent=y_hat, logits=logits)

    def loss(
        self,
        x: torch.Tensor,
        output: RDMOutput,
        labels: torch.Tensor | None = None,
        teacher_logits: torch.Tensor | None = None,
        *,
        lambda_ce: float = 1.0,
        lambda_kl: float = 1.0,
        temperature: float = 2.0,
    ) -> dict[str, torch.Tensor]:
        """Eq.(4) (no head) or eq.(5)/(22) (with head): R*D(X, X^) + rate [+ CE + lambda_KL*KD], plus "aux",
        the bottleneck's quantile loss (it only reaches the quantile parameters)."""
        terms = losses.rdm_loss(
            x, output.embedding, output.rate, self.rate_weight, distortion=self.distortion,
            logits=output.logits, labels=labels if output.logits is not None else None,
            teacher_logits=teacher_logits if output.logits is not None else None,
            lambda_ce=lambda_ce, lambda_kl=lambda_kl, temperature=temperature,
        )
        terms["aux"] = self.bottleneck.aux_loss()
        return terms

    def update(self) -> bool:
        """Builds the bottleneck's CDF tables (for real entropy coding); the module still saves/loads after."""
        return self.bottleneck.update(force=True)
