"""Sharing on the Hub (issue 11): what each upload sends, model cards, tokens, ``hf-cifd push`` and offline pushes.

No network exists here: huggingface_hub's ``create_repo`` / ``upload_folder`` are replaced by a recorder that lists
the files each upload would send (read from the folder at call time, as the real upload does)."""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import logging
import os
import subprocess
import sys

import numpy as np
import pytest
import timm
import torch

from hf_cifd import DistillationConfig, DistillationInputError, DistillationTrainer

from helpers import toy_dataset

FAKE_TOKEN = "hf_FAKEtokenDoNotLeak0123456789abcdef"


class HubRecorder:
    """Stands in for HfApi.create_repo / upload_folder; records the repo, the token and the exact files."""

    def __init__(self):
        self.repos, self.uploads = [], []

    def install(self, monkeypatch):
        from huggingface_hub import HfApi, constants

        recorder = self
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)

        def create_repo(api, repo_id, *args, token=None, **kwargs):
            from huggingface_hub import RepoUrl

            recorder.repos.append({"repo_id": repo_id, "token": token or api.token})
            return RepoUrl(f"https://huggingface.co/{repo_id}")

        def upload_folder(api, *, repo_id, folder_path, token=None, run_as_future=False, **kwargs):
            files = sorted(os.path.relpath(os.path.join(r, n), folder_path).replace(os.sep, "/")
                           for r, _, names in os.walk(folder_path) for n in names)
            recorder.uploads.append({"repo_id": repo_id, "files": files, "token": token or api.token,
                                     "readme": _read(os.path.join(folder_path, "README.md"))})
            if run_as_future:
                done = concurrent.futures.Future()
                done.set_result(None)
                return done
            return None

        monkeypatch.setattr(HfApi, "create_repo", create_repo)
        monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
        return self


def _read(path):
    return open(path, encoding="utf-8").read() if os.path.exists(path) else None


def _args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "out"), report_to=[], use_cpu=True, per_device_train_batch_size=8,
                learning_rate=0.05, max_steps=4, disable_tqdm=True, logging_steps=1, seed=0, method="kd")
    return DistillationConfig(**{**base, **kw})


def _timm_pair(num_classes=4):
    torch.manual_seed(0)
    teacher = timm.create_model("resnet10t", pretrained=False, num_classes=num_classes)
    student = timm.create_model("resnet10t", pretrained=False, num_classes=num_classes)
    return teacher, student


STUDENT_FILES = ["README.md", "config.json", "model.safetensors"]  # timm's format + the card


def test_push_to_hub_uploads_exactly_the_exported_student(tmp_path, monkeypatch):
    hub = HubRecorder().install(monkeypatch)
    out = tmp_path / "out"
    for junk in ("teacher_cache", "rdms", "teacher", "data"):  # what the recipes keep in output_dir
        (out / junk).mkdir(parents=True)
        (out / junk / "big.bin").write_bytes(b"x" * 64)
    ds = toy_dataset(16, num_classes=4, shape=(3, 16, 16))
    teacher, student = _timm_pair()
    args = _args(tmp_path, push_to_hub=True, hub_model_id="me/student", save_strategy="steps", save_steps=2,
                 eval_strategy="no")
    trainer = DistillationTrainer(student, teacher, args=args, train_dataset=ds, eval_dataset=ds)
    trainer.model_card_info.update(datasets=["uoft-cs/cifar100"], eval_split="test")
    trainer.train()
    metrics = trainer.evaluate()
    trainer.save_model(str(tmp_path / "student"))

    assert [r["repo_id"] for r in hub.repos] == ["me/student"]
    # Two checkpoint pushes (steps 2 and 4) and the final one: the student and its card, nothing else.
    assert len(hub.uploads) == 3, hub.uploads
    for upload in hub.uploads:
        assert upload["repo_id"] == "me/student" and upload["files"] == STUDENT_FILES
    assert (out / "checkpoint-2" / "training_args.bin").exists()  # the checkpoints exist, they were just not sent
    final = hub.uploads[-1]["readme"]
    assert f"value: {metrics['eval_accuracy']}" in final
    assert not os.path.exists(out / ".hub_staging")  # the blocking final push cleans up its staging folder

    # The card written with the export: model-index holds the run's accuracy, as a fraction computed independently.
    from huggingface_hub import ModelCard

    card = ModelCard.load(str(tmp_path / "student" / "README.md"))
    assert card.data.library_name == "timm" and card.data.pipeline_tag == "image-classification"
    assert card.data.datasets == ["uoft-cs/cifar100"] and "kd" in card.data.tags
    exported = timm.create_model(f"local-dir:{tmp_path / 'student'}", pretrained=True).eval()
    with torch.no_grad():
        x = torch.stack([ds[i]["pixel_values"] for i in range(len(ds))])
        y = np.array([int(ds[i]["labels"]) for i in range(len(ds))])
        expected = float(np.mean(exported(x).argmax(-1).numpy() == y))
    (accuracy,) = [r for r in card.data.eval_results if r.metric_type == "accuracy"]
    assert accuracy.metric_value == pytest.approx(expected) == pytest.approx(metrics["eval_accuracy"])
    assert 0.0 <= accuracy.metric_value <= 1.0
    assert (accuracy.task_type, accuracy.dataset_type, accuracy.dataset_split) == (
        "image-classification", "uoft-cs/cifar100", "test")
    assert 'timm.create_model("hf-hub:me/student", pretrained=True)' in card.text
    assert "https://github.com" not in card.content  # no made-up links


