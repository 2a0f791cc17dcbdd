"""Models by id (issue 11, acceptance 5): a tiny random transformers image classifier saved to a local folder distils
end to end through ``hf:<dir>`` (``hf-cifd distill``), and the exported student runs in
``transformers.pipeline("image-classification")``; a string teacher works in DistillationTrainer."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch


def _save_tiny_resnet(path, hidden_sizes, seed):
    from transformers import ConvNextImageProcessor, ResNetConfig, ResNetForImageClassification

    torch.manual_seed(seed)
    config = ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=hidden_sizes, depths=[1, 1],
                          layer_type="basic", num_labels=24)
    ResNetForImageClassification(config).save_pretrained(path)
    ConvNextImageProcessor(size={"shortest_edge": 40}, crop_pct=1.0).save_pretrained(path)  # resized to 32 below
    return str(path)


@pytest.mark.slow
def test_hf_models_distil_end_to_end_and_the_student_runs_in_a_pipeline(tmp_path):
    from PIL import Image
    from transformers import AutoImageProcessor, AutoModelForImageClassification, pipeline

    from hf_cifd.pipeline import main

    teacher = _save_tiny_resnet(tmp_path / "teacher", [16, 32], seed=0)
    student = _save_tiny_resnet(tmp_path / "student_init", [8, 16], seed=1)
    out = tmp_path / "out"
    results = main(["--smoke", "--teacher", f"hf:{teacher}", "--student", f"hf:{student}", "--method", "kd",
                    "--num_rdms", "0", "--output_dir", str(out), "--max_steps", "3"])
    assert results["global_steps"] == 3 and 0.0 <= results["eval_accuracy"] <= 1.0
    exported = out / "student"
    saved = json.loads((exported / "preprocessor_config.json").read_text())
    assert saved["size"] == {"shortest_edge": 32}  # the run's --image_size (smoke: 32), carried by the processor

    classifier = pipeline("image-classification", model=str(exported), top_k=3)
    image = Image.fromarray((np.random.default_rng(0).random((48, 40, 3)) * 255).astype(np.uint8))
    predictions = classifier(image)
    assert len(predictions) == 3 and all(p["label"].startswith("LABEL_") for p in predictions)
    # The pipeline's top-1 is the exported model's argmax on the processor's input.
    model = AutoModelForImageClassification.from_pretrained(str(exported)).eval()
    processor = AutoImageProcessor.from_pretrained(str(exported))
    with torch.no_grad():
        logits = model(**processor(image, return_tensors="pt")).logits
    assert predictions[0]["label"] == model.config.id2label[int(logits.argmax(-1))]
    assert predictions[0]["score"] == pytest.approx(float(logits.softmax(-1).max()), rel=1e-4)
    card = (exported / "README.md").read_text()
    assert "library_name: transformers" in card and "pipeline_tag: image-classification" in card


def test_string_teacher_is_loaded_through_its_adapter(tmp_path):
    import timm

    from hf_cifd import DistillationConfig, DistillationTrainer
    from hf_cifd.adapters import adapter_for

    from helpers import toy_dataset

    teacher_dir = _save_tiny_resnet(tmp_path / "teacher", [16, 32], seed=0)
    student = timm.create_model("resnet10t", pretrained=False, num_classes=24)
    args = DistillationConfig(output_dir=str(tmp_path / "out"), method="kd", max_steps=1, report_to=[], use_cpu=True,
                              per_device_train_batch_size=4, disable_tqdm=True)
    trainer = DistillationTrainer(student, f"hf:{teacher_dir}", args=args,
                                  train_dataset=toy_dataset(8, num_classes=24, shape=(3, 32, 32)))
    assert adapter_for(trainer.teacher).library == "transformers" and trainer.teacher.config.num_labels == 24
    assert not trainer.teacher.training and not any(p.requires_grad for p in trainer.teacher.parameters())
    assert trainer.model_card_info["teacher"] == f"hf:{teacher_dir}"
    assert trainer.model_card_info["base_model"] is None  # a local folder is no Hub repo
    trainer.train()
    assert trainer.teacher_calls == 4
