"""Global-batch contrastive losses across processes: all_gather WITH gradient (open_clip's scheme).

CLIP's InfoNCE (eqs. 10-11) compares every image with every text of the batch, so with data parallelism each
process must see the features of the whole global batch. :func:`gather_with_grad` all-gathers a ``(n_local, D)``
tensor into the ``(n_global, D)`` one; its backward all-reduces (sums) the incoming gradient and returns this
process's slice, so gradient flows to every process's encoder.

:func:`clip_loss_global` is open_clip's "local loss + gather with grad" (``--local-loss --gather-with-grad``): each
process scores its OWN rows against all gathered columns, labels offset by the rows of the processes before it. With
DDP's gradient averaging (and the all-reduce in the gather's backward) the student gradients equal those of the
single-process loss on the global batch, and the mean of the per-process losses equals that loss (equal local
batch sizes; unequal sizes are gathered correctly but the DDP mean then weights processes equally).

Losses that are functions of the whole similarity matrix (open_clip / TinyCLIP distillation, CLIP-KD CRD/ICL) are
computed on the gathered matrices with the functions of :mod:`hf_cifd.losses`; every process then computes the same
global loss, and the same argument (sum in backward, mean in DDP) gives the exact global gradients.

Single process (or ``torch.distributed`` not initialised): everything reduces to the plain loss, no communication.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from . import losses
from .checks import DistillationInputError


def world() -> tuple[int, int]:
    """``(rank, world_size)`` of the default process group, ``(0, 1)`` when not distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _sizes(n: int, device) -> list[int]:
    _, ws = world()
    local = torch.tensor([n], device=device, dtype=torch.long)
    sizes = [torch.zeros_like(local) for _ in range(ws)]
    dist.all_gather(sizes, local)
    return [int(s.item()) for s in sizes]


def _gather_padded(x: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """all_gather of tensors whose first dims may differ (padded to the max, then trimmed)."""
    n_max = max(sizes)
    if x.shape[0] < n_max:
        x = torch.cat([x, x.new_zeros((n_max - x.shape[0], *x.shape[1:]))])
    parts = [torch.empty_like(x) for _ in sizes]
    dist.all_gather(parts, x.contiguous())
    return torch.cat([p[:n] for p, n in zip(parts, sizes)])


class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, sizes):
        rank, _ = world()
        ctx.start = sum(sizes[:rank])
        ctx.n = x.shape[0]
        return _gather_padded(x, sizes)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.start:ctx.start + ctx.n], None


def gather_with_grad(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``(global_tensor, offset)``: rows of every process concatenated in rank order (differentiable), and the
    index of this process's first row in it. Single process: ``(x, 0)``."""
    rank, ws = world()
    if ws == 1:
        return x, 0
    sizes = _sizes(x.shape[0], x.device)
    return _GatherWithGrad.apply(x, sizes), sum(sizes[:rank])


def gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """All processes' rows concatenated in rank order, detached (teacher features)."""
    _, ws = world()
    if ws == 1:
        return x.detach()
    with torch.no_grad():
        return _gather_padded(x.detach(), _sizes(x.shape[0], x.device))


def clip_loss_global(image_embeds: torch.Tensor, text_embeds: torch.Tensor, logit_scale) -> torch.Tensor:
    """Symmetric InfoNCE (eqs. 10-11, directions SUMMED as :func:`hf_cifd.losses.clip_contrastive_loss`) over the
    global batch, computed with open_clip's local-loss scheme (this process's rows vs all gathered columns).

    Inputs are this process's unnormalised ``(n_local, D)`` image / text embeddings, row b paired with row b;
    ``logit_scale`` the exponentiated scale. Single process: exactly ``losses.clip_contrastive_loss``.
    """
    rank, ws = world()
    if ws == 1:
        return losses.clip_contrastive_loss(image_embeds, text_embeds, logit_scale)
    if image_embeds.shape != text_embeds.shape:
        raise DistillationInputError(
            f"image_embeds {tuple(image_embeds.shape)} and text_embeds {tuple(text_embeds.shape)} must have the same "
            "shape (one caption per image, same embedding width)."
        )
    image = F.normalize(image_embeds.float(), dim=-1)
    text = F.normalize(text_embeds.float(), dim=-1)
    all_image, offset = gather_with_grad(image)
    all_text, _ = gather_with_grad(text)
    labels = torch.arange(image.shape[0], device=image.device) + offset
    logits_per_image = logit_scale * image @ all_text.T
    logits_per_text = logit_scale * text @ all_image.T
    return F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)


_EXIT_HOOK = False


def destroy_at_exit() -> None:
    """Registers (once per process) the destruction of the process group at interpreter exit, for scripts that end
    without :func:`shutdown` (e.g. a user's ``trainer.train()`` under torchrun). No barrier: a rank that failed must not
    make the others wait."""
    global _EXIT_HOOK
    if _EXIT_HOOK:
        return
    import atexit

    def _destroy():
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()

    atexit.register(_destroy)
    _EXIT_HOOK = True


def shutdown() -> None:
    """End of a multi-process run: wait for every rank, then destroy the process group. Left to interpreter exit,
    gloo's threads can be torn down while still in use and a rank aborts (SIGABRT) after the work was done."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
