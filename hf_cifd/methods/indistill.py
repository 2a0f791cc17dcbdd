"""InDistill warm-up stage (Sarridis et al., WACV 2025; github.com/gsarridis/InDistill).

A stage that runs *before* the main distillation method inside the same ``DistillationTrainer.train()``:

* ``DistillationConfig.indistill_layers`` lists layer pairs ``"teacher.module.path:student.module.path"``
  (optionally ``":teacher.producer.path"``, see below), earliest layer first. Intermediate features are read with
  forward hooks on ``model.get_submodule(path)``: no model code changes. Only the active pair's hooks are
  registered; every hook is removed when the warm-up ends (and when ``train()`` returns or fails).
* Curriculum: one pair active at a time, earliest first; pair ``l`` (0-based) is active for ``a + 1 + l``
  epochs with ``a = indistill_a = 2`` (3, 4, 5, ... epochs: the official code), or for explicit
  ``indistill_durations``; ``indistill_unit="step"`` counts optimizer steps instead (streaming / ``max_steps``
  runs). While a pair is active the loss is ``indistill_weight * MSE(student map, teacher map)`` (``F.mse_loss``,
  the mean over all elements of the post-block feature maps) and nothing else; afterwards the main method
  (KD, CIFD, CKD, ...) takes over for the remaining epochs/steps.
* Width mismatch: the teacher map's channels are selected by the L1 norm of the filters (conv) / weight rows
  (linear) that produce them (top-k, k = the student's width, kept in their original order), computed once
  from the frozen teacher. The "producer" of a module's output is the module itself when it is a Conv/Linear,
  else its last Conv/Linear submodule in registration order that is not a residual shortcut
  (``downsample``/``shortcut``/``skip``): for a timm ResNet stage that is the last block's last conv
  (``conv2`` / ``conv3``), for a MobileNet block its ``conv_pw``, for an open_clip / timm ViT block
  ``mlp.c_proj`` / ``mlp.fc2``, the last write into the block's output (the residual stream, (N, L, C) tokens).
  A module without one (an activation or pooling layer in an ``nn.Sequential``) uses its nearest earlier sibling's.
  Give another producer as a third field: ``"teacher.path:student.path:teacher.producer.path"``.
* Grid mismatch: the (channel-selected) teacher map is resized to the student's grid: CNN maps (N, C, H, W)
  by adaptive average pooling (integer down-scaling) or bilinear interpolation; ViT tokens (N, L, C) by
  bilinear interpolation of the patch grid, keeping the prefix (CLS) tokens when both models have the same
  number, else by linear interpolation along the token axis.
* Auxiliary teacher (extreme gaps): distil a wider model of the student's family from the teacher first with
  :func:`hf_cifd.assistants.train_auxiliary_teacher`, then pass it as ``DistillationTrainer(..., indistill_teacher=aux)``: the warm-up
  reads the auxiliary teacher's features, the main stage uses the main teacher.
"""

from __future__ import annotations

import difflib
import logging
import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .. import losses
from ..checks import DistillationInputError

logger = logging.getLogger(__name__)

_SHORTCUT_NAMES = ("downsample", "shortcut", "skip")
_UNITS = ("epoch", "step")


# ----------------------------------------------------------------------------------------------------------------
# configuration helpers
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerPair:
    teacher: str
    student: str
    producer: str | None = None  # teacher module whose filters / weight rows rank the channels

    def __str__(self) -> str:
        return f"{self.teacher} -> {self.student}"


def parse_layer_pairs(specs: Sequence[str] | None) -> list[LayerPair]:
    """``["teacher.path:student.path[:teacher.producer.path]", ...]`` -> :class:`LayerPair` s (tuples accepted)."""
    pairs = []
    for spec in specs or ():
        parts = list(spec) if isinstance(spec, (tuple, list)) else str(spec).split(":")
        parts = [str(p).strip() for p in parts]
        if len(parts) not in (2, 3) or not all(parts):
            raise DistillationInputError(
                f"indistill_layers entry {spec!r} must be 'teacher.module.path:student.module.path' (optionally "
                "':teacher.producer.path'), e.g. 'layer1:layer1'."
            )
        pairs.append(LayerPair(*parts))
    return pairs


