"""Sharing on the Hugging Face Hub: model cards, staging of exactly the files a user can load, uploads, RDM repos.

* Cards (:func:`student_model_card`, :func:`rdm_model_card`, :func:`rdm_collection_card`): ``ModelCardData`` with
  ``library_name``, ``pipeline_tag``, ``base_model`` (the teacher, when it is a Hub id), ``datasets``, tags and a
  ``model-index`` of the run's metrics (accuracies as fractions, the Hub convention); the body says how to load the
  model in its own library, the method and its settings, RDM rates and teacher calls. Written with every export.
* Staging (:func:`stage_export`): an exported student or RDM folder -> a clean folder holding only its weights
  (safetensors), configs, processor / tokenizer files and card. Checkpoints, caches, ``training_args.bin``, teachers,
  data and RDMs never leave the machine with a student.
* Uploads (:func:`upload_folder`, :func:`push_folder`, :func:`push_rdm_folder`): ``create_repo`` + ``upload_folder``;
  an offline or unreachable Hub, or a missing login, is one :class:`HubUnavailableError` line naming the fix.
* RDMs by Hub id (:func:`resolve_rdm_dir`, :func:`load_rdms`): ``--rdm_dir`` takes a folder or a repo id.

Tokens: functions take ``token=None`` (huggingface_hub then uses ``HF_TOKEN`` / ``hf auth login``); no token is
written to a card, a file or a log.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import os
import shutil
from typing import Any, Iterable, Mapping, Sequence

from .checks import DistillationInputError

logger = logging.getLogger(__name__)

# Files of an exported model: weights (safetensors only), configs, processor / tokenizer files, the card.
EXPORT_PATTERNS = ("*.safetensors", "*.safetensors.index.json", "config.json", "open_clip_config.json",
                   "preprocessor_config.json", "processor_config.json", "image_processor_config.json",
                   "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "vocab.json", "vocab.txt", "merges.txt", "spiece.model",
                   "sentencepiece.bpe.model", "README.md")
RDM_COLLECTION_PATTERNS = ("rdm-*/model.safetensors", "rdm-*/config.json", "rdm-*/README.md", "rdm_metrics.json",
                           "rd_curve.png", "README.md")
# What marks a training output folder or a Trainer checkpoint (never pushed as a model); a stray training_args.bin
# in an exported folder is only left out.
TRAINING_MARKERS = ("trainer_state.json", "teacher_cache", "rdms")

PIPELINE_TAGS = {"classification": "image-classification", "clip": "zero-shot-image-classification"}
BUILDER_DATASETS = ("webdataset", "imagefolder", "parquet", "arrow", "csv", "json")


class HubUnavailableError(DistillationInputError):
    """The Hub cannot be reached (offline mode, no network) or refused the credentials."""


# ------------------------------------------------------------------------------------------------ ids
def _is_hub_id(value: str | None) -> bool:
    """``org/name`` that is not a local path."""
    if not value or os.path.exists(value) or value.startswith((".", "/", "~")):
        return False
    parts = value.split("/")
    return len(parts) == 2 and all(parts)


def model_hub_id(model=None, spec: str | None = None, pretrained: bool = True) -> str | None:
    """The Hub repo whose weights a model started from (a card's ``base_model``), or None when unknown or when the
    model was randomly initialised (``pretrained=False``). From the model id when given (``timm:resnet34.a1_in1k`` ->
    ``timm/resnet34.a1_in1k`` via timm's pretrained config; ``hf:org/name``; ``open_clip:ViT-L-14@openai`` via
    open_clip's; ``...:hf-hub:org/name``), else from a transformers model's ``config._name_or_path``."""
    if not pretrained:
        return None
    if spec:
        prefix, _, name = spec.partition(":")
        if name.startswith("hf-hub:"):
            repo = name[len("hf-hub:"):].split("@")[0]
            return repo if _is_hub_id(repo) else None
        try:
            if prefix == "timm" and not name.startswith("local-dir:"):
                from timm.models import get_pretrained_cfg

                cfg = get_pretrained_cfg(name)
                hub_id = (getattr(cfg, "hf_hub_id", None) or "").rstrip("/") if cfg is not None else ""
                return hub_id if _is_hub_id(hub_id) else None
            if prefix == "open_clip" and "@" in name:
                import open_clip

                arch, _, tag = name.partition("@")
                hub_id = (open_clip.get_pretrained_cfg(arch, tag) or {}).get("hf_hub", "").rstrip("/")
                return hub_id if _is_hub_id(hub_id) else None
        except Exception:  # noqa: BLE001 - an unknown name: no base_model rather than a wrong one
            return None
        return name if prefix == "hf" and _is_hub_id(name) else None
    config = getattr(model, "config", None)  # transformers: where from_pretrained read it
    name = getattr(config, "_name_or_path", None) if config is not None else None
    return name if isinstance(name, str) and _is_hub_id(name) else None


def _dataset_ids(datasets: Iterable[str] | None) -> list[str]:
    return [d for d in (datasets or []) if d and d not in BUILDER_DATASETS and _is_hub_id(d)]


# ------------------------------------------------------------------------------------------------ cards
_LOAD_SNIPPETS = {
    "timm": 'import timm\n\nmodel = timm.create_model("hf-hub:{repo}", pretrained=True)\n'
            '# a local copy: timm.create_model("local-dir:PATH", pretrained=True)',
    "transformers": 'from transformers import pipeline\n\nclassifier = pipeline("image-classification", model="{repo}")\n'
                    '# or AutoModelForImageClassification.from_pretrained("{repo}") + AutoImageProcessor',
    "open_clip": 'import open_clip\n\nmodel, _, preprocess = open_clip.create_model_and_transforms("hf-hub:{repo}")\n'
                 'tokenizer = open_clip.get_tokenizer("hf-hub:{repo}")\n'
                 '# a local copy: open_clip.create_model_and_transforms("local-dir:PATH")',
    "hf_cifd": 'from hf_cifd.models import SimpleCNN\n\nmodel = SimpleCNN.from_pretrained("{repo}")  # or a local folder\n'
               'embedding, logits = model(pixel_values)',
    "pytorch": "# The student's own nn.Module class, then:\nfrom safetensors.torch import load_model\n\n"
               'load_model(model, "model.safetensors")',
}


def _fmt(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_fmt(v) for v in value) + "]"
    return str(value)


def _eval_results(metrics: Mapping[str, Any], task: str, dataset: str | None, split: str | None) -> list:
    """``EvalResult`` s from ``eval_*`` metrics; accuracies and recalls as fractions (CLIP's are logged in %)."""
    from huggingface_hub import EvalResult

    pipeline_tag = PIPELINE_TAGS[task]
    common = dict(task_type=pipeline_tag, dataset_type=dataset or "custom", dataset_name=dataset or "evaluation set",
                  dataset_split=split)
    results = []
    if task == "classification" and metrics.get("eval_accuracy") is not None:
        results.append(EvalResult(metric_type="accuracy", metric_name="top-1 accuracy",
                                  metric_value=float(metrics["eval_accuracy"]), **common))
    for key, value in metrics.items():
        if task != "clip" or value is None:
            continue
        name = key[len("eval_"):]
        if name.startswith("zeroshot_top") and "chance" not in name:
            results.append(EvalResult(metric_type="accuracy", metric_name=f"zero-shot {name[len('zeroshot_'):]}",
                                      metric_value=float(value) / 100.0, **common))
        elif "_retrieval_recall@" in name:
            results.append(EvalResult(metric_type="recall", metric_name=name.replace("_", " "),
                                      metric_value=float(value) / 100.0, **common))
    if metrics.get("eval_loss") is not None and results:
        results.append(EvalResult(metric_type="loss", metric_name="distillation loss",
                                  metric_value=float(metrics["eval_loss"]), **common))
    return results


def student_model_card(*, model_name: str, library: str, task: str, method: str, settings: Mapping[str, Any],
                       metrics: Mapping[str, Any] | None = None, teacher: str | None = None,
                       teacher_hub_id: str | None = None, datasets: Sequence[str] | None = None,
                       eval_split: str | None = None, rdm_rows: Sequence[Mapping[str, Any]] | None = None,
                       cost: Mapping[str, Any] | None = None, repo_id: str | None = None,
                       tags: Sequence[str] = (), license: str | None = None):
    """The card of an exported student (``README.md``), a ``huggingface_hub.ModelCard``."""
    from huggingface_hub import ModelCard, ModelCardData

    metrics = dict(metrics or {})
    dataset_ids = _dataset_ids(datasets)
    eval_results = _eval_results(metrics, task, dataset_ids[0] if dataset_ids else None, eval_split)
    data = ModelCardData(
        library_name=library, pipeline_tag=PIPELINE_TAGS[task], base_model=teacher_hub_id, license=license,
        datasets=dataset_ids or None, tags=list(dict.fromkeys(["knowledge-distillation", "hf_cifd", method, *tags])),
        model_name=model_name if eval_results else None, eval_results=eval_results or None)
    repo = repo_id or "PATH_OR_REPO_ID"
    lines = [f"# {model_name}", "",
             f"A {library} {PIPELINE_TAGS[task].replace('-', ' ')} model distilled from "
             f"{f'`{teacher}`' if teacher else 'a teacher'} with hf_cifd (method `{method}`). The files are the student "
             "alone in its library's own format (safetensors weights, config"
             + (", processor / tokenizer" if library in ("transformers", "open_clip") else "") + ", this card)"
             + (": hf_cifd is not needed to use it." if library in ("timm", "transformers", "open_clip") else "."), "",
             "## How to load", "", "```python", _LOAD_SNIPPETS.get(library, _LOAD_SNIPPETS["pytorch"]).format(repo=repo),
             "```", "", "## Distillation", ""]
    lines += [f"- teacher: `{teacher}`" if teacher else "- teacher: not recorded"]
    if dataset_ids or datasets:
        lines.append(f"- training data: {', '.join(f'`{d}`' for d in (datasets or []))}")
    lines += [f"- {k}: {_fmt(v)}" for k, v in settings.items()]
    if rdm_rows:
        lines += ["", "### Rate-distortion modules (teacher assistants)", "",
                  "| R | bits / sample | distortion | accuracy |", "|---|---|---|---|"]
        for row in rdm_rows:
            lines.append(f"| {_fmt(row.get('rate_weight'))} | {_fmt(row.get('rate_bits'))} | "
                         f"{_fmt(row.get('distortion'))} | {_fmt(row.get('accuracy'))} |")
    if cost:
        lines += ["", "## Training cost", "", *[f"- {k}: {_fmt(v)}" for k, v in cost.items()]]
    lines += ["", "## Evaluation", ""]
    shown = {k: v for k, v in metrics.items() if k.startswith("eval_") and isinstance(v, (int, float))}
    lines += [f"- {k}: {_fmt(v)}" for k, v in shown.items()] or ["No evaluation was run."]
    if "eval_accuracy" in shown:
        lines += ["", "`eval_accuracy` is a fraction (0.5 = 50 %)."]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n")


def rdm_model_card(rdm, repo_id: str | None = None):
    """The card of one :class:`~hf_cifd.modules.RateDistortionModule`: teacher, R, bits, distortion, accuracy."""
    from huggingface_hub import ModelCard, ModelCardData

    info = dict(getattr(rdm, "card_info", None) or {})
    teacher = info.get("teacher")
    data = ModelCardData(library_name="hf_cifd", tags=["knowledge-distillation", "cifd", "rate-distortion-module"],
                         base_model=info.get("teacher_hub_id"))
    repo = repo_id or "PATH_OR_REPO_ID"
    rows = {"teacher": f"`{teacher}`" if teacher else "not recorded", "modality": info.get("modality", "image"),
            "teacher embedding width": rdm.embed_dim, "rate weight R": _fmt(rdm.rate_weight),
            "bits / sample": _fmt(info.get("rate_bits", "not measured")),
            "distortion": f"{_fmt(info.get('distortion', 'not measured'))} ({rdm.distortion})",
            "accuracy": _fmt(info.get("accuracy", "not measured")),
            "agreement with the teacher": _fmt(info.get("teacher_agreement", "not measured")),
            "classifier head": f"{rdm.num_classes} classes" if rdm.num_classes else "none"}
    lines = ["# Rate-distortion module (CIFD)", "",
             "A CIFD rate-distortion module: an MLP autoencoder with a learned entropy bottleneck over a teacher's "
             "embedding, used as a frozen teacher assistant when distilling a student (a lower R keeps fewer bits, "
             "mimicking a smaller assistant). Measured on held-out samples after training (accuracy and agreement in %).",
             "", "| | |", "|---|---|", *[f"| {k} | {v} |" for k, v in rows.items()], "", "## How to load", "",
             "```python", "from hf_cifd import RateDistortionModule", "",
             f'rdm = RateDistortionModule.from_pretrained("{repo}")  # a local folder or a Hub repo id', "```", ""]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines))


def rdm_collection_card(metrics: Mapping[str, Any], teacher: str | None = None, repo_id: str | None = None,
                        curve: bool = True, teacher_hub_id: str | None = None):
    """The card of a folder of RDMs written by ``train_rdms`` (``rdm-<modality>-<i>/``, ``rdm_metrics.json``)."""
    from huggingface_hub import ModelCard, ModelCardData

    rows = metrics.get("rdms", [])
    data = ModelCardData(library_name="hf_cifd", tags=["knowledge-distillation", "cifd", "rate-distortion-module"],
                         base_model=teacher_hub_id)
    repo = repo_id or "PATH_OR_REPO_ID"
    lines = ["# CIFD rate-distortion modules", "",
             f"{len(rows)} rate-distortion modules trained on the embeddings of "
             f"{f'`{teacher}`' if teacher else 'a teacher (not recorded)'}; frozen teacher assistants for CIFD "
             "distillation. Measured on held-out samples (accuracy and agreement in %).", "",
             "| folder | modality | R | bits / sample | distortion | accuracy | agreement with the teacher |",
             "|---|---|---|---|---|---|---|"]
    counters: dict[str, int] = {}
    for row in rows:
        m = row.get("modality", "image")
        i = counters[m] = counters.get(m, -1) + 1
        lines.append(f"| rdm-{m}-{i} | {m} | {_fmt(row.get('rate_weight'))} | {_fmt(row.get('rate_bits'))} | "
                     f"{_fmt(row.get('distortion'))} | {_fmt(row.get('accuracy'))} | {_fmt(row.get('teacher_agreement'))} |")
    if metrics.get("teacher_accuracy") is not None:
        lines += ["", f"Teacher accuracy on the same samples: {_fmt(metrics['teacher_accuracy'])} %."]
    if curve:
        lines += ["", "![rate vs accuracy of the RDMs](rd_curve.png)"]
    lines += ["", "## How to load", "", "```python", "from hf_cifd.hub import load_rdms", "",
              f'rdms = load_rdms("{repo}", num_rdms={len(rows)}, modality="image")  # a folder or a Hub repo id',
              "```", "", "or `--rdm_dir " + repo + "` in the recipes and `hf-cifd distill`.", ""]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines))


