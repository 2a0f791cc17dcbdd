"""Rate-Distortion Module (CIFD, Sec. 3.1, Fig. 1(a) and Fig. 7).

teacher embedding X -> encoder MLP -> entropy bottleneck (noise in training, rounding at eval) -> decoder MLP
-> reconstruction X^ (-> linear head -> logits). Trained with eq.(4)/(5)/(22); a larger rate weight ``R``
keeps more information (a bigger "teacher assistant"), a smaller one keeps less.

The paper's two RDMs: :meth:`RateDistortionModule.paper_imagenet` (A.2 / D.2) and
:meth:`RateDistortionModule.paper_cifar_cnn` (A.1.1, Table 1: no reconstruction).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from .. import losses
from ..checks import check_finite, check_width, DistillationInputError
from .bottleneck import EntropyBottleneck1d
from .strict_hub import StrictHubMixin

#: How X^ is produced: "linear" = an extra linear layer (no activation) after the hidden layers maps back to the
#: embedding width; "last_hidden" = the last hidden layer's (activated) output is X^ (the paper's A.2 RDM);
#: "none" = no X^ at all, the head reads the last hidden layer (A.1.1: eq. (5) without the reconstruction term).
RECONSTRUCTIONS = ("linear", "last_hidden", "none")


@dataclass
class RDMOutput:
    embedding: torch.Tensor | None  # reconstruction X^, (N, embed_dim); None for reconstruction="none"
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
):
    """A small MLP autoencoder over a teacher embedding with a learned entropy bottleneck.

    Use :meth:`paper_imagenet` / :meth:`paper_cifar_cnn` for the paper's exact RDMs. The plain constructor's
    defaults (``reconstruction="linear"``: 3 hidden layers + a 4th linear layer back to the embedding) are kept so
    that RDMs saved by earlier versions load unchanged.

    Args:
        embed_dim: width of the teacher embedding it reads (and reconstructs).
        hidden_dims: widths of the hidden layers; the bottleneck sits after layer ``bottleneck_after``.
        bottleneck_after: number of hidden layers in the encoder (the rest form the decoder).
        activate: per hidden layer, whether an activation follows it.
        num_classes: size of the linear classifier head (None: no head).
        rate_weight: R in eq.(4): weight of the distortion against the rate (bits); 0 = no distortion term.
        distortion: "mse" or "smooth_l1" (element mean: ``||X - X^||^2 / dim`` averaged over the batch).
        reconstruction: see :data:`RECONSTRUCTIONS`.

    ``save_pretrained`` / ``push_to_hub`` (huggingface_hub's mixin) write ``config.json``, ``model.safetensors`` and a
    card (:func:`hf_cifd.hub.rdm_model_card`) stating the teacher, R, and the measured bits / distortion / accuracy that
    :func:`hf_cifd.train_rdms` records in ``card_info``. ``from_pretrained`` takes a folder or a Hub repo id.
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
        reconstruction: str = "linear",
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
        if reconstruction not in RECONSTRUCTIONS:
            raise DistillationInputError(f"reconstruction must be one of {RECONSTRUCTIONS}, got {reconstruction!r}.")
        if not (isinstance(rate_weight, (int, float)) and math.isfinite(rate_weight) and rate_weight >= 0):
            raise DistillationInputError(f"rate_weight (R) must be a finite number >= 0, got {rate_weight!r}.")
        k = bottleneck_after
        if reconstruction != "linear" and k == len(hidden_dims):
            raise DistillationInputError(
                f"reconstruction={reconstruction!r} needs a decoder layer after the bottleneck: bottleneck_after must be "
                f"< len(hidden_dims)={len(hidden_dims)}.")
        if reconstruction == "last_hidden" and hidden_dims[-1] != embed_dim:
            raise DistillationInputError(
                f"reconstruction='last_hidden' makes the last hidden layer X^: its width ({hidden_dims[-1]}) must be the "
                f"embedding width {embed_dim}.")
        if reconstruction == "none":
            if not num_classes:
                raise DistillationInputError("reconstruction='none' leaves only the classifier head as output: give num_classes.")
            if rate_weight != 0:
                raise DistillationInputError(
                    f"reconstruction='none' has no X^ to distort: rate_weight (R) must be 0, got {rate_weight!r}.")
        self.embed_dim, self.num_classes = embed_dim, num_classes
        self.rate_weight, self.distortion, self.reconstruction = float(rate_weight), distortion, reconstruction
        self.encoder = _mlp([embed_dim, *hidden_dims[:k]], activate[:k], activation)
        self.bottleneck = EntropyBottleneck1d(hidden_dims[k - 1])
        if reconstruction == "linear":  # the decoder's extra last layer maps back to the embedding, no activation
            self.decoder = _mlp([*hidden_dims[k - 1 :], embed_dim], [*activate[k:], False], activation)
        else:
            self.decoder = _mlp(hidden_dims[k - 1 :], activate[k:], activation)
        out_dim = hidden_dims[-1] if reconstruction == "none" else embed_dim
        self.head = nn.Linear(out_dim, num_classes) if num_classes else None

    @classmethod
    def paper_imagenet(cls, embed_dim: int, num_classes: int | None = 1000, rate_weight: float = 1e4,
                       hidden_dim: int | None = None, distortion: str = "smooth_l1") -> "RateDistortionModule":
        """CIFD A.2 / D.2: Linear(D, h) + ReLU, Linear(h, h), bottleneck(h), Linear(h, D) + ReLU = X^, then the
        linear head to ``num_classes``. h = 512 for ResNet34 (D = 512: 1.31 MMACs with the head, D.2), 1024 for
        ResNet50 ("instead of hidden neuron size of 512, we had 1024"; its 3rd layer maps back to D = 2048).
        Default h: 512 when D <= 512, else 1024. Smooth-L1 distortion, R = 1e4 (the paper's largest)."""
        h = hidden_dim or (512 if embed_dim <= 512 else 1024)
        return cls(embed_dim, hidden_dims=(h, h, embed_dim), bottleneck_after=2, activate=(True, False, True),
                   num_classes=num_classes, rate_weight=rate_weight, distortion=distortion, reconstruction="last_hidden")

    @classmethod
    def paper_cifar_cnn(cls, embed_dim: int = 512, num_classes: int = 100, rate_weight: float = 0.0,
                        distortion: str = "mse") -> "RateDistortionModule":
        """CIFD A.1.1 (Table 1, the 10-layer CNN's FC512 embedding): FC512, FC306, bottleneck, FC100, output FC100
        (the head), trained with eq. (5) *without* the reconstruction term: there is no X^ and R = 0; the rate and
        the CE / KD of the head train it. Activation after the 1st and 3rd hidden layers, as in A.2 ("similar to
        CIFAR-100"): none directly before the bottleneck."""
        return cls(embed_dim, hidden_dims=(512, 306, 100), bottleneck_after=2, activate=(True, False, True),
                   num_classes=num_classes, rate_weight=rate_weight, distortion=distortion, reconstruction="none")

    card_info: dict | None = None  # teacher + measured rate / distortion / accuracy, for the model card

    def generate_model_card(self, *args, **kwargs):
        from ..hub import rdm_model_card

        return rdm_model_card(self)

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
        x = x.to(self.encoder[0].weight.dtype)  # e.g. a bf16 teacher's embedding into float32 RDMs
        y_hat, rate = self.bottleneck(self.encoder(x), with_rate=with_rate)
        decoded = self.decoder(y_hat)
        logits = self.head(decoded) if self.head is not None else None
        x_hat = None if self.reconstruction == "none" else decoded
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
        the bottleneck's quantile loss (it only reaches the quantile parameters). No "distortion" term when R = 0
        (and no X^ for ``reconstruction="none"``)."""
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
