"""`hf-cifd cost`: training MACs per method (CIFD Fig. 1b, Table 1, D.2), counted on the meta device."""

import json

import pytest

from hf_cifd.cli import main
from hf_cifd.cost import CostSetup, image_model_macs, training_costs

# Table 8's 2-layer CNN at 32x32, by hand: conv 3->32 at 32x32 (3*9 MACs per output), conv 32->32 at 16x16,
# FC 32*8*8 -> 256, head 256 -> 100.
CNN2 = 32 * 32 * 27 * 32 + 16 * 16 * 288 * 32 + 2048 * 256 + 256 * 100
# 4-layer CNN: convs 3->32, 32->32 at 32x32, 32->64, 64->64 at 16x16, FC 64*8*8 -> 256, head.
CNN4 = 32 * 32 * (27 * 32 + 288 * 32) + 16 * 16 * (288 * 64 + 576 * 64) + 4096 * 256 + 256 * 100
# The same 2-layer CNN on Fashion-MNIST (28x28x1, 10 classes): conv 1->32 at 28x28 (9 MACs per output), conv 32->32
# at 14x14, FC 32*7*7 -> 256, head 256 -> 10.
CNN2_FMNIST = 28 * 28 * 9 * 32 + 14 * 14 * 288 * 32 + 1568 * 256 + 256 * 10


def test_model_macs_match_hand_counts():
    assert image_model_macs("cnn:cnn2", 32, 100) == (CNN2, 256)
    assert image_model_macs("cnn:cnn4", 32, 100) == (CNN4, 256)
    assert image_model_macs("cnn:cnn2", 28, 10, in_channels=1) == (CNN2_FMNIST, 256)


def test_cli_table1_at_fashion_mnist_size(tmp_path):
    out = tmp_path / "out.json"
    assert main(["cost", "--pair", "table1", "--image_size", "28", "--in_channels", "1", "--num_classes", "10",
                 "--train_samples", "1000", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["setup"]["in_channels"] == 1 and r["per_sample_macs"]["student"] == CNN2_FMNIST
    assert r["methods"]["kd"]["total_macs"] == 240 * 1000 * (r["per_sample_macs"]["teacher"] + CNN2_FMNIST)


def test_stage_totals_follow_the_conventions():
    n = 1000
    setup = CostSetup("cnn:cnn4", "cnn:cnn2", ["cnn:cnn4"], 32, 100, n, kd_epochs=10, student_epochs=8, rdm_epochs=3,
                      assistant_epochs=5, num_rdms=2, rdm="paper_cifar_cnn")
    r = training_costs(setup)
    m = r["per_sample_macs"]
    assert m["teacher"] == m["assistant_0"] == CNN4 and m["student"] == CNN2
    # Table 1's RDM on a 256-wide embedding: 256x512 + 512x306 + 306x100 + head 100x100
    assert m["rdm_frozen"] == 256 * 512 + 512 * 306 + 306 * 100 + 100 * 100
    kd, cifd = r["methods"]["kd"], r["methods"]["cifd"]
    assert kd["total_macs"] == 10 * n * (CNN4 + CNN2)
    assert cifd["stages_macs"]["rdms"] == 3 * n * (CNN4 + 2 * m["rdm_train"])
    assert cifd["stages_macs"]["student"] == 8 * n * (CNN4 + CNN2 + 2 * m["rdm_frozen"] + m["ibm"])
    assert r["methods"]["cifd_cached_teacher"]["stages_macs"]["teacher_cache"] == n * CNN4
    assert r["methods"]["takd"]["total_macs"] == 5 * n * 2 * CNN4 + 10 * n * (CNN4 + CNN2)
    assert r["methods"]["dgkd"]["total_macs"] == 5 * n * 2 * CNN4 + 10 * n * (2 * CNN4 + CNN2)
    assert cifd["relative_to_kd"] == pytest.approx(cifd["total_macs"] / kd["total_macs"])


def test_cli_imagenet_reproduces_cifd_1_08x_kd(tmp_path, capsys):
    out = tmp_path / "out.json"
    assert main(["cost", "--teacher", "timm:resnet34", "--student", "timm:resnet18", "--dataset", "imagenet",
                 "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    m = r["per_sample_macs"]
    # torchvision's published counts: ResNet34 3.66 GMACs, ResNet18 1.81 GMACs at 224 px; D.2's RDM 1.31 MMACs
    assert round(m["teacher"] / 1e9, 2) == 3.66 and round(m["student"] / 1e9, 2) == 1.81
    assert m["rdm_frozen"] == 3 * 512 * 512 + 512 * 1000
    methods = r["methods"]
    assert abs(methods["cifd"]["relative_to_kd"] - 1.08) <= 0.05
    # D.2: RDM stage 142 PMACs (4.7 with the cache), student stage 619 PMACs, CIFD 762 PMACs
    assert round(methods["cifd"]["stages_macs"]["rdms"] / 1e15) == 141
    assert round(methods["cifd_cached_teacher"]["stages_macs"]["teacher_cache"] / 1e15, 1) == 4.7
    assert round(methods["cifd"]["stages_macs"]["student"] / 1e15) == 618
    assert methods["takd"]["relative_to_kd"] > methods["cifd"]["relative_to_kd"]
    assert methods["dgkd"]["relative_to_kd"] > methods["takd"]["relative_to_kd"]
    assert "forward-pass MACs only" in r["conventions"]
    printed = capsys.readouterr().out
    assert "cifd" in printed and "x KD" in printed