# ------------------------------------------------------------------------------------------------ folders
def _matches(rel: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatch(rel, p) for p in patterns)


def _files(folder: str) -> list[str]:
    out = []
    for root, _, names in os.walk(folder):
        for n in names:
            out.append(os.path.relpath(os.path.join(root, n), folder).replace(os.sep, "/"))
    return sorted(out)


def folder_kind(folder: str) -> str:
    """``"student"``, ``"rdm"`` or ``"rdms"`` (a train_rdms folder); raises naming the folder to push instead for a
    training output, a checkpoint or anything else."""
    if not os.path.isdir(folder):
        raise DistillationInputError(f"{folder} is not a folder.")
    names = set(os.listdir(folder))
    checkpoints = sorted(n for n in names if n.startswith("checkpoint-"))
    if checkpoints or names & set(TRAINING_MARKERS):
        hints = [os.path.join(folder, d) for d in ("student", "rdms") if os.path.isdir(os.path.join(folder, d))]
        what = ("a Trainer checkpoint (the training container, optimizer state and training_args.bin)"
                if "trainer_state.json" in names and not checkpoints else "a training output folder")
        fix = (f"push {' or '.join(hints)} instead" if hints else
               "export the student alone with trainer.save_model('<dir>') (the recipes write <output_dir>/student) "
               "and push that folder")
        raise DistillationInputError(f"{folder} is {what}, not an exported model: {fix}.")
    if "rdm_metrics.json" in names and any(n.startswith("rdm-") for n in names):
        return "rdms"
    weights = any(n.endswith(".safetensors") for n in names)
    if weights and "config.json" in names:
        with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
            config = json.load(f)
        return "rdm" if {"embed_dim", "rate_weight"} <= set(config) else "student"
    if weights and "open_clip_config.json" in names:
        return "student"
    raise DistillationInputError(
        f"{folder} holds no exported model (safetensors weights + config.json / open_clip_config.json): push a folder "
        "written by trainer.save_model(), save_pretrained() or train_rdms().")