def test_hub_strategy_checkpoint_is_refused_and_offline_push_fails_before_training(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    with pytest.raises(DistillationInputError, match="hub_strategy=checkpoint.*every_save"):
        _args(tmp_path, push_to_hub=True, hub_strategy="checkpoint")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(DistillationInputError, match="HF_HUB_OFFLINE=1 is set"):
        _args(tmp_path, push_to_hub=True)


def test_hub_token_is_never_written_nor_printed(tmp_path, monkeypatch, caplog, capfd):
    hub = HubRecorder().install(monkeypatch)
    caplog.set_level(logging.DEBUG)
    ds = toy_dataset(16, num_classes=4, shape=(3, 16, 16))
    teacher, student = _timm_pair()
    args = _args(tmp_path, hub_token=FAKE_TOKEN, push_to_hub=True, hub_model_id="me/s", save_strategy="steps",
                 save_steps=2)
    trainer = DistillationTrainer(student, teacher, args=args, train_dataset=ds, eval_dataset=ds)
    trainer.train()
    trainer.evaluate()
    trainer.save_model(str(tmp_path / "out" / "student"))
    with open(tmp_path / "out" / "args.json", "w") as f:
        f.write(args.to_json_string())
    # The token reached the Hub calls (so pushes still authenticate) ...
    assert hub.repos[0]["token"] == FAKE_TOKEN and all(u["token"] == FAKE_TOKEN for u in hub.uploads)
    # ... and nothing else: no file under output_dir (binary files included), no log line, no repr.
    files = [os.path.join(r, n) for r, _, names in os.walk(tmp_path / "out") for n in names]
    assert any(f.endswith("training_args.bin") for f in files) and len(files) > 10
    for path in files:
        with open(path, "rb") as f:
            assert FAKE_TOKEN.encode() not in f.read(), path
    captured = capfd.readouterr()
    assert FAKE_TOKEN not in caplog.text + captured.out + captured.err
    assert FAKE_TOKEN not in repr(args) + str(args) + json.dumps(args.to_dict())
    # A checkpoint's pickled arguments still load (without the token), and a copy keeps it for pushing.
    import copy

    loaded = torch.load(str(tmp_path / "out" / "checkpoint-2" / "training_args.bin"), weights_only=False)
    assert loaded.hub_token is None and loaded.learning_rate == args.learning_rate
    assert copy.deepcopy(args).hub_token == FAKE_TOKEN and copy.copy(args).hub_token == FAKE_TOKEN


def _trained_rdms(tmp_path):
    from hf_cifd import train_rdms
    from hf_cifd.data import cache_teacher_outputs
    from hf_cifd.rdm_training import CacheKeysDataset

    from helpers import TinyNet

    ds = toy_dataset(48)
    torch.manual_seed(0)
    cache_teacher_outputs(TinyNet(embed_dim=12), ds, str(tmp_path / "cache"), dtype="float32", progress=False)
    from hf_cifd.data import TeacherCache

    cache = TeacherCache(str(tmp_path / "cache"))
    labels = {f"s{i}": int(ds[i]["labels"]) for i in range(len(ds))}
    train, held_out = CacheKeysDataset(cache, labels=labels).split(0.25, seed=0)
    return train_rdms(train, teacher_cache=cache, rates=[10.0, 1.0], eval_dataset=held_out, hidden_dims=[8, 8, 8],
                      max_steps=3, batch_size=16, output_dir=str(tmp_path / "rdms"), progress=False,
                      teacher_name="timm:resnet34.a1_in1k", teacher_hub_id="timm/resnet34.a1_in1k")


def test_rdm_cards_state_rate_bits_distortion_and_accuracy(tmp_path, monkeypatch):
    from huggingface_hub import ModelCard

    from hf_cifd import RateDistortionModule
    from hf_cifd.hub import load_rdms

    report = _trained_rdms(tmp_path)
    rows = json.loads((tmp_path / "rdms" / "rdm_metrics.json").read_text())["rdms"]
    for i, row in enumerate(rows):
        card = ModelCard.load(str(tmp_path / "rdms" / f"rdm-image-{i}" / "README.md"))
        assert card.data.library_name == "hf_cifd" and card.data.base_model == "timm/resnet34.a1_in1k"
        text = card.text
        assert f"| rate weight R | {row['rate_weight']:.6g} |" in text
        assert f"| bits / sample | {row['rate_bits']:.6g} |" in text
        assert f"| distortion | {row['distortion']:.6g} (smooth_l1) |" in text
        assert f"| accuracy | {row['accuracy']:.6g} |" in text and "`timm:resnet34.a1_in1k`" in text
    folder_card = ModelCard.load(str(tmp_path / "rdms" / "README.md"))
    assert "![rate vs accuracy of the RDMs](rd_curve.png)" in folder_card.text
    assert f"| rdm-image-1 | image | 1 | {rows[1]['rate_bits']:.6g} |" in folder_card.text

    # rdm.push_to_hub (huggingface_hub's mixin): the RDM's weights, config and card only.
    hub = HubRecorder().install(monkeypatch)
    report.rdms["image"][0].push_to_hub("me/rdm-r10")
    assert hub.uploads[-1]["files"] == ["README.md", "config.json", "model.safetensors"]
    assert "| bits / sample |" in hub.uploads[-1]["readme"]
    # --push_rdms_to_hub / hf-cifd push of the folder: the RDMs, their metrics, curve and cards; never the cache.
    from hf_cifd.hub import push_rdm_folder

    (tmp_path / "rdms" / "stray.pt").write_bytes(b"pickle")
    push_rdm_folder(str(tmp_path / "rdms"), "me/rdms")
    assert hub.uploads[-1]["files"] == sorted(
        ["README.md", "rd_curve.png", "rdm_metrics.json"]
        + [f"rdm-image-{i}/{f}" for i in range(2) for f in ("README.md", "config.json", "model.safetensors")])

    # --rdm_dir / load_rdms take a Hub repo id as well as a folder (the download is replaced by the local copy).
    import huggingface_hub

    calls = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download",
                        lambda repo_id, **kw: calls.append(repo_id) or str(tmp_path / "rdms"))
    loaded = load_rdms("me/rdms", 2)
    assert calls == ["me/rdms"] and [r.rate_weight for r in loaded] == [10.0, 1.0]
    x = torch.randn(3, 12)
    torch.testing.assert_close(loaded[1].eval()(x).embedding, report.rdms["image"][1].eval()(x).embedding)
    assert isinstance(loaded[0], RateDistortionModule)


