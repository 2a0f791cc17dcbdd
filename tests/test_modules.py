"""RateDistortionModule, InformationBottleneck, the entropy bottleneck and projector (issue 2, items 3-5)."""

import json
import math
import re

import pytest
import torch

from hf_cifd import DistillationInputError, InformationBottleneck, RateDistortionModule
from hf_cifd.modules import EntropyBottleneck1d, Projector


def _train_rdm(rate_weight, x, steps=400, seed=0):
    torch.manual_seed(seed)
    rdm = RateDistortionModule(x.shape[1], hidden_dims=(32, 16, 32), rate_weight=rate_weight, distortion="mse")
    opt = torch.optim.Adam(rdm.parameters(), lr=3e-3)
    for _ in range(steps):
        out = rdm(x)
        loss = sum(rdm.loss(x, out).values())
        opt.zero_grad()
        loss.backward()
        opt.step()
    rdm.eval()
    with torch.no_grad():
        out = rdm(x)
        distortion = ((out.embedding - x) ** 2).sum(1).mean().item()
        rate = out.rate.mean().item()
    return rdm, distortion, rate


def test_higher_rate_weight_gives_lower_distortion_and_higher_rate():
    # The paper's Fig. 5 trend on fixed embeddings: 10x the rate weight R keeps more information.
    torch.manual_seed(0)
    x = torch.randn(256, 8) @ torch.randn(8, 8)
    _, d_low, r_low = _train_rdm(0.3, x)
    _, d_high, r_high = _train_rdm(3.0, x)
    assert d_high < d_low, (d_high, d_low)
    assert r_high > r_low, (r_high, r_low)


def test_rdm_output_shapes_and_rate_is_bits_per_sample():
    rdm = RateDistortionModule(12, hidden_dims=(16, 8, 16), num_classes=5)
    x = torch.randn(7, 12)
    out = rdm(x)
    assert out.embedding.shape == (7, 12) and out.logits.shape == (7, 5) and out.rate.shape == (7,)
    assert out.latent.shape == (7, 8)
    # Rate equals -log2 of the bottleneck likelihoods summed over the code's channels.
    rdm.eval()
    out = rdm(x)
    _, likelihoods = rdm.bottleneck.entropy_bottleneck(rdm.encoder(x).unsqueeze(-1), training=False)
    expected = -torch.log2(likelihoods).sum(dim=(1, 2))
    torch.testing.assert_close(out.rate, expected)


def test_eval_mode_rounds_around_medians_and_training_adds_bounded_noise():
    eb = EntropyBottleneck1d(4)
    y = torch.randn(64, 4) * 3
    eb.train()
    y_noisy, _ = eb(y)
    assert (y_noisy - y).abs().max() <= 0.5 and not torch.equal(y_noisy, y)
    eb.eval()
    y_hat, _ = eb(y)
    medians = eb.entropy_bottleneck.quantiles[:, 0, 1].detach()
    torch.testing.assert_close(y_hat, torch.round(y - medians) + medians)


def test_quantile_parameters_are_trained_by_the_aux_loss():
    torch.manual_seed(0)
    rdm = RateDistortionModule(6, hidden_dims=(8, 4, 8), rate_weight=1.0)
    x = torch.randn(32, 6)
    before = rdm.bottleneck.entropy_bottleneck.quantiles.detach().clone()
    opt = torch.optim.Adam(rdm.parameters(), lr=1e-2)
    terms = rdm.loss(x, rdm(x))
    assert "aux" in terms
    first_aux = terms["aux"].item()
    for _ in range(50):
        terms = rdm.loss(x, rdm(x))
        opt.zero_grad()
        sum(terms.values()).backward()
        assert rdm.bottleneck.entropy_bottleneck.quantiles.grad.abs().sum() > 0
        opt.step()
    assert not torch.equal(before, rdm.bottleneck.entropy_bottleneck.quantiles.detach())
    assert terms["aux"].item() < first_aux


@pytest.mark.parametrize("call_update", [False, True])
def test_rdm_save_load_roundtrip_gives_identical_eval_outputs(tmp_path, call_update):
    torch.manual_seed(0)
    rdm = RateDistortionModule(10, hidden_dims=(16, 8, 16), num_classes=3, rate_weight=5.0)
    x = torch.randn(5, 10)
    if call_update:
        assert rdm.update()
        assert rdm.bottleneck.entropy_bottleneck._quantized_cdf.numel() > 0
    rdm.eval()
    expected = rdm(x)
    rdm.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists() and (tmp_path / "config.json").exists()
    loaded = RateDistortionModule.from_pretrained(tmp_path).eval()
    got = loaded(x)
    for name in ("embedding", "rate", "latent", "logits"):
        torch.testing.assert_close(getattr(got, name), getattr(expected, name), rtol=0, atol=0)
    assert loaded.rate_weight == 5.0 and loaded.num_classes == 3
    if call_update:
        torch.testing.assert_close(loaded.bottleneck.entropy_bottleneck._quantized_cdf,
                                   rdm.bottleneck.entropy_bottleneck._quantized_cdf)