def stage_export(folder: str, staging: str) -> list[str]:
    """Copies the loadable files of an exported student / RDM folder into the empty folder ``staging``; returns them
    (relative paths). Everything else (pickles, logs, checkpoints) stays behind."""
    kind = folder_kind(folder)
    patterns = RDM_COLLECTION_PATTERNS if kind == "rdms" else EXPORT_PATTERNS
    if os.path.exists(staging):
        shutil.rmtree(staging)
    os.makedirs(staging)
    staged = []
    for rel in _files(folder):
        if _matches(rel, patterns) and (kind == "rdms" or "/" not in rel):
            os.makedirs(os.path.dirname(os.path.join(staging, rel)) or staging, exist_ok=True)
            shutil.copy2(os.path.join(folder, rel), os.path.join(staging, rel))
            staged.append(rel)
    return staged


# ------------------------------------------------------------------------------------------------ uploads
def check_hub_reachable(fix: str = "then push again (hf-cifd push <folder> --repo_id ORG/NAME)") -> None:
    """Fails fast (before any work) when huggingface_hub is in offline mode."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        raise HubUnavailableError(
            f"cannot push: HF_HUB_OFFLINE=1 is set (offline mode); unset HF_HUB_OFFLINE on a machine with network "
            f"access, {fix}.")


def as_hub_error(exc: Exception) -> HubUnavailableError | None:
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    if isinstance(exc, OfflineModeIsEnabled):
        return HubUnavailableError("cannot push: HF_HUB_OFFLINE=1 is set (offline mode); unset it on a machine with "
                                   "network access, then push again.")
    status = getattr(getattr(exc, "response", None), "status_code", None)
    if isinstance(exc, HfHubHTTPError) and status in (401, 403):
        return HubUnavailableError(f"the Hub refused the upload (HTTP {status}): log in with `hf auth login` or set "
                                   "HF_TOKEN to a token with write access, then push again.")
    names = {c.__name__ for c in type(exc).__mro__}
    if names & {"ConnectionError", "ConnectError", "TransportError", "TimeoutException", "Timeout"}:
        return HubUnavailableError(f"cannot reach the Hugging Face Hub ({type(exc).__name__}): check the network "
                                   "(or HF_ENDPOINT), then push again.")
    return None


def upload_folder(folder: str, repo_id: str, *, token: str | None = None, private: bool | None = None,
                  commit_message: str = "Upload with hf_cifd", revision: str | None = None,
                  run_as_future: bool = False, create_repo: bool = True):
    """``create_repo`` (exist_ok; skipped with ``create_repo=False``) + ``upload_folder`` of ``folder``; connection
    / login problems become one :class:`HubUnavailableError` line."""
    from huggingface_hub import HfApi

    check_hub_reachable()
    api = HfApi(token=token)
    try:
        if create_repo:
            repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
        return api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message=commit_message,
                                 revision=revision, run_as_future=run_as_future)
    except Exception as e:  # noqa: BLE001 - turned into one clear line when it is a connection / login problem
        err = as_hub_error(e)
        if err is None:
            raise
        raise err from None


def push_folder(folder: str, repo_id: str, *, token: str | None = None, private: bool | None = None,
                commit_message: str = "Upload with hf_cifd"):
    """Uploads an exported student or RDM folder: only its loadable files, staged in a clean temporary folder."""
    import tempfile

    folder_kind(folder)  # refuses training outputs before anything else
    check_hub_reachable()
    with tempfile.TemporaryDirectory(prefix="hf_cifd_push_") as tmp:
        staging = os.path.join(tmp, "upload")
        staged = stage_export(folder, staging)
        logger.info("uploading %d files of %s to %s: %s", len(staged), folder, repo_id, ", ".join(staged))
        return upload_folder(staging, repo_id, token=token, private=private, commit_message=commit_message), staged


def push_rdm_folder(rdm_dir: str, repo_id: str, *, token: str | None = None, private: bool | None = None):
    """Uploads the RDMs of a ``train_rdms`` output folder (their weights, configs, cards, metrics, RD curve)."""
    info, staged = push_folder(rdm_dir, repo_id, token=token, private=private, commit_message="Upload CIFD RDMs")
    logger.info("pushed the RDMs of %s to %s", rdm_dir, repo_id)
    return info


# ------------------------------------------------------------------------------------------------ RDMs by id
def resolve_rdm_dir(rdm_dir: str, token: str | None = None) -> str:
    """A local folder as is; an ``org/name`` Hub repo id downloaded (RDM files only) to the local Hub cache."""
    if os.path.isdir(rdm_dir):
        return rdm_dir
    if not _is_hub_id(rdm_dir):
        raise DistillationInputError(f"--rdm_dir {rdm_dir}: neither a folder nor a Hub repo id (org/name).")
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(rdm_dir, allow_patterns=list(RDM_COLLECTION_PATTERNS), token=token)
    except Exception as e:  # noqa: BLE001
        err = as_hub_error(e)
        if err is None:
            raise DistillationInputError(f"--rdm_dir {rdm_dir}: not a local folder, and the Hub download failed "
                                         f"({type(e).__name__}: {e}).") from None
        raise DistillationInputError(f"--rdm_dir {rdm_dir} is not a local folder, and {err}") from None


def load_rdms(rdm_dir: str, num_rdms: int, modality: str = "image", token: str | None = None) -> list:
    """``num_rdms`` trained RDMs ``rdm-<modality>-<i>`` from a ``train_rdms`` folder or Hub repo."""
    from .modules import RateDistortionModule

    local = resolve_rdm_dir(rdm_dir, token)
    rdms = []
    for i in range(num_rdms):
        path = os.path.join(local, f"rdm-{modality}-{i}")
        if not os.path.isdir(path):
            raise DistillationInputError(f"--rdm_dir {rdm_dir} has no rdm-{modality}-{i}/ (num_rdms={num_rdms}); it "
                                         "holds what train_rdms saved.")
        rdms.append(RateDistortionModule.from_pretrained(path))
    return rdms


__all__ = ["HubUnavailableError", "folder_kind", "load_rdms", "model_hub_id", "push_folder", "push_rdm_folder",
           "rdm_collection_card", "rdm_model_card", "resolve_rdm_dir", "stage_export", "student_model_card",
           "upload_folder"]
