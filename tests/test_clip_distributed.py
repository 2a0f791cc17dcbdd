"""Acceptance 2: the 2-process gathered contrastive loss equals the single-process loss on the same global batch,
in value AND in the student's gradients (DDP-averaged), for a tiny open_clip student; also the global relational
baseline loss (open_clip distillation) and uneven per-process batch sizes."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

TINY = {"embed_dim": 16, "vision_cfg": {"image_size": 16, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
        "text_cfg": {"context_length": 8, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
N = 8  # global batch


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Wrap(torch.nn.Module):
    def __init__(self, clip):
        super().__init__()
        self.clip = clip

    def forward(self, images, tokens):
        return (self.clip.encode_image(images), self.clip.encode_text(tokens), self.clip.logit_scale.exp())


def _model_and_batch():
    from hf_cifd.adapters.open_clip import create_openclip

    torch.manual_seed(0)
    model, *_ = create_openclip(TINY)
    g = torch.Generator().manual_seed(1)
    images = torch.randn(N, 3, 16, 16, generator=g)
    tokens = torch.randint(1, 1000, (N, 8), generator=g)
    teacher = torch.randn(N, 12, generator=g), torch.randn(N, 12, generator=g)
    return model, images, tokens, teacher


def _losses(img, txt, scale, t_img, t_txt):
    from hf_cifd import losses
    from hf_cifd.distributed import clip_loss_global, gather_no_grad, gather_with_grad

    contrastive = clip_loss_global(img, txt, scale)
    g_img, _ = gather_with_grad(img)
    g_txt, _ = gather_with_grad(txt)
    distill = losses.openclip_distill_loss(g_img, g_txt, scale, gather_no_grad(t_img), gather_no_grad(t_txt), 50.0)
    return contrastive, distill


def _worker(rank, world, port, out_path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from hf_cifd.distributed import gather_with_grad

        model, images, tokens, (t_img, t_txt) = _model_and_batch()
        ddp = torch.nn.parallel.DistributedDataParallel(_Wrap(model))
        rows = slice(rank * N // world, (rank + 1) * N // world)
        img, txt, scale = ddp(images[rows], tokens[rows])
        contrastive, distill = _losses(img, txt, scale, t_img[rows], t_txt[rows])
        (contrastive + distill).backward()
        values = torch.stack([contrastive.detach(), distill.detach()])
        dist.all_reduce(values)  # mean over processes = the global loss (equal local batches)
        values /= world
        # Uneven local batch sizes: 5 rows on rank 0, 3 on rank 1.
        x = torch.arange(5.0 if rank == 0 else 3.0).unsqueeze(1) + 10 * rank
        x.requires_grad_(True)
        gathered, offset = gather_with_grad(x)
        (gathered * torch.arange(1.0, 9.0).unsqueeze(1)).sum().backward()
        if rank == 0:
            torch.save({"values": values, "grads": {n: p.grad.clone() for n, p in model.named_parameters()},
                        "gathered": gathered.detach(), "offset": offset, "x_grad": x.grad.clone()}, out_path)
        else:
            torch.save({"offset": offset, "x_grad": x.grad.clone()}, out_path + ".1")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_process_gathered_loss_and_grads_equal_single_process(tmp_path):
    out = str(tmp_path / "rank0.pt")
    mp.start_processes(_worker, args=(2, _free_port(), out), nprocs=2, join=True, start_method="spawn")
    got = torch.load(out)
    other = torch.load(out + ".1")

    from hf_cifd import losses

    model, images, tokens, (t_img, t_txt) = _model_and_batch()
    img, txt, scale = _Wrap(model)(images, tokens)
    contrastive = losses.clip_contrastive_loss(img, txt, scale)
    distill = losses.openclip_distill_loss(img, txt, scale, t_img, t_txt, 50.0)
    (contrastive + distill).backward()

    torch.testing.assert_close(got["values"], torch.stack([contrastive.detach(), distill.detach()]), rtol=1e-5, atol=1e-6)
    assert got["values"][0] > 0
    checked = 0
    for name, p in model.named_parameters():
        if p.grad is None:
            continue
        torch.testing.assert_close(got["grads"][name], p.grad, rtol=1e-3, atol=1e-5, msg=lambda m: f"{name}: {m}")
        checked += 1
    assert checked == len(list(model.parameters()))  # every student parameter got the same gradient

    # Uneven sizes: rank order kept, padding removed, each rank gets the gradient of its own rows.
    torch.testing.assert_close(got["gathered"].flatten(), torch.tensor([0., 1., 2., 3., 4., 10., 11., 12.]))
    assert (got["offset"], other["offset"]) == (0, 5)
    # Both ranks computed the same global sum: the backward all-reduce sums their gradients (x world size);
    # DDP's averaging then divides by the world size again.
    torch.testing.assert_close(got["x_grad"].flatten(), 2 * torch.arange(1.0, 6.0))
    torch.testing.assert_close(other["x_grad"].flatten(), 2 * torch.arange(6.0, 9.0))


def test_single_process_is_the_plain_loss():
    from hf_cifd import losses
    from hf_cifd.distributed import clip_loss_global, gather_with_grad

    g = torch.Generator().manual_seed(0)
    img, txt = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    assert torch.equal(clip_loss_global(img, txt, 10.0), losses.clip_contrastive_loss(img, txt, 10.0))
    x, offset = gather_with_grad(img)
    assert x is img and offset == 0