def curriculum_durations(num_pairs: int, a: float = 2.0, durations: Sequence[float] | None = None) -> list[float]:
    """Epochs (or steps) each pair is active: explicit ``durations``, else ``a + 1 + l`` for pair ``l``."""
    if durations:
        if len(durations) != num_pairs:
            raise DistillationInputError(
                f"indistill_durations has {len(durations)} values for {num_pairs} layer pairs: give one per pair."
            )
        return [float(d) for d in durations]
    return [float(a + 1 + l) for l in range(num_pairs)]


class CurriculumSchedule:
    """Which layer pair is active at a training position (epoch as a float, or optimizer step)."""

    def __init__(self, durations: Sequence[float], unit: str = "epoch"):
        if unit not in _UNITS:
            raise DistillationInputError(f"indistill_unit must be one of {_UNITS}, got {unit!r}.")
        if any(not (math.isfinite(d) and d > 0) for d in durations):
            raise DistillationInputError(f"every InDistill duration must be > 0, got {list(durations)}.")
        self.durations = [float(d) for d in durations]
        self.unit = unit
        self.ends = []
        total = 0.0
        for d in self.durations:
            total += d
            self.ends.append(total)

    @property
    def total(self) -> float:
        return self.ends[-1] if self.ends else 0.0

    def position(self, state) -> float:
        """The schedule position of a ``TrainerState`` (epochs done as a float, or optimizer steps done)."""
        if self.unit == "step":
            return float(getattr(state, "global_step", 0) or 0)
        return float(getattr(state, "epoch", 0.0) or 0.0)

    def active(self, position: float) -> int | None:
        """Index of the active pair at ``position``, or None once the warm-up is over."""
        for index, end in enumerate(self.ends):
            if position < end - 1e-6:  # state.epoch is a float: tolerate rounding at the boundaries
                return index
        return None

    def describe(self, pairs: Sequence[LayerPair] | None = None) -> str:
        rows, start = [], 0.0
        for index, end in enumerate(self.ends):
            name = f" ({pairs[index]})" if pairs else ""
            rows.append(f"pair {index}{name}: {self.unit}s [{start:g}, {end:g})")
            start = end
        return "; ".join(rows) + f"; main method from {self.unit} {self.total:g}"


# ----------------------------------------------------------------------------------------------------------------
# modules, producers, channel selection, resizing
# ----------------------------------------------------------------------------------------------------------------


def resolve_module(model: nn.Module, path: str, role: str) -> nn.Module:
    """``model.get_submodule(path)``; a missing path raises DistillationInputError listing close matches."""
    try:
        return model.get_submodule(path)
    except AttributeError:
        names = [n for n, _ in model.named_modules() if n]
        close = difflib.get_close_matches(path, names, n=5, cutoff=0.5)
        hint = f" Close matches: {close}." if close else f" Some module paths: {names[:8]}."
        raise DistillationInputError(
            f"the {role} ({type(model).__name__}) has no module {path!r}.{hint} List them with "
            "[n for n, _ in model.named_modules()]."
        ) from None


def _is_producer(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d))


def producing_layer(module: nn.Module) -> tuple[str, nn.Module] | None:
    """The Conv/Linear writing ``module``'s output channels: itself, else its last non-shortcut Conv/Linear."""
    if _is_producer(module):
        return "", module
    found = None
    for name, sub in module.named_modules():
        if _is_producer(sub) and not any(part in _SHORTCUT_NAMES for part in name.split(".")):
            found = (name, sub)
    return found