def _cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "hf_cifd.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=300, env={**os.environ, **(env or {})})


def _checksums(folder):
    return {os.path.relpath(os.path.join(r, n), folder): hashlib.sha256(open(os.path.join(r, n), "rb").read()).hexdigest()
            for r, _, names in os.walk(folder) for n in names}


def _exported_student(tmp_path):
    from hf_cifd.adapters import adapter_for

    _, student = _timm_pair()
    folder = tmp_path / "run" / "student"
    adapter_for(student).save(student, str(folder))
    (folder / "README.md").write_text("---\nlibrary_name: timm\n---\n# card\n")
    return folder


def test_hf_cifd_push_sends_only_loadable_files_and_refuses_training_outputs(tmp_path, monkeypatch, capsys):
    from hf_cifd import cli

    hub = HubRecorder().install(monkeypatch)
    student = _exported_student(tmp_path)
    for junk in ("training_args.bin", "notes.pkl", "optimizer.pt"):
        (student / junk).write_bytes(b"junk")
    assert cli.main(["push", str(student), "--repo_id", "me/s"]) == 0
    assert hub.uploads[-1]["files"] == STUDENT_FILES
    # A training output folder (checkpoints, cache) and a checkpoint are refused, naming the folder to push.
    run = tmp_path / "run"
    (run / "checkpoint-2").mkdir()
    (run / "checkpoint-2" / "trainer_state.json").write_text("{}")
    (run / "checkpoint-2" / "model.safetensors").write_bytes(b"")
    n = len(hub.uploads)
    assert cli.main(["push", str(run), "--repo_id", "me/s"]) == 1
    err = capsys.readouterr().err
    assert "is a training output folder" in err and f"push {student} instead" in err
    assert cli.main(["push", str(run / "checkpoint-2"), "--repo_id", "me/s"]) == 1
    assert "is a Trainer checkpoint" in capsys.readouterr().err
    assert len(hub.uploads) == n


