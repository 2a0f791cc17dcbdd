"""EntropyBottleneck1d evaluates compressai's density at y^ -/+ 1/2 in one pass: same noise, values and gradients as
compressai's own EntropyBottleneck.forward."""

import copy

import pytest
import torch

from hf_cifd.modules import EntropyBottleneck1d


@pytest.mark.parametrize("training", [True, False])
def test_one_pass_rate_equals_compressai_forward(training):
    torch.manual_seed(0)
    ours = EntropyBottleneck1d(8)
    with torch.no_grad():  # away from the initial state, where every channel's density is the same
        for p in ours.parameters():
            p.add_(0.3 * torch.randn_like(p))
    ref = copy.deepcopy(ours)
    ours.train(training), ref.train(training)
    y = 3 * torch.randn(64, 8)
    y_ours, y_ref = y.clone().requires_grad_(), y.clone().requires_grad_()
    torch.manual_seed(5)
    hat, bits = ours(y_ours)
    torch.manual_seed(5)
    ref_hat, likelihoods = ref.entropy_bottleneck(y_ref.unsqueeze(-1))
    ref_hat, ref_bits = ref_hat.squeeze(-1), -torch.log2(likelihoods).sum(dim=(1, 2))
    assert torch.equal(hat, ref_hat)  # the same uniform draws (training) / the same rounding (eval)
    offsets = hat - ours.entropy_bottleneck._get_medians()[:, 0, 0]  # eval: integers around the medians
    assert training == (not torch.allclose(offsets, offsets.round(), atol=1e-5))
    assert bits.shape == (64,)
    torch.testing.assert_close(bits, ref_bits, rtol=1e-6, atol=1e-5)
    (bits.sum() + hat.pow(2).sum()).backward()
    (ref_bits.sum() + ref_hat.pow(2).sum()).backward()
    torch.testing.assert_close(y_ours.grad, y_ref.grad, rtol=1e-5, atol=1e-6)
    for (name, p), q in zip(ours.named_parameters(), ref.parameters()):
        if q.grad is not None:  # summed over 2N columns at once instead of two N: float rounding only
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-4 * q.grad.abs().max().item(), msg=name)