def producer_for_path(model: nn.Module, path: str) -> nn.Module | None:
    """The producer of ``model.get_submodule(path)``'s output: see :func:`producing_layer`; for a module without one
    (an activation, a pooling layer) inside an ``nn.Sequential``, the nearest earlier sibling's producer (so
    ``features.1`` = the ReLU after ``features.0`` = a conv is ranked by that conv's filters)."""
    found = producing_layer(model.get_submodule(path))
    if found is not None:
        return found[1]
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    if not isinstance(parent, nn.Sequential):
        return None
    names = list(parent._modules)
    for sibling in reversed(names[: names.index(name)]):
        found = producing_layer(parent._modules[sibling])
        if found is not None:
            return found[1]
    return None


def out_width(layer: nn.Module) -> int:
    return layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels


def filter_l1_norms(layer: nn.Module) -> torch.Tensor:
    """L1 norm of each output filter (conv: over in-channels x kernel) / weight row (linear), shape (out,)."""
    if not _is_producer(layer):
        raise DistillationInputError(
            f"channel selection ranks the filters of a Conv or Linear layer, got {type(layer).__name__}."
        )
    return layer.weight.detach().abs().flatten(1).sum(dim=1)


def select_channels(layer: nn.Module, k: int) -> torch.Tensor:
    """Indices of the ``k`` output channels with the largest filter L1 norms, in ascending (original) order."""
    norms = filter_l1_norms(layer)
    if not 0 < k <= norms.numel():
        raise DistillationInputError(
            f"cannot keep {k} of the {norms.numel()} channels of {type(layer).__name__}: the student layer is wider "
            "than the teacher's. Pair the student layer with a wider teacher layer, or use an auxiliary teacher."
        )
    return torch.topk(norms.float(), k).indices.sort().values


def _prefix_tokens(length: int) -> tuple[int, int] | None:
    for prefix in range(0, 9):
        side = math.isqrt(max(length - prefix, 0))
        if side > 0 and side * side == length - prefix:
            return prefix, side
    return None


def resize_like(teacher_map: torch.Tensor, student_map: torch.Tensor) -> torch.Tensor:
    """The teacher map resized to the student's spatial grid / token count (channels untouched)."""
    if teacher_map.shape[2:] == student_map.shape[2:] and teacher_map.dim() == 4:
        return teacher_map
    if teacher_map.dim() == 4:
        (ht, wt), (hs, ws) = teacher_map.shape[2:], student_map.shape[2:]
        if ht >= hs and wt >= ws and ht % hs == 0 and wt % ws == 0:
            return F.adaptive_avg_pool2d(teacher_map, (hs, ws))
        return F.interpolate(teacher_map, size=(hs, ws), mode="bilinear", align_corners=False)
    if teacher_map.dim() == 3:  # tokens (N, L, C)
        lt, ls = teacher_map.shape[1], student_map.shape[1]
        if lt == ls:
            return teacher_map
        grid_t, grid_s = _prefix_tokens(lt), _prefix_tokens(ls)
        if grid_t and grid_s and grid_t[0] == grid_s[0]:
            prefix, gt = grid_t
            gs = grid_s[1]
            patches = teacher_map[:, prefix:].transpose(1, 2).reshape(teacher_map.shape[0], -1, gt, gt)
            patches = F.interpolate(patches, size=(gs, gs), mode="bilinear", align_corners=False)
            return torch.cat([teacher_map[:, :prefix], patches.flatten(2).transpose(1, 2)], dim=1)
        return F.interpolate(teacher_map.transpose(1, 2), size=ls, mode="linear", align_corners=False).transpose(1, 2)
    if teacher_map.shape[2:] != student_map.shape[2:]:
        raise DistillationInputError(
            f"cannot resize a teacher feature map of shape {tuple(teacher_map.shape)} to the student's "
            f"{tuple(student_map.shape)}: InDistill reads (N, C, H, W) maps or (N, L, C) tokens."
        )
    return teacher_map


