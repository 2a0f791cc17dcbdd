"""Checkpoints that resume exactly or say why not (README: "Resuming and failure handling").

A ``checkpoint-N`` directory is complete only when :data:`MANIFEST` exists: the trainer writes it last, after every
process has written its files, and it lists each file with its size. So a save killed half-way leaves a directory
without a manifest, which ``resume_from_checkpoint=True`` skips (with a log line) for the newest complete one, and a
file deleted or truncated later is named before anything is loaded. ``resume_partial=True`` resumes anyway, with
fresh state for a damaged optimizer / scheduler / RNG / stream-state file (never for the model weights).

Each process also writes :data:`RUN_STATE` (its teacher-call count, the method and a fingerprint of the frozen RDMs):
a resume restores the count and refuses a run whose method, RDMs or rates differ from the checkpoint's.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from typing import Any

import torch

from .checks import DistillationInputError

logger = logging.getLogger(__name__)

MANIFEST = "hf_cifd_checkpoint.json"
RUN_STATE = "hf_cifd_state_rank{rank}.json"
# State a partial resume may start afresh; anything else (weights, trainer_state.json) must be intact.
OPTIONAL = ("optimizer.pt", "scheduler.pt", "scaler.pt", "rng_state*.pth", "stream_state_rank*.json",
            "hf_cifd_state_rank*.json")
_CKPT = re.compile(r"^checkpoint-(\d+)$")


def atomic_json(path: str, data: Any) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def files_identity(paths) -> list[list]:
    """``[absolute path, size]`` of each existing file: the data part of a finished stage's identity."""
    return [[os.path.abspath(f), os.path.getsize(f)] for f in paths or [] if os.path.isfile(f)]


def finished_stage(marker: str, identity: dict[str, Any], what: str) -> dict | None:
    """The ``complete.json`` marker of a finished pipeline stage (teacher training, teacher cache, RDMs) when it
    belongs to this run; None when absent; an error when it was made by another run (another teacher, data or rates)
    rather than silently mixing the two. The stage writes ``{"identity": identity, ...}`` last, with :func:`atomic_json`."""
    if not os.path.exists(marker):
        return None
    with open(marker) as f:
        info = json.load(f)
    saved = info.get("identity", {})
    diffs = sorted(k for k in set(saved) | set(identity) if saved.get(k) != identity.get(k))
    if diffs:
        shown = {k: (saved.get(k), identity.get(k)) for k in diffs[:4]}
        raise DistillationInputError(
            f"the finished {what} in {os.path.dirname(marker)} belongs to another run: {diffs} differ "
            f"(saved, now: {shown}). Use a new --output_dir, or delete {os.path.dirname(marker)} to rebuild it.")
    return info


def _files(directory: str) -> dict[str, int]:
    out = {}
    for root, _, names in os.walk(directory):
        for name in names:
            path = os.path.join(root, name)
            rel = os.path.relpath(path, directory)
            if rel != MANIFEST and ".tmp-" not in name:
                out[rel] = os.path.getsize(path)
    return out


def write_manifest(directory: str) -> None:
    """Marks ``directory`` complete (call on the main process after every process has saved)."""
    atomic_json(os.path.join(directory, MANIFEST), {"complete": True, "files": _files(directory)})


def is_complete(directory: str) -> bool:
    return os.path.isfile(os.path.join(directory, MANIFEST))


def checkpoints(output_dir: str) -> list[str]:
    """``checkpoint-N`` directories of ``output_dir``, newest (highest N) first."""
    if not os.path.isdir(output_dir):
        return []
    found = [(int(m.group(1)), n) for n in os.listdir(output_dir)
             if (m := _CKPT.match(n)) and os.path.isdir(os.path.join(output_dir, n))]
    return [os.path.join(output_dir, n) for _, n in sorted(found, reverse=True)]


def newest_complete(output_dir: str) -> str | None:
    """The newest complete checkpoint; logs every newer incomplete one it skips."""
    for path in checkpoints(output_dir):
        if is_complete(path):
            return path
        logger.warning("skipping %s: incomplete (no %s; its save was interrupted)", path, MANIFEST)
    return None


def damaged_files(directory: str) -> dict[str, str]:
    """``{file: what is wrong}`` against the manifest (missing, or a size other than the one written)."""
    with open(os.path.join(directory, MANIFEST)) as f:
        listed = json.load(f)["files"]
    problems = {}
    for rel, size in listed.items():
        path = os.path.join(directory, rel)
        if not os.path.isfile(path):
            problems[rel] = "missing"
        elif os.path.getsize(path) != size:
            problems[rel] = f"truncated or altered ({os.path.getsize(path)} bytes, {size} written)"
    return problems


def _optional(rel: str) -> bool:
    return any(fnmatch.fnmatch(rel, p) for p in OPTIONAL)


