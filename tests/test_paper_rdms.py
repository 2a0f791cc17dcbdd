"""The paper's RDM architectures (CIFD A.1.1, A.2, D.2) and the IBM decoder default (issue 12)."""

import copy

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from hf_cifd import DistillationConfig, DistillationInputError, DistillationTrainer, RateDistortionModule

from helpers import TinyNet, toy_dataset


def _macs(module, *args, **kwargs):
    with FlopCounterMode(display=False) as counter:
        module(*args, **kwargs)
    return counter.get_total_flops() // 2, {str(k): v // 2 for k, v in counter.get_flop_counts()["Global"].items()}


def test_resnet34_rdm_is_the_papers_three_layers_and_1_31_mmacs():
    rdm = RateDistortionModule.paper_imagenet(512, 1000).eval()
    linears = [m for m in rdm.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(512, 512), (512, 512), (512, 512), (512, 1000)]
    # activation after the 1st and 3rd hidden layers only; the 3rd layer's (activated) output is X^
    assert [type(m).__name__ for m in rdm.encoder] == ["Linear", "ReLU", "Linear"]
    assert [type(m).__name__ for m in rdm.decoder] == ["Linear", "ReLU"]
    x = torch.randn(1, 512)
    out = rdm(x)
    assert out.embedding.shape == (1, 512) and (out.embedding >= 0).all() and out.logits.shape == (1, 1000)
    linear_macs, ops = _macs(rdm, x, with_rate=False)
    assert linear_macs == 3 * 512 * 512 + 512 * 1000 == 1_298_432 and set(ops) == {"aten.addmm"}
    total, ops = _macs(rdm, x)
    density = ops["aten.baddbmm"]  # the factorized density (modules/density.py), evaluated at y + 1/2 and y - 1/2: 2 x 33 MACs per channel
    assert density == 2 * 33 * 512 and total == linear_macs + density
    # D.2's "1.31 MMACs" = the layers + one evaluation of the density model (~17k): 1.315 M, which D.2 truncates
    assert linear_macs + density // 2 == 1_315_328 and int((linear_macs + density // 2) / 1e4) == 131


def test_resnet50_rdm_is_1024_wide():
    rdm = RateDistortionModule.paper_imagenet(2048, 1000)
    linears = [(m.in_features, m.out_features) for m in rdm.modules() if isinstance(m, nn.Linear)]
    assert linears == [(2048, 1024), (1024, 1024), (1024, 2048), (2048, 1000)] and rdm.bottleneck_dim == 1024


def test_table1_rdm_without_reconstruction_trains_and_its_rate_falls():
    torch.manual_seed(0)
    rdm = RateDistortionModule.paper_cifar_cnn(embed_dim=512, num_classes=100)
    linears = [(m.in_features, m.out_features) for m in rdm.modules() if isinstance(m, nn.Linear)]
    assert linears == [(512, 512), (512, 306), (306, 100), (100, 100)] and rdm.bottleneck_dim == 306
    assert rdm.rate_weight == 0.0 and rdm.reconstruction == "none"
    # a teacher: a fixed random embedding per class plus noise; labels = its class
    centres = torch.randn(100, 512) * 3
    g = torch.Generator().manual_seed(1)
    y = torch.randint(0, 100, (512,), generator=g)
    x = centres[y] + torch.randn(512, 512, generator=g)
    opt = torch.optim.Adam(rdm.parameters(), lr=1e-3)

    def held_out_rate():
        rdm.eval()
        with torch.no_grad():
            out = rdm(x[:128])
        rdm.train()
        return out.rate.mean().item(), (out.logits.argmax(-1) == y[:128]).float().mean().item()

    rate0, _ = held_out_rate()
    for step in range(150):
        i = torch.randint(0, 512, (64,), generator=g)
        out = rdm(x[i])
        assert out.embedding is None
        terms = rdm.loss(x[i], out, labels=y[i])
        assert "distortion" not in terms and set(terms) == {"rate", "ce", "aux"}
        opt.zero_grad()
        sum(terms.values()).backward()
        opt.step()
    rate1, acc1 = held_out_rate()
    assert rate1 < 0.8 * rate0, (rate0, rate1)
    assert acc1 > 0.5  # chance: 1 %


