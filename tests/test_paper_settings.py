"""README "Paper setting vs recipe default" (issue 12): every cell equals what the recipe's parser gives by default,
and every paper knob of each recipe's YAML is in the table."""

import os
import re

import pytest
import yaml

from hf_cifd.recipe_args import load_yaml_config, recipe_config_path

from test_recipe_args import ROOT, _parse

RECIPES = ["imagenet_r34_to_r18", "imagenet_r50_to_mbv1", "cifar100_cnn10_to_cnn2", "clip_vitl_to_vits"]
# YAML keys that are where / how a run executes, not a paper setting.
OPERATIONAL = {"output_dir", "dataset", "eval_split", "num_train_samples", "per_device_eval_batch_size",
               "dataloader_num_workers", "logging_steps", "save_steps", "save_strategy", "save_total_limit",
               "image_column", "label_column", "streaming", "num_classes", "teacher_pretrained", "zeroshot_dataset",
               "retrieval_dataset", "optim_args", "lr_milestones", "lr_gamma", "use_ibm", "epochs",
               "samples_per_epoch", "rdm_samples_per_epoch"}


def readme_table():
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    section = text.split("### Paper setting vs recipe default", 1)[1]
    lines = [l for l in section.splitlines() if l.startswith("|")]
    header = [c.strip().strip("`") for c in lines[0].strip("|").split("|")]
    assert header[:2] == ["flag", "paper"] and header[2:] == RECIPES
    rows = {}
    for line in lines[2:]:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != len(header):  # the first table after the section ends it
            break
        rows[cells[0].strip("`")] = dict(zip(RECIPES, cells[2:]))
    return rows


def _value(cell):
    match = re.match(r"`([^`]*)`", cell)
    if match is None:
        return None if cell.startswith("—") else pytest.fail(f"cell {cell!r} has no `value`")
    raw = match.group(1)
    if raw == "None":
        return None
    value = yaml.safe_load(raw)
    try:  # YAML 1.1 reads 5e-05 as a string
        return float(value) if isinstance(value, str) else value
    except ValueError:
        return value


def _same(actual, expected):
    actual = getattr(actual, "value", actual)  # enums (optim, lr_scheduler_type)
    if isinstance(expected, list):
        return isinstance(actual, (list, tuple)) and len(actual) == len(expected) and all(
            _same(a, e) for a, e in zip(actual, expected))
    if isinstance(expected, (int, float)) and not isinstance(expected, bool):
        return isinstance(actual, (int, float)) and actual == pytest.approx(expected)
    return actual == expected


@pytest.mark.parametrize("recipe", RECIPES)
def test_readme_table_matches_the_recipe_defaults(recipe):
    rows = readme_table()
    args, config = _parse(recipe, [])
    checked = 0
    for flag, cells in rows.items():
        cell = cells[recipe]
        owner = args if hasattr(args, flag) else config if hasattr(config, flag) else None
        if cell.startswith("—"):
            assert owner is None, f"{recipe}: README says {flag} does not apply, but the recipe has it"
            continue
        assert owner is not None, f"{recipe} has no flag {flag}"
        expected, actual = _value(cell), getattr(owner, flag)
        assert _same(actual, expected), f"{recipe}: README says {flag} = {expected!r}, the recipe gives {actual!r}"
        checked += 1
    assert checked >= 20
    yaml_keys = set(load_yaml_config(recipe_config_path(os.path.join(ROOT, "recipes", f"{recipe}.py"))))
    missing = yaml_keys - OPERATIONAL - set(rows)
    assert not missing, f"{recipe}: paper settings of the YAML missing from the README table: {sorted(missing)}"


def test_the_table_holds_the_papers_key_settings():
    rows = readme_table()
    assert _value(rows["teacher"]["clip_vitl_to_vits"]) == "open_clip:ViT-L-14@datacomp_xl_s13b_b90k"
    assert _value(rows["teacher"]["imagenet_r34_to_r18"]).endswith(".tv_in1k")
    assert _value(rows["num_rdms"]["clip_vitl_to_vits"]) == 1
    assert _value(rows["rdm_architecture"]["cifar100_cnn10_to_cnn2"]) == "paper_cifar_cnn"
    assert _value(rows["label_smoothing_factor"]["imagenet_r34_to_r18"]) == 0.1