def _first_tensor(output: Any) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    if isinstance(output, Mapping):
        for value in output.values():
            if isinstance(value, torch.Tensor):
                return value
    raise DistillationInputError(f"InDistill hooks read tensor outputs; a hooked module returned {type(output).__name__}.")


class _StopForward(Exception):
    """Raised by the teacher hook once its feature is captured: the rest of the teacher is not needed."""


class FeatureHooks:
    """Forward hooks that store the outputs of modules (by name) in ``self.features``; ``remove()`` detaches them."""

    def __init__(self, modules: Mapping[str, nn.Module], stop_after: bool = False):
        self.features: dict[str, torch.Tensor] = {}
        self.handles = []
        self.stop_after = stop_after
        self.enabled = True  # the stage arms the hooks only around its own forward passes (not during evaluation)
        for name, module in modules.items():
            self.handles.append(module.register_forward_hook(self._hook(name)))

    def _hook(self, name):
        def hook(module, inputs, output):
            if not self.enabled:
                return None
            self.features[name] = _first_tensor(output)
            if self.stop_after:
                raise _StopForward

        return hook

    def pop(self, name: str) -> torch.Tensor | None:
        return self.features.pop(name, None)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []
        self.features = {}


# ----------------------------------------------------------------------------------------------------------------
# the stage
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class _ResolvedPair:
    pair: LayerPair
    teacher_module: nn.Module
    student_module: nn.Module
    producer: nn.Module | None
    teacher_width: int | None
    student_width: int | None
    indices: torch.Tensor | None  # teacher channels kept (None: widths already equal)


