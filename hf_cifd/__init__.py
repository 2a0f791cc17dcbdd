"""hf_cifd: knowledge distillation for the Hugging Face ecosystem (CIFD, InDistill, Comparative KD).

Public names are imported lazily so that ``import hf_cifd`` stays cheap (transformers, compressai and
open_clip each cost seconds to import).
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "DistillationConfig": "hf_cifd.config",
    "DistillationTrainer": "hf_cifd.trainer",
    "DistillationModel": "hf_cifd.trainer",
    "RateDistortionModule": "hf_cifd.modules.rdm",
    "RDMOutput": "hf_cifd.modules.rdm",
    "InformationBottleneck": "hf_cifd.modules.ibm",
    "IBMOutput": "hf_cifd.modules.ibm",
    "Projector": "hf_cifd.modules.projector",
    "EntropyBottleneck1d": "hf_cifd.modules.bottleneck",
    "train_rdms": "hf_cifd.rdm_training",
    "train_assistants": "hf_cifd.assistants",
    "table8_assistants": "hf_cifd.assistants",
    "train_auxiliary_teacher": "hf_cifd.assistants",
    "adapter_for": "hf_cifd.adapters",
    "DistillationInputError": "hf_cifd.checks",
    "NonFiniteLossError": "hf_cifd.checks",
    "losses": "hf_cifd.losses",
    "SimpleCNN": "hf_cifd.models",
    "RecipeArguments": "hf_cifd.pipeline",
    "run_classification": "hf_cifd.pipeline",
    "load_model": "hf_cifd.pipeline",
    "cache_teacher_outputs": "hf_cifd.data",
    "TeacherCache": "hf_cifd.data",
    "load_image_dataset": "hf_cifd.data",
    "evaluate_clip": "hf_cifd.eval.clip",
    "CLIPEvaluator": "hf_cifd.eval.clip",
    "train_validation_split": "hf_cifd.hpo",
    "default_hp_space": "hf_cifd.hpo",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'hf_cifd' has no attribute {name!r}")
    module = importlib.import_module(_EXPORTS[name])
    return module if name == "losses" else getattr(module, name)


def __dir__():
    return __all__