def test_ibm_eval_mode_is_identity_on_student_path_and_training_adds_noise_and_rate():
    torch.manual_seed(0)
    ibm = InformationBottleneck(6, {"teacher": 10}, decoder_layers=2)
    w = torch.randn(4, 6)
    ibm.eval()
    out = ibm(w)
    assert out.noisy is w and out.rate is None
    assert out.decoded["teacher"].shape == (4, 10)
    ibm.train()
    out = ibm(w)
    assert 0 < (out.noisy - w).abs().max() <= 0.5
    assert out.rate.shape == (4,) and torch.all(out.rate > 0)
    # The rate is differentiable w.r.t. the student embedding (it is what lambda_I penalises).
    w = w.clone().requires_grad_(True)
    ibm(w).rate.sum().backward()
    assert w.grad is not None and w.grad.abs().sum() > 0


def test_projector_widths():
    assert isinstance(Projector(4, 4, num_layers=0)[0], torch.nn.Identity)
    assert Projector(4, 9)(torch.randn(2, 4)).shape == (2, 9)
    assert Projector(4, 9, num_layers=2, hidden_dim=5)(torch.randn(2, 4)).shape == (2, 9)
    with pytest.raises(ValueError, match="equal widths"):
        Projector(4, 9, num_layers=0)


def test_bad_input_errors():
    rdm = RateDistortionModule(8, hidden_dims=(8, 8, 8))
    with pytest.raises(DistillationInputError, match=r"width 8"):
        rdm(torch.randn(3, 5))
    with pytest.raises(DistillationInputError, match="non-finite"):
        rdm(torch.tensor([[math.nan] * 8]))
    for bad in (-1.0, math.inf):
        with pytest.raises(DistillationInputError, match="rate_weight"):
            RateDistortionModule(8, rate_weight=bad)
    with pytest.raises(DistillationInputError, match="bottleneck_after"):
        RateDistortionModule(8, hidden_dims=(8, 8), bottleneck_after=3)
    with pytest.raises(DistillationInputError, match="IBM input"):
        InformationBottleneck(6, 10)(torch.randn(2, 7))


def test_rdm_without_rate_gives_the_same_reconstruction_in_eval_mode():
    torch.manual_seed(0)
    rdm = RateDistortionModule(10, hidden_dims=(16, 8, 16), num_classes=3).eval()
    x = torch.randn(6, 10)
    full, fast = rdm(x), rdm(x, with_rate=False)
    assert fast.rate is None
    for name in ("embedding", "latent", "logits"):
        torch.testing.assert_close(getattr(fast, name), getattr(full, name), rtol=0, atol=0)
    rdm.train()
    noisy = rdm(x, with_rate=False).latent
    assert 0 < (noisy - rdm.encoder(x)).abs().max() <= 0.5


def _edit_saved(path, drop=None, add=None, config=None):
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(path / "model.safetensors"))
    if drop:
        tensors.pop(drop)
    if add:
        tensors[add] = torch.zeros(2)
    save_file(tensors, str(path / "model.safetensors"))
    if config:
        cfg = json.loads((path / "config.json").read_text())
        cfg.update(config)
        (path / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("edit, named", [
    ({"drop": "decoder.0.weight"}, "missing tensor(s) ['decoder.0.weight']"),
    ({"add": "extra_head.weight"}, "unexpected tensor(s) ['extra_head.weight']"),
    ({"config": {"num_classes": 3}}, "missing tensor(s) ['head.bias', 'head.weight']"),  # config declares a head
    ({"config": {"extra_head_classes": 7}}, "config key(s) ['extra_head_classes']"),
])
def test_rdm_and_cnn_from_pretrained_are_strict(tmp_path, edit, named):
    from hf_cifd.models import SimpleCNN

    rdm_dir, cnn_dir = tmp_path / "rdm", tmp_path / "cnn"
    RateDistortionModule(10, hidden_dims=(16, 8, 16), num_classes=None).save_pretrained(rdm_dir)
    SimpleCNN(["C4", "MP", "FC8"], num_classes=3, input_size=8).save_pretrained(cnn_dir)
    cnn_edit = dict(edit)
    if "drop" in cnn_edit:
        cnn_edit["drop"] = "head.weight"
    if edit.get("config", {}).get("num_classes"):  # the CNN always has a head: a 5-class config vs 3-class weights
        cnn_edit["config"] = {"num_classes": 5}
    _edit_saved(rdm_dir, **edit)
    _edit_saved(cnn_dir, **cnn_edit)
    with pytest.raises(DistillationInputError, match=re.escape(named)):
        RateDistortionModule.from_pretrained(rdm_dir)
    cnn_named = {"decoder.0.weight": "missing tensor(s) ['head.weight']"}.get(edit.get("drop"), named)
    with pytest.raises((DistillationInputError, RuntimeError)) as err:
        SimpleCNN.from_pretrained(cnn_dir)
    if "num_classes" in edit.get("config", {}):
        assert "size mismatch for head.weight" in str(err.value)  # torch names the tensor of another width
    else:
        assert cnn_named in str(err.value)
    RateDistortionModule.from_pretrained(rdm_dir, strict=False)  # the documented opt-out still loads