class InDistillStage:
    """The warm-up: schedule, hooks and loss. Built by the trainer from the config (see the module docstring)."""

    def __init__(self, teacher: nn.Module, student: nn.Module, pairs: Sequence[LayerPair], durations: Sequence[float],
                 unit: str = "epoch", weight: float = 1.0, teacher_adapter=None):
        if not pairs:
            raise DistillationInputError("InDistill needs at least one layer pair (indistill_layers).")
        self.teacher = teacher
        self.teacher_adapter = teacher_adapter
        self.pairs = list(pairs)
        self.schedule = CurriculumSchedule(durations, unit)
        if len(self.schedule.durations) != len(self.pairs):
            raise DistillationInputError(
                f"{len(self.schedule.durations)} durations for {len(self.pairs)} InDistill layer pairs.")
        self.weight = float(weight)
        self.resolved = [self._resolve(teacher, student, p) for p in self.pairs]
        self.history: list[tuple[int, float, int | None]] = []  # (global_step, epoch, pair) at each change
        self.last_active: int | None = None
        self._current: int | None = None
        self._teacher_hooks: FeatureHooks | None = None
        self._student_hooks: FeatureHooks | None = None
        self.finished = False
        self.counter = None  # a TeacherRunner-like object whose ``calls`` count the warm-up's teacher passes

    @classmethod
    def from_config(cls, config, teacher: nn.Module, student: nn.Module, teacher_adapter=None) -> "InDistillStage | None":
        pairs = parse_layer_pairs(getattr(config, "indistill_layers", None))
        if not pairs:
            return None
        durations = curriculum_durations(len(pairs), config.indistill_a, config.indistill_durations)
        return cls(teacher, student, pairs, durations, config.indistill_unit, config.indistill_weight, teacher_adapter)

    @staticmethod
    def _resolve(teacher: nn.Module, student: nn.Module, pair: LayerPair) -> _ResolvedPair:
        t_mod = resolve_module(teacher, pair.teacher, "teacher")
        s_mod = resolve_module(student, pair.student, "student")
        if pair.producer:
            producer = resolve_module(teacher, pair.producer, "teacher")
            if not _is_producer(producer):
                raise DistillationInputError(
                    f"the producer {pair.producer!r} of pair {pair} is a {type(producer).__name__}; give the Conv or "
                    "Linear layer whose filters / weight rows write the teacher feature's channels."
                )
        else:
            producer = producer_for_path(teacher, pair.teacher)
        s_producer = producer_for_path(student, pair.student)
        t_width = out_width(producer) if producer is not None else None
        s_width = out_width(s_producer) if s_producer is not None else None
        indices = None
        if t_width is not None and s_width is not None:
            if s_width > t_width:
                raise DistillationInputError(
                    f"InDistill pair {pair}: the student layer has {s_width} channels, more than the teacher layer's "
                    f"{t_width}. Channel selection can only shrink the teacher's map: pair the student layer with a "
                    "teacher layer at least as wide, or use a wider auxiliary teacher (indistill_teacher=...)."
                )
            if s_width < t_width:
                indices = select_channels(producer, s_width)
        return _ResolvedPair(pair, t_mod, s_mod, producer, t_width, s_width, indices)

    # -- schedule ------------------------------------------------------------------------------------------------
    def active(self, state) -> int | None:
        """The pair active at the trainer's position (None after the warm-up); (un)registers hooks on changes."""
        if self.finished:
            return None
        index = self.schedule.active(self.schedule.position(state))
        if index != self._current:
            self._switch(index, state)
        return index

    def _switch(self, index: int | None, state) -> None:
        self._remove_hooks()
        self._current = index
        self.history.append((int(getattr(state, "global_step", 0) or 0), float(getattr(state, "epoch", 0.0) or 0.0), index))
        if index is None:
            self.finished = True
            self.last_active = None
            logger.info("InDistill: warm-up finished at %s %g; the main method takes over.", self.schedule.unit,
                        self.schedule.position(state))
            return
        r = self.resolved[index]
        self._teacher_hooks = FeatureHooks({"t": r.teacher_module}, stop_after=True)
        self._student_hooks = FeatureHooks({"s": r.student_module})
        self._teacher_hooks.enabled = self._student_hooks.enabled = False
        end = self.schedule.ends[index]
        logger.info("InDistill: layer pair %d (%s) active until %s %g", index, r.pair, self.schedule.unit, end)

    def _remove_hooks(self) -> None:
        for hooks in (self._teacher_hooks, self._student_hooks):
            if hooks is not None:
                hooks.remove()
        self._teacher_hooks = self._student_hooks = None

    def close(self) -> None:
        """Removes every hook (the trainer calls it when train() returns or raises)."""
        self._remove_hooks()
        self._current = None

    # -- loss ----------------------------------------------------------------------------------------------------
    def run_teacher(self, batch: Mapping[str, Any]) -> torch.Tensor:
        """Runs the stage teacher up to the active pair's module (no grad); returns its captured feature."""
        self._teacher_hooks.enabled = True
        with torch.no_grad():
            try:
                self.teacher_adapter.encode(self.teacher, batch, prefix="teacher_")
            except _StopForward:
                pass
            finally:
                self._teacher_hooks.enabled = False
        feature = self._teacher_hooks.pop("t")
        if feature is not None and self.counter is not None:
            self.counter.calls += feature.shape[0]
        if feature is None:
            raise DistillationInputError(
                f"the teacher module {self.resolved[self._current].pair.teacher!r} did not run during the teacher's "
                "forward pass: pick a module on the path from the inputs to the outputs."
            )
        return feature

    def feature_loss(self, index: int, teacher_map: torch.Tensor, student_map: torch.Tensor) -> torch.Tensor:
        """MSE between the student's map and the teacher's channel-selected, resized map (pair ``index``)."""
        r = self.resolved[index]
        if student_map.dim() != teacher_map.dim():
            raise DistillationInputError(
                f"InDistill pair {r.pair}: teacher feature {tuple(teacher_map.shape)} and student feature "
                f"{tuple(student_map.shape)} have different ranks."
            )
        dim = 1 if teacher_map.dim() != 3 else -1
        t_width, s_width = teacher_map.shape[dim], student_map.shape[dim]
        if r.teacher_width is not None and t_width != r.teacher_width:
            raise DistillationInputError(
                f"InDistill pair {r.pair}: the teacher feature has {t_width} channels but its producing layer writes "
                f"{r.teacher_width}: name the producing Conv/Linear explicitly ('teacher:student:producer.path')."
            )
        if s_width > t_width:
            raise DistillationInputError(
                f"InDistill pair {r.pair}: the student feature has {s_width} channels, more than the teacher's "
                f"{t_width}; pair it with a wider teacher layer or use an auxiliary teacher."
            )
        if s_width < t_width:
            indices = r.indices
            if indices is None or indices.numel() != s_width:
                if r.producer is None:
                    raise DistillationInputError(
                        f"InDistill pair {r.pair}: widths differ ({t_width} -> {s_width}) and no Conv/Linear producing "
                        "the teacher feature was found; give it as 'teacher:student:producer.path'."
                    )
                indices = r.indices = select_channels(r.producer, s_width)
            teacher_map = teacher_map.index_select(dim, indices.to(teacher_map.device))
        teacher_map = resize_like(teacher_map, student_map)
        return losses.fitnet_loss(student_map, teacher_map)

    def loss_terms(self, index: int, batch: Mapping[str, Any], run_student) -> tuple[dict[str, torch.Tensor], Any]:
        """Warm-up terms for one batch: the teacher's and the student's features of pair ``index``.

        ``run_student()`` runs the (possibly DDP-wrapped) student container and returns its output; every tensor in
        it is added with weight 0 so that DDP sees a gradient for each parameter used in the forward pass.
        """
        teacher_map = self.run_teacher(batch)
        self._student_hooks.enabled = True
        try:
            output = run_student()
        finally:
            self._student_hooks.enabled = False
        student_map = self._student_hooks.pop("s")
        if student_map is None:
            raise DistillationInputError(
                f"the student module {self.resolved[index].pair.student!r} did not run during the student's forward "
                "pass: pick a module on the path from the inputs to the outputs."
            )
        loss = self.weight * self.feature_loss(index, teacher_map, student_map)
        self.last_active = index
        return {"indistill_mse": loss + _zero_touch(output)}, output


