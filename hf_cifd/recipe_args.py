"""Command-line parsing shared by every recipe and ``hf-cifd distill``: ``HfArgumentParser`` + YAML configs.

A run's settings come from four layers, each one overriding the one before:

1. the recipe's paper setting (``recipes/configs/<recipe>.yaml``; ``hf-cifd distill`` has none),
2. with ``--smoke``: the recipe's smoke settings (tiny offline run),
3. ``--config my.yaml``: a YAML file of any flags, as in TRL (``learning_rate: 0.1``, ``rdm_rates: [1e4, 5e3]``),
4. the flags given on the command line.

Layers 1-3 become the parser's *defaults* (``set_defaults``); the command line is never edited, so every form argparse
knows works and always wins: ``--no_use_ibm``, ``--use_ibm=false``, ``--output_dir=/x``, unique abbreviations such as
``--learning_r 0.1``, ``--smoke false``. ``--help`` shows each flag with the default of this recipe (and of
``--smoke`` / ``--config`` when given before ``--help``).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from typing import Any, Mapping, Sequence

from .checks import DistillationInputError

CONFIG_HELP = ("YAML file of any flags (e.g. `learning_rate: 0.1`, `rdm_rates: [1e4, 5e3, 1e3]`): overrides the "
               "recipe's defaults; flags given on the command line override it.")


def load_yaml_config(path: str | os.PathLike) -> dict[str, Any]:
    """The flags of a YAML config file as a dict (flag name without ``--`` -> value)."""
    import yaml

    if not os.path.isfile(path):
        raise DistillationInputError(f"--config {path}: no such file.")
    with open(path, encoding="utf-8") as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise DistillationInputError(f"--config {path} must hold a mapping of flags to values, got {type(data).__name__}.")
    return data


def _dest_actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """dest -> the action of its positive flag (``--use_ibm``, not ``--no_use_ibm``)."""
    actions: dict[str, argparse.Action] = {}
    for action in parser._actions:
        if f"--{action.dest}" in action.option_strings:
            actions[action.dest] = action
    return actions


def _coerce(action: argparse.Action, value: Any) -> Any:
    """A YAML / Python value in the type the flag's parser gives (YAML reads ``1e4`` as a string, ``3`` as an int)."""
    def one(v):
        if v is None or action.type is None or isinstance(v, (dict, list)):
            return v
        return action.type(v if isinstance(v, (str, bool)) else str(v))

    if isinstance(value, (list, tuple)):
        return [one(v) for v in value]
    if value is not None and action.nargs in ("+", "*"):
        return [one(value)]
    return one(value)


def _set_defaults(parser: argparse.ArgumentParser, values: Mapping[str, Any], source: str) -> None:
    actions = _dest_actions(parser)
    unknown = sorted(set(values) - set(actions))
    if unknown:
        raise DistillationInputError(
            f"{source}: unknown flag(s) {', '.join(unknown)}; `--help` lists every flag (write them without '--').")
    try:
        parser.set_defaults(**{k: _coerce(actions[k], v) for k, v in values.items()})
    except (TypeError, ValueError) as e:
        raise DistillationInputError(f"{source}: bad value ({e}).") from None


def build_parser(dataclass_types: Sequence[type], layers: Sequence[tuple[Mapping[str, Any], str]] = (),
                 **kwargs) -> argparse.ArgumentParser:
    """``HfArgumentParser`` over ``dataclass_types`` plus ``--config``, with each ``(values, source)`` layer set as
    defaults in order."""
    from transformers import HfArgumentParser

    parser = HfArgumentParser(dataclass_types, **kwargs)
    parser.add_argument("--config", default=None, metavar="YAML", help=CONFIG_HELP)
    for values, source in layers:
        _set_defaults(parser, values, source)
    return parser


def _base_defaults() -> dict[str, Any]:
    base: dict[str, Any] = {"report_to": "none"}
    if os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true"):  # `accelerate launch --cpu`
        base["use_cpu"] = True
    return base


def parse_recipe_args(dataclass_types: Sequence[type], defaults: str | os.PathLike | Mapping[str, Any] | None = None,
                      smoke_defaults: Mapping[str, Any] | None = None, argv: Sequence[str] | None = None,
                      prog: str | None = None) -> tuple:
    """One instance of each dataclass in ``dataclass_types`` from ``argv`` (default ``sys.argv[1:]``).

    ``defaults``: the recipe's settings (a YAML path or a mapping of flag names to values); ``smoke_defaults``: applied
    on top when the parsed ``smoke`` flag is true. See the module docstring for the order of the layers.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    recipe = defaults if isinstance(defaults, Mapping) else (load_yaml_config(defaults) if defaults else {})
    source = str(defaults) if defaults is not None and not isinstance(defaults, Mapping) else "recipe defaults"
    known = {f.name for dtype in dataclass_types for f in dataclasses.fields(dtype)}
    base = {k: v for k, v in _base_defaults().items() if k in known}  # e.g. no report_to without TrainingArguments
    layers = [(base, "base defaults"), (dict(recipe), source)]
    probe = [a for a in argv if a not in ("-h", "--help")]  # read --config / --smoke first, without exiting on help
    ns, _ = build_parser(dataclass_types, layers, prog=prog).parse_known_args(probe)
    user = [(load_yaml_config(ns.config), f"--config {ns.config}")] if ns.config else []
    ns, _ = build_parser(dataclass_types, layers + user, prog=prog).parse_known_args(probe)
    if getattr(ns, "smoke", False) and smoke_defaults:
        layers.append((dict(smoke_defaults), "smoke defaults"))
    ns = build_parser(dataclass_types, layers + user, prog=prog).parse_args(argv)
    return tuple(dtype(**{f.name: getattr(ns, f.name) for f in dataclasses.fields(dtype) if f.init})
                 for dtype in dataclass_types)


def recipe_config_path(recipe_file: str) -> str:
    """``recipes/configs/<recipe>.yaml`` for the recipe script ``recipes/<recipe>.py``."""
    stem = os.path.splitext(os.path.basename(recipe_file))[0]
    return os.path.join(os.path.dirname(os.path.abspath(recipe_file)), "configs", f"{stem}.yaml")


__all__ = ["build_parser", "load_yaml_config", "parse_recipe_args", "recipe_config_path"]
