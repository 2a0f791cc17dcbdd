"""Zero-shot classifier construction: class names x prompt templates -> (D, C) text-embedding classifier.

Nothing here imports open_clip at module import time (it costs seconds); the ImageNet defaults are
imported lazily, only when they are actually needed.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Union

import torch

from hf_cifd.checks import DistillationInputError
from hf_cifd.eval._ranking import l2_normalize

Template = Union[str, Callable[[str], str]]

#: file names used by the clip-benchmark/wds_* datasets (one entry per line).
CLASSNAMES_FILE = "classnames.txt"
TEMPLATES_FILE = "zeroshot_classification_templates.txt"

#: dataset names (lower-cased, with "clip-benchmark/" and "wds_" stripped) whose class list is ImageNet-1k's.
_IMAGENET_1K_NAMES = {"imagenet", "imagenet1k", "imagenet-1k", "imagenet_1k", "imagenetv2", "imagenet-v2",
                      "imagenet_v2", "ilsvrc/imagenet-1k", "timm/imagenet-1k-wds"}


def encode_in_batches(fn: Callable[[Any], torch.Tensor], inputs: Sequence | torch.Tensor, batch_size: int) -> torch.Tensor:
    """``torch.cat([fn(inputs[i:i + batch_size]) for i ...])``: encode a list / tensor in slices.

    ``fn`` must return a tensor whose first dimension equals the slice length.
    """
    if not (isinstance(batch_size, int) and batch_size >= 1):
        raise DistillationInputError(f"batch_size must be an integer >= 1, got {batch_size!r}.")
    n = len(inputs)
    if n == 0:
        raise DistillationInputError("encode_in_batches got no inputs to encode.")
    outs = []
    for start in range(0, n, batch_size):
        chunk = inputs[start:start + batch_size]
        out = fn(chunk)
        if not isinstance(out, torch.Tensor) or out.dim() < 1 or out.shape[0] != len(chunk):
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise DistillationInputError(
                f"the encoder returned {shape} for a batch of {len(chunk)} inputs; it must return a tensor "
                "with one row per input (e.g. model.encode_text, or a wrapper returning text_embeds)."
            )
        outs.append(out)
    return torch.cat(outs, dim=0)


def format_template(template: Template, classname: str) -> str:
    """Apply one template: a string with ``{c}`` (clip-benchmark style) or ``{}``, or a callable."""
    if callable(template):
        text = template(classname)
    elif isinstance(template, str):
        if "{c}" in template:
            text = template.replace("{c}", classname)
        elif "{}" in template:
            text = template.replace("{}", classname)
        else:
            raise DistillationInputError(
                f"template {template!r} has no '{{c}}' placeholder: every class would get the same prompt and "
                "the classifier would be meaningless. Write templates like 'a photo of a {c}.'."
            )
    else:
        raise DistillationInputError(f"a template must be a string or a callable, got {type(template).__name__}.")
    if not isinstance(text, str) or not text.strip():
        raise DistillationInputError(f"template {template!r} produced {text!r} for class {classname!r}; expected a non-empty string.")
    return text


def _check_classnames(classnames: Sequence[str]) -> list[str]:
    if isinstance(classnames, str) or not isinstance(classnames, Sequence) or len(classnames) == 0:
        raise DistillationInputError("classnames must be a non-empty sequence of strings (one per class id).")
    for i, c in enumerate(classnames):
        if not isinstance(c, str) or not c.strip():
            raise DistillationInputError(f"class name {i} is {c!r}; every class id needs a non-empty name.")
    return list(classnames)


def _check_templates(templates: Sequence[Template]) -> list[Template]:
    if isinstance(templates, str) or callable(templates):
        templates = [templates]
    if not isinstance(templates, Sequence) or len(templates) == 0:
        raise DistillationInputError("templates must be a non-empty sequence of strings with '{c}' or callables.")
    return list(templates)


def _to_device(tokens: Any, device: torch.device | str | None) -> Any:
    if device is None:
        return tokens
    if hasattr(tokens, "to"):  # tensors and transformers' BatchEncoding
        return tokens.to(device)
    if isinstance(tokens, Mapping):
        return {k: v.to(device) if hasattr(v, "to") else v for k, v in tokens.items()}
    return tokens


def zero_shot_classifier(
    encode_text: Callable[[Any], torch.Tensor],
    tokenizer: Callable[[list[str]], Any] | None,
    classnames: Sequence[str],
    templates: Sequence[Template],
    *,
    batch_size: int = 256,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Build a zero-shot classifier: column ``c`` is the renormalised mean of the L2-normalised text
    embeddings of ``[format(t, classnames[c]) for t in templates]``.

    Args:
        encode_text: callable mapping tokenizer output (or the list of prompt strings when ``tokenizer`` is
            None) to a (B, D) tensor, e.g. ``model.encode_text`` of an open_clip model (put the model in
            ``eval()`` mode first). Any output scale is fine: embeddings are normalised here.
        tokenizer: callable mapping a list of strings to what ``encode_text`` takes (open_clip's
            ``get_tokenizer(name)``, or a transformers tokenizer wrapper); None to pass raw strings.
        classnames: one name per class id, in label order.
        templates: strings containing ``{c}`` (or ``{}``), or callables ``classname -> prompt`` such as
            open_clip's ``OPENAI_IMAGENET_TEMPLATES``.
        batch_size: number of prompts per ``encode_text`` call (classes are grouped so that the whole
            group's prompts go through in calls of at most this size).
        device: where the tokenizer output is moved before encoding (None: left as is).

    Returns:
        float32 tensor of shape (D, C) on the encoder's output device, columns of unit norm.
    """
    classnames = _check_classnames(classnames)
    templates = _check_templates(templates)
    if not (isinstance(batch_size, int) and batch_size >= 1):
        raise DistillationInputError(f"batch_size must be an integer >= 1, got {batch_size!r}.")
    n_t = len(templates)

    def encode(texts: list[str]) -> torch.Tensor:
        tokens = tokenizer(texts) if tokenizer is not None else texts
        return encode_text(_to_device(tokens, device))

    classes_per_group = max(1, batch_size // n_t)
    columns = []
    with torch.no_grad():
        for start in range(0, len(classnames), classes_per_group):
            group = classnames[start:start + classes_per_group]
            texts = [format_template(t, c) for c in group for t in templates]
            emb = encode_in_batches(encode, texts, batch_size)
            if emb.dim() != 2:
                raise DistillationInputError(f"encode_text must return (batch, dim) embeddings, got shape {tuple(emb.shape)}.")
            emb = l2_normalize("text embeddings of the zero-shot prompts", emb)
            mean = emb.reshape(len(group), n_t, -1).mean(dim=1)
            columns.append(l2_normalize("mean prompt embedding of a class", mean))
    return torch.cat(columns, dim=0).T.contiguous()


def _read_lines(path: str | os.PathLike, what: str) -> list[tuple[int, str]]:
    p = Path(path)
    if not p.is_file():
        raise DistillationInputError(f"{what} file {str(p)!r} does not exist.")
    lines = p.read_text(encoding="utf-8").splitlines()
    while lines and not lines[-1].strip():  # trailing blank lines are harmless
        lines.pop()
    return [(i + 1, line.strip()) for i, line in enumerate(lines)]


def read_classnames(path: str | os.PathLike) -> list[str]:
    """Read a clip-benchmark ``classnames.txt``: line ``i`` (0-based) is the name of class id ``i``.

    A blank line in the middle is an error (dropping it would shift every later class id by one).
    """
    entries = _read_lines(path, "class-names")
    if not entries:
        raise DistillationInputError(f"class-names file {str(path)!r} is empty.")
    for lineno, name in entries:
        if not name:
            raise DistillationInputError(
                f"class-names file {str(path)!r} has a blank line at line {lineno}; line i must name class id "
                "i-1, so a blank line would shift all later classes. Remove it or give that class a name."
            )
    return [name for _, name in entries]


def read_templates(path: str | os.PathLike) -> list[str]:
    """Read a clip-benchmark ``zeroshot_classification_templates.txt`` (one template per line, with ``{c}``)."""
    templates = []
    for lineno, line in _read_lines(path, "templates"):
        if not line:
            continue
        if "{c}" not in line and "{}" not in line:
            raise DistillationInputError(
                f"templates file {str(path)!r} line {lineno} ({line!r}) has no '{{c}}' placeholder."
            )
        templates.append(line)
    if not templates:
        raise DistillationInputError(f"templates file {str(path)!r} has no templates.")
    return templates


def _classnames_from_features(dataset: Any) -> list[str] | None:
    features = getattr(dataset, "features", None)
    if not features:
        return None
    from datasets import ClassLabel  # only reached for datasets objects

    labelled = [k for k, f in features.items() if isinstance(f, ClassLabel)]
    for preferred in ("label", "labels", "cls"):
        if preferred in labelled:
            return list(features[preferred].names)
    if len(labelled) == 1:
        return list(features[labelled[0]].names)
    return None


def load_classnames_and_templates(
    classnames_path: str | os.PathLike | None = None,
    templates_path: str | os.PathLike | None = None,
    dataset: Any = None,
    *,
    num_classes: int | None = None,
) -> tuple[list[str], list[Template]]:
    """Class names and prompt templates for zero-shot classification.

    Sources, in order of precedence (explicit paths win over ``dataset``):

    - ``classnames_path`` / ``templates_path``: clip-benchmark style text files (one entry per line).
    - ``dataset``: a local directory holding ``classnames.txt`` and optionally
      ``zeroshot_classification_templates.txt`` (e.g. a downloaded ``clip-benchmark/wds_*`` snapshot); an
      ImageNet-1k name (``"imagenet1k"``, ``"clip-benchmark/wds_imagenet1k"``, ``"imagenetv2"``, ...); or
      a ``datasets`` Dataset whose label column is a ``ClassLabel`` (its names are used).
    - nothing: open_clip's ``IMAGENET_CLASSNAMES`` / ``OPENAI_IMAGENET_TEMPLATES`` (imported lazily).
      Class names and templates default independently, so a classnames file without a templates file
      gets the OpenAI ImageNet templates (80 callables).

    ``num_classes`` (e.g. the dataset's label count): if given and the class-name count differs, a
    :class:`DistillationInputError` is raised instead of a silently misaligned classifier.

    Returns ``(classnames, templates)``; templates are ``{c}`` strings or callables.
    """
    classnames: list[str] | None = None
    templates: list[Template] | None = None
    source = "open_clip IMAGENET_CLASSNAMES"
    if dataset is not None:
        if isinstance(dataset, (str, os.PathLike)) and Path(dataset).is_dir():
            root = Path(dataset)
            if classnames_path is None:
                if not (root / CLASSNAMES_FILE).is_file():
                    raise DistillationInputError(
                        f"dataset directory {str(root)!r} has no {CLASSNAMES_FILE}; pass classnames_path explicitly."
                    )
                classnames_path = root / CLASSNAMES_FILE
            if templates_path is None and (root / TEMPLATES_FILE).is_file():
                templates_path = root / TEMPLATES_FILE
        elif isinstance(dataset, (str, os.PathLike)):
            key = str(dataset).lower().removeprefix("clip-benchmark/").removeprefix("wds_")
            if key not in _IMAGENET_1K_NAMES:
                raise DistillationInputError(
                    f"dataset {str(dataset)!r} is neither a local directory with {CLASSNAMES_FILE} nor an ImageNet-1k "
                    "name; pass classnames_path (and templates_path) from the dataset's files (download "
                    f"{CLASSNAMES_FILE} and {TEMPLATES_FILE} from the clip-benchmark/wds_* repo)."
                )
        else:
            classnames = _classnames_from_features(dataset)
            if classnames is None and classnames_path is None:
                raise DistillationInputError(
                    "could not find class names in the dataset: it has no single ClassLabel column; pass "
                    "classnames_path."
                )
            source = "the dataset's ClassLabel names"
    if classnames_path is not None:
        classnames = read_classnames(classnames_path)
        source = f"{str(classnames_path)!r}"
    if templates_path is not None:
        templates = read_templates(templates_path)
    if classnames is None:
        import open_clip  # lazy: costs seconds

        classnames = list(open_clip.IMAGENET_CLASSNAMES)
    if num_classes is not None and len(classnames) != num_classes:
        raise DistillationInputError(
            f"{len(classnames)} class names from {source} but the dataset has {num_classes} classes; the "
            "class-names file does not belong to this dataset (or has extra/missing lines)."
        )
    if templates is None:
        import open_clip  # lazy: costs seconds

        templates = list(open_clip.OPENAI_IMAGENET_TEMPLATES)
    return classnames, templates
