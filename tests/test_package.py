"""The installed package imports cleanly, public names resolve, and the environment is consistent (numpy / pyarrow /
compressai / transformers.Trainer: the known conflict a naive install falls into)."""

import importlib
import pkgutil
import subprocess
import sys

import pytest

import hf_cifd


def test_every_module_imports():
    names = [m.name for m in pkgutil.walk_packages(hf_cifd.__path__, "hf_cifd.")]
    assert "hf_cifd.trainer" in names and "hf_cifd.losses" in names
    for name in names:
        importlib.import_module(name)


def test_public_names_resolve():
    for name in hf_cifd.__all__:
        assert getattr(hf_cifd, name) is not None, name
    with pytest.raises(AttributeError):
        hf_cifd.not_a_name


def test_trainer_stack_imports_in_a_fresh_interpreter():
    # pyarrow >= 25 refuses numpy 1.x (which compressai pins): `from transformers import Trainer` would fail.
    code = ("import numpy, pyarrow, datasets, compressai, open_clip, timm, evaluate; "
            "from transformers import Trainer; from hf_cifd import DistillationTrainer; print(numpy.__version__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]


def test_cli_help_lists_subcommands():
    out = subprocess.run([sys.executable, "-m", "hf_cifd.cli", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0
    for command in ("demo", "cache-teacher", "train-rdms", "distill", "eval", "push"):
        assert command in out.stdout
