"""Recipe command lines (issue 11, acceptance 1): the recipe's YAML, ``--smoke`` and ``--config`` are defaults; every
flag the user gives wins, in every form argparse knows."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest

from hf_cifd import DistillationInputError
from hf_cifd.recipe_args import load_yaml_config, recipe_config_path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASSIFICATION = ["imagenet_r34_to_r18", "imagenet_r50_to_mbv1", "cifar100_cnn10_to_cnn2"]
RECIPES = CLASSIFICATION + ["clip_vitl_to_vits"]


def _parse(recipe: str, argv: list[str]):
    """What ``python recipes/<recipe>.py ARGV`` parses (the same call its main() makes)."""
    path = os.path.join(ROOT, "recipes", f"{recipe}.py")
    if recipe in CLASSIFICATION:
        from hf_cifd.pipeline import parse_classification_args

        spec = importlib.util.spec_from_file_location(f"recipe_{recipe}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return parse_classification_args(recipe_config_path(path), module.SMOKE, argv)
    from hf_cifd.clip_pipeline import parse_clip_args

    return parse_clip_args(recipe_config_path(path), argv)


@pytest.mark.parametrize("recipe", RECIPES)
def test_every_flag_form_wins_over_the_recipe_defaults(recipe, tmp_path):
    yaml_defaults = load_yaml_config(recipe_config_path(os.path.join(ROOT, "recipes", f"{recipe}.py")))
    args, config = _parse(recipe, [])
    # The shipped YAML is what runs by default.
    assert config.use_ibm is True and config.output_dir == yaml_defaults["output_dir"]
    assert config.learning_rate == pytest.approx(float(yaml_defaults["learning_rate"]))
    assert config.rdm_epochs == pytest.approx(float(yaml_defaults["rdm_epochs"]))
    assert not args.smoke

    assert _parse(recipe, ["--no_use_ibm"])[1].use_ibm is False
    assert _parse(recipe, ["--use_ibm=false"])[1].use_ibm is False
    assert _parse(recipe, ["--use_ibm", "false"])[1].use_ibm is False
    assert _parse(recipe, ["--output_dir=/x"])[1].output_dir == "/x"
    assert _parse(recipe, ["--learning_r", "0.123"])[1].learning_rate == 0.123  # unique abbreviation
    assert _parse(recipe, ["--learning_r=0.125"])[1].learning_rate == 0.125
    assert _parse(recipe, ["--num_rdms", "3", "--rdm_rates", "7", "5", "3"])[1].rdm_rates == [7.0, 5.0, 3.0]

    # --config: a YAML of any flags overrides the recipe; a flag on the command line overrides the YAML.
    cfg = tmp_path / "my.yaml"
    cfg.write_text("learning_rate: 0.5\nuse_ibm: false\nnum_rdms: 3\nrdm_rates: [1e3, 1e2, 1e1]\nseed: 7\n")
    args, config = _parse(recipe, ["--config", str(cfg)])
    assert (config.learning_rate, config.use_ibm, config.rdm_rates, config.seed) == (0.5, False, [1e3, 1e2, 1e1], 7)
    args, config = _parse(recipe, [f"--config={cfg}", "--learning_rate", "0.25", "--use_ibm", "true"])
    assert (config.learning_rate, config.use_ibm, config.seed) == (0.25, True, 7)

    # --smoke is a real boolean: `--smoke false` applies none of the smoke settings.
    args, config = _parse(recipe, ["--smoke", "false"])
    assert not args.smoke and config.max_steps == _parse(recipe, [])[1].max_steps and not config.use_cpu
    args, config = _parse(recipe, ["--smoke"])
    assert args.smoke and config.use_cpu and config.max_steps > 0
    # Smoke settings are defaults too: the user's flag and --config still win over them.
    args, config = _parse(recipe, ["--smoke", "--max_steps", "2", "--config", str(cfg)])
    assert config.max_steps == 2 and config.learning_rate == 0.5


def test_smoke_and_yaml_layers_of_a_classification_recipe(tmp_path):
    args, config = _parse("imagenet_r34_to_r18", ["--smoke"])
    assert (args.teacher, args.student, args.image_size, args.num_classes) == ("timm:resnet34", "timm:resnet18", 32, 24)
    assert not args.teacher_pretrained and config.per_device_train_batch_size == 8
    args, config = _parse("imagenet_r34_to_r18", [])
    assert (args.teacher, config.optim, config.optim_args, config.warmup_steps) == (
        "timm:resnet34.tv_in1k", "sgd", "momentum=0.9", pytest.approx(2 / 88))
    assert config.rdm_rates == [1e4, 5e3, 1e3] and args.rdm_activation_after == [1, 3]
    assert _parse("imagenet_r50_to_mbv1", [])[0].rdm_architecture == "paper_imagenet"  # 1024 wide for a 2048 embedding
    args, config = _parse("cifar100_cnn10_to_cnn2", [])
    assert args.lr_milestones == [150.0, 160.0, 180.0] and args.train_teacher is None and not args.streaming


def test_bad_config_files_fail_loudly(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("learning_rat: 0.5\n")  # a typo must not be silently ignored
    with pytest.raises(DistillationInputError, match="unknown flag.*learning_rat"):
        _parse("imagenet_r34_to_r18", ["--config", str(bad)])
    with pytest.raises(DistillationInputError, match="no such file"):
        _parse("imagenet_r34_to_r18", ["--config", str(tmp_path / "missing.yaml")])
    with pytest.raises(SystemExit):  # argparse: ambiguous abbreviation
        _parse("imagenet_r34_to_r18", ["--lambda", "1"])


def test_recipe_help_lists_each_knob_with_its_recipe_default():
    out = subprocess.run([sys.executable, "recipes/imagenet_r34_to_r18.py", "--help"], cwd=ROOT, capture_output=True,
                         text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    text = " ".join(out.stdout.split())
    for flag, default in (("--learning_rate", "2.0"), ("--teacher", "timm:resnet34.tv_in1k"), ("--lambda_ibm", "0.001"),
                          ("--rdm_rates", "[10000.0, 5000.0, 1000.0]"), ("--config", "None")):
        assert flag in text and f"(default: {default})" in text, flag