def test_hf_cifd_push_offline_is_one_line_and_changes_nothing(tmp_path):
    student = _exported_student(tmp_path)
    before = _checksums(tmp_path)
    out = _cli("push", student, "--repo_id", "me/s", env={"HF_HUB_OFFLINE": "1", "HF_TOKEN": FAKE_TOKEN})
    assert out.returncode != 0
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in out.stderr, out.stderr
    assert "HF_HUB_OFFLINE=1" in lines[0] and "unset" in lines[0] and FAKE_TOKEN not in out.stdout + out.stderr
    assert _checksums(tmp_path) == before


@pytest.mark.slow
def test_pipeline_pushes_only_the_student_stage_and_the_rdm_repo(tmp_path, monkeypatch):
    """`hf-cifd distill --push_to_hub --push_rdms_to_hub` on the CIFAR smoke setting: the Table 8 teacher is trained
    first (never pushed), the RDMs go to their own repo, the student (+ card) to its repo; nothing else is sent."""
    from huggingface_hub import ModelCard

    from hf_cifd.pipeline import main

    hub = HubRecorder().install(monkeypatch)
    out = tmp_path / "run"
    results = main(["--smoke", "--teacher", "cnn:cnn10", "--student", "cnn:cnn2", "--output_dir", str(out),
                    "--max_steps", "2", "--teacher_max_steps", "2", "--push_to_hub", "--hub_model_id", "me/cnn2-cifd",
                    "--push_rdms_to_hub", "me/cnn10-rdms", "--cache_dtype", "float32"])  # 2-step teacher: fp16 may overflow
    assert results["teacher_training_steps"] == 2 and (out / "teacher" / "model.safetensors").exists()
    assert sorted(r["repo_id"] for r in hub.repos) == ["me/cnn10-rdms", "me/cnn2-cifd"]
    assert [u["repo_id"] for u in hub.uploads] == ["me/cnn10-rdms", "me/cnn2-cifd"]
    rdm_upload, student_upload = hub.uploads
    assert rdm_upload["files"] == sorted(
        ["README.md", "rd_curve.png", "rdm_metrics.json"]
        + [f"rdm-image-{i}/{f}" for i in range(3) for f in ("README.md", "config.json", "model.safetensors")])
    assert student_upload["files"] == ["README.md", "config.json", "model.safetensors"]
    card = ModelCard.load(str(out / "student" / "README.md"))
    assert card.data.library_name == "hf_cifd" and card.data.base_model is None  # a teacher trained here
    assert card.data.datasets is None  # generated local shards are no Hub dataset
    (accuracy,) = [r for r in card.data.eval_results if r.metric_type == "accuracy"]
    assert accuracy.metric_value == pytest.approx(results["eval_accuracy"])
    assert "| R | bits / sample | distortion | accuracy |" in card.text and "`cnn:cnn10`" in card.text


def test_clip_student_card_holds_zero_shot_and_retrieval_as_fractions(tmp_path):
    from huggingface_hub import ModelCard

    from hf_cifd.hub import model_hub_id, student_model_card

    metrics = {"eval_loss": 1.5, "eval_zeroshot_top1": 47.9, "eval_zeroshot_top5": 100.0,
               "eval_zeroshot_chance_top1": 4.17, "eval_image_retrieval_recall@1": 5.5}
    teacher = "open_clip:ViT-L-14@openai"
    card = student_model_card(model_name="vits16-cifd", library="open_clip", task="clip", method="cifd",
                              settings={"lambda_cl": 0.005}, metrics=metrics, teacher=teacher,
                              teacher_hub_id=model_hub_id(None, teacher), datasets=["pixparse/cc12m-wds"],
                              repo_id="me/vits16-cifd")
    card.save(str(tmp_path / "README.md"))
    loaded = ModelCard.load(str(tmp_path / "README.md"))
    assert loaded.data.pipeline_tag == "zero-shot-image-classification" and loaded.data.library_name == "open_clip"
    assert loaded.data.base_model == "timm/vit_large_patch14_clip_224.openai"  # open_clip's own pretrained config
    values = {r.metric_name: r.metric_value for r in loaded.data.eval_results}
    assert values == {"zero-shot top1": pytest.approx(0.479), "zero-shot top5": pytest.approx(1.0),
                      "image retrieval recall@1": pytest.approx(0.055), "distillation loss": 1.5}
    assert 'open_clip.create_model_and_transforms("hf-hub:me/vits16-cifd")' in loaded.text
    assert model_hub_id(None, "open_clip:ViT-S-16") is None and model_hub_id(None, "timm:resnet18", False) is None
