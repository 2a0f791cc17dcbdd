"""EntropyBottleneck1d evaluates compressai's density at y^ -/+ 1/2 in one pass, as one autograd node with a
hand-written backward (hf_cifd/modules/density.py): same noise, values and gradients as compressai's own
EntropyBottleneck.forward, including its likelihood lower bound and that bound's custom gradient."""

import copy

import pytest
import torch

from hf_cifd.modules import EntropyBottleneck1d


# scale 3: likelihoods well above compressai's 1e-9 bound; scale 40: many clamped to it, where LowerBound passes the
# gradient only when it pushes the likelihood up (sign -1: the loss rewards MORE bits, the gradient is blocked).
@pytest.mark.parametrize("training,scale,sign", [(True, 3.0, 1.0), (False, 3.0, 1.0), (True, 40.0, 1.0),
                                                 (True, 40.0, -1.0)])
def test_one_pass_rate_equals_compressai_forward(training, scale, sign):
    torch.manual_seed(0)
    ours = EntropyBottleneck1d(8)
    with torch.no_grad():  # away from the initial state, where every channel's density is the same
        for p in ours.parameters():
            p.add_(0.3 * torch.randn_like(p))
    ref = copy.deepcopy(ours)
    ours.train(training), ref.train(training)
    y = scale * torch.randn(64, 8)
    y_ours, y_ref = y.clone().requires_grad_(), y.clone().requires_grad_()
    torch.manual_seed(5)
    hat, bits = ours(y_ours)
    torch.manual_seed(5)
    ref_hat, likelihoods = ref.entropy_bottleneck(y_ref.unsqueeze(-1))
    ref_hat, ref_bits = ref_hat.squeeze(-1), -torch.log2(likelihoods).sum(dim=(1, 2))
    clamped = likelihoods.detach() <= ref.entropy_bottleneck.likelihood_lower_bound.bound
    assert clamped.any() == (scale > 10)  # the bound's branch is exercised exactly where intended
    assert torch.equal(hat, ref_hat)  # the same uniform draws (training) / the same rounding (eval)
    offsets = hat - ours.entropy_bottleneck._get_medians()[:, 0, 0]  # eval: integers around the medians
    assert training == (not torch.allclose(offsets, offsets.round(), atol=1e-5))
    assert bits.shape == (64,) and bits.dtype == torch.float32
    # rtol 1e-5: in the tails sigmoid(u) - sigmoid(l) cancels, so last-bit differences in the logits (one fused
    # multiply-add instead of a product and a sum) show at 3e-6 relative
    torch.testing.assert_close(bits, ref_bits, rtol=1e-5, atol=1e-5)
    (sign * bits.sum() + hat.pow(2).sum()).backward()
    (sign * ref_bits.sum() + ref_hat.pow(2).sum()).backward()
    torch.testing.assert_close(y_ours.grad, y_ref.grad, rtol=1e-5, atol=1e-6)
    checked = 0
    for (name, p), q in zip(ours.named_parameters(), ref.parameters()):
        if q.grad is not None:  # summed over 2N columns at once instead of two N: float rounding only
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-4 * q.grad.abs().max().item(), msg=name)
            checked += 1
        else:
            assert p.grad is None, name
    # the density's 5 matrices, 5 biases, 4 factors; in eval also the quantiles (the medians y^ is rounded around)
    assert checked == 14 + (not training)