def test_reconstruction_checks_and_old_configs_still_load(tmp_path):
    with pytest.raises(DistillationInputError, match="rate_weight \\(R\\) must be 0"):
        RateDistortionModule(16, hidden_dims=(8, 4, 8), num_classes=3, rate_weight=1.0, reconstruction="none")
    with pytest.raises(DistillationInputError, match="give num_classes"):
        RateDistortionModule(16, hidden_dims=(8, 4, 8), rate_weight=0.0, reconstruction="none")
    with pytest.raises(DistillationInputError, match="must be the embedding width 16"):
        RateDistortionModule(16, hidden_dims=(8, 4, 8), reconstruction="last_hidden")
    # an RDM saved before the `reconstruction` argument existed (config without it) loads as the 4-layer kind
    old = RateDistortionModule(16, hidden_dims=(8, 4, 8), num_classes=3)
    old.save_pretrained(tmp_path / "old")
    import json

    cfg_path = tmp_path / "old" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.pop("reconstruction")
    cfg_path.write_text(json.dumps(cfg))
    loaded = RateDistortionModule.from_pretrained(str(tmp_path / "old"))
    assert loaded.reconstruction == "linear"
    x = torch.randn(3, 16)
    torch.testing.assert_close(loaded.eval()(x).logits, old.eval()(x).logits)
    paper = RateDistortionModule.paper_imagenet(16, 3, hidden_dim=8)
    paper.save_pretrained(tmp_path / "paper")
    again = RateDistortionModule.from_pretrained(str(tmp_path / "paper"))
    assert again.reconstruction == "last_hidden"
    torch.testing.assert_close(again.eval()(x).embedding, paper.eval()(x).embedding)


def _args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "out"), report_to=[], use_cpu=True, save_strategy="no",
                per_device_train_batch_size=8, learning_rate=0.1, optim="sgd", disable_tqdm=True, max_steps=2,
                logging_steps=1, seed=0, method="cifd")
    base.update(kw)
    return DistillationConfig(**base)


def test_cifd_with_rdms_without_reconstruction_guides_through_logits_only(tmp_path):
    torch.manual_seed(0)
    rdms = [RateDistortionModule(12, hidden_dims=(16, 8, 6), num_classes=4, rate_weight=0.0, reconstruction="none")
            for _ in range(2)]
    args = _args(tmp_path, num_rdms=2, rdm_rates=[0.0, 0.0])
    trainer = DistillationTrainer(model=TinyNet(), teacher=TinyNet(embed_dim=12), args=args, train_dataset=toy_dataset(16),
                                  rdms=rdms)
    trainer.train()
    logged = trainer.state.log_history[0]
    assert {"loss/kd_rdm_0", "loss/kd_rdm_1", "loss/emb_teacher"} <= set(logged)
    assert not any(k.startswith("loss/emb_rdm") for k in logged)


def test_ibm_decoder_is_the_identity_when_widths_match(tmp_path):
    ds = toy_dataset(16)
    same = DistillationTrainer(model=TinyNet(embed_dim=12), teacher=TinyNet(embed_dim=12),
                               args=_args(tmp_path, num_rdms=0), train_dataset=ds)
    decoder = same.model.ibms["image"].decoders["teacher"]
    assert [type(m) for m in decoder] == [nn.Identity]
    other = DistillationTrainer(model=TinyNet(embed_dim=8), teacher=TinyNet(embed_dim=12),
                                args=_args(tmp_path, num_rdms=0), train_dataset=ds)
    assert [type(m) for m in other.model.ibms["image"].decoders["teacher"]] == [nn.Linear]
    with pytest.raises(DistillationInputError, match="ibm_decoder_layers=0 \\(identity\\) needs equal widths"):
        DistillationTrainer(model=TinyNet(embed_dim=8), teacher=TinyNet(embed_dim=12),
                            args=_args(tmp_path, num_rdms=0, ibm_decoder_layers=0), train_dataset=ds)


def test_train_rdms_reports_no_distortion_for_rdms_without_reconstruction():
    from hf_cifd import train_rdms

    rdms = [RateDistortionModule(12, hidden_dims=(16, 8, 6), num_classes=4, rate_weight=0.0, reconstruction="none"),
            RateDistortionModule.paper_imagenet(12, 4, hidden_dim=8, rate_weight=2.0)]
    report = train_rdms(toy_dataset(16), teacher=TinyNet(embed_dim=12), rdms=rdms, max_steps=2, batch_size=8,
                        progress=False)
    assert report.metrics[0]["distortion"] is None and report.metrics[0]["accuracy"] is not None
    assert report.metrics[1]["distortion"] > 0 and report.metrics[0]["rate_bits"] > 0


def test_train_rdms_builds_the_named_paper_architectures():
    from hf_cifd import train_rdms

    report = train_rdms(toy_dataset(16), teacher=TinyNet(embed_dim=12), rates=[0.0, 0.0], architecture="paper_cifar_cnn",
                        max_steps=1, batch_size=8, progress=False)
    rdm = report.rdms["image"][0]
    assert rdm.reconstruction == "none" and rdm.bottleneck_dim == 306 and rdm.head.out_features == 4
    report = train_rdms(toy_dataset(16), teacher=TinyNet(embed_dim=12), rates=[5.0], architecture="paper_imagenet",
                        max_steps=1, batch_size=8, progress=False)
    assert report.rdms["image"][0].reconstruction == "last_hidden" and report.rdms["image"][0].rate_weight == 5.0
    with pytest.raises(DistillationInputError, match="architecture must be one of"):
        train_rdms(toy_dataset(16), teacher=TinyNet(embed_dim=12), rates=[1.0], architecture="big", max_steps=1)