def resolve(value, output_dir: str, partial: bool) -> tuple[str | None, set[str]]:
    """``(checkpoint to resume, files to treat as absent)`` for Trainer's ``resume_from_checkpoint`` value
    (None/False, True / "true" = the newest complete one in ``output_dir``, or a path)."""
    if value is None or value is False or (isinstance(value, str) and value.lower() in ("", "false", "none")):
        return None, set()
    if value is True or (isinstance(value, str) and value.lower() == "true"):
        path = newest_complete(output_dir)
        if path is None:
            found = checkpoints(output_dir)
            if not found:
                raise DistillationInputError(f"resume_from_checkpoint=True but {output_dir} has no checkpoint-N "
                                             "directory: nothing to resume (drop the flag to start afresh).")
            if not partial:
                raise DistillationInputError(
                    f"no complete checkpoint in {output_dir}: {[os.path.basename(p) for p in found]} have no "
                    f"{MANIFEST} (interrupted saves, or written by another tool). Start afresh, or set "
                    "resume_partial=True to resume from the newest anyway.")
            path = found[0]
    else:
        path = str(value)
        if not os.path.isdir(path):
            raise DistillationInputError(f"resume_from_checkpoint={path!r} is not a directory.")
    if not is_complete(path):
        if not partial:
            raise DistillationInputError(
                f"{path} has no {MANIFEST}: its save did not finish (or another tool wrote it), so some state may be "
                "missing. Resume from an earlier checkpoint, or set resume_partial=True to resume from it anyway.")
        logger.warning("resuming from %s although it has no %s (resume_partial=True)", path, MANIFEST)
        return path, set()
    damaged = damaged_files(path)
    required = {f: why for f, why in damaged.items() if not _optional(f)}
    if required:
        raise DistillationInputError(f"{path}: {required}. The model weights and trainer state cannot be replaced: "
                                     "resume from another checkpoint.")
    if damaged and not partial:
        raise DistillationInputError(
            f"{path}: {damaged}. Resuming without it would silently restart that state (different results). Restore "
            "the file, resume from another checkpoint, or set resume_partial=True to resume with fresh state for it.")
    for rel, why in damaged.items():
        logger.warning("resume_partial: %s/%s is %s: starting that state afresh", path, rel, why)
    return path, set(damaged)


def restart_value(value, output_dir: str):
    """``--resume_from_checkpoint`` of a restarted recipe: a path, or ``true`` = the newest complete checkpoint of
    output_dir; when the run never reached a checkpoint, training starts at step 0 (finished stages are still reused)."""
    if value is not None and str(value).lower() == "true" and not checkpoints(output_dir):
        logger.warning("--resume_from_checkpoint true: no checkpoint in %s yet, training starts at step 0", output_dir)
        return None
    return value


def without(path: str, absent: set[str]) -> tuple[str, str | None]:
    """A view of checkpoint ``path`` without the ``absent`` files (a temporary directory of symlinks), so that Trainer
    starts those states afresh; returns ``(path to load, temporary directory to remove afterwards)``."""
    if not absent:
        return path, None
    tmp = tempfile.mkdtemp(prefix="hf_cifd_resume_")
    view = os.path.join(tmp, os.path.basename(os.path.normpath(path)))
    os.makedirs(view)
    for name in os.listdir(path):
        if name not in absent and name != MANIFEST:
            os.symlink(os.path.abspath(os.path.join(path, name)), os.path.join(view, name))
    return view, tmp


def remove_view(tmp: str | None) -> None:
    if tmp:
        shutil.rmtree(tmp, ignore_errors=True)


def rdm_fingerprint(rdms) -> list[dict[str, Any]]:
    """Per frozen RDM: modality, index, rate weight and a SHA-256 of its tensors."""
    out = []
    for modality, mods in sorted(rdms.items()):
        for i, rdm in enumerate(mods):
            h = hashlib.sha256()
            for name, t in sorted(rdm.state_dict().items()):
                h.update(name.encode())
                h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
            out.append({"modality": modality, "index": i, "rate_weight": getattr(rdm, "rate_weight", None),
                        "sha256": h.hexdigest()})
    return out


def save_run_state(directory: str, rank: int, state: dict[str, Any]) -> None:
    atomic_json(os.path.join(directory, RUN_STATE.format(rank=rank)), state)


def load_run_state(directory: str, rank: int) -> dict[str, Any] | None:
    path = os.path.join(directory, RUN_STATE.format(rank=rank))
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def check_same_run(saved: dict[str, Any], current: dict[str, Any], path: str) -> None:
    """Method, RDM rates and RDM weights of the resumed run must be the checkpoint's."""
    diffs = []
    if saved.get("method") != current["method"]:
        diffs.append(f"method {saved.get('method')!r} -> {current['method']!r}")
    old, new = saved.get("rdms", []), current["rdms"]
    if [r["rate_weight"] for r in old] != [r["rate_weight"] for r in new]:
        diffs.append(f"RDM rates {[r['rate_weight'] for r in old]} -> {[r['rate_weight'] for r in new]}")
    elif [r["sha256"] for r in old] != [r["sha256"] for r in new]:
        changed = [f"{r['modality']}/{r['index']}" for r, s in zip(new, old) if r["sha256"] != s["sha256"]]
        diffs.append(f"RDM weights differ ({changed or 'number of RDMs'})")
    if diffs:
        raise DistillationInputError(
            f"{path} was written by a different run: {'; '.join(diffs)}. Resume with the checkpoint's method and "
            "RDMs, or start a new run (another output_dir, or no resume_from_checkpoint).")