def _zero_touch(output: Any) -> torch.Tensor:
    """0 * (sum of every float tensor in ``output``): a zero that connects all used parameters to the loss."""
    total = torch.zeros(())
    tensors = []

    def walk(x):
        if isinstance(x, torch.Tensor):
            if x.is_floating_point() and x.requires_grad:
                tensors.append(x)
        elif isinstance(x, Mapping):
            for v in x.values():
                walk(v)
        elif isinstance(x, (list, tuple)):
            for v in x:
                walk(v)
        elif hasattr(x, "__dataclass_fields__"):
            for name in x.__dataclass_fields__:
                walk(getattr(x, name))

    walk(output)
    if not tensors:
        return total
    return sum(t.float().sum() for t in tensors) * 0.0


def demo_indistill_layers(kind: str = "digits") -> list[str]:
    """Default layer pairs for the demo's ``indistill+<method>`` entries: ``digits`` (the demo's SimpleCNN teacher
    -> student: the post-ReLU map of the first conv, 32 -> 4 channels by L1 selection), ``resnet`` (timm ResNet
    stages but the last, earliest first), ``vit`` (open_clip vision tower blocks)."""
    if kind == "digits":
        return ["features.1:features.1"]
    if kind == "resnet":
        return ["layer1:layer1", "layer2:layer2", "layer3:layer3"]
    if kind == "vit":
        return ["transformer.resblocks.0:transformer.resblocks.0", "transformer.resblocks.1:transformer.resblocks.1"]
    raise DistillationInputError(f"unknown demo model kind {kind!r} (resnet or vit).")
