"""One view per sample for the teacher AND the student (CIFD Fig. 2 / Fig. 8, every KD codebase).

When the two models preprocess differently (CLIP pairs, ResNet50 -> MobileNet, other sizes or mean/std), running
each model's own transform on the decoded image would give the teacher a centre crop and the student an independent
random crop: every KD, RDM and embedding target would describe another picture. :class:`SharedView` instead draws
ONE random geometry per sample (a crop box and a flip, plus the student's other augmentations) from the student's
training transform, applies it once to the decoded image, and then gives each model its own resize and
normalisation of that same view (``pixel_values`` / ``teacher_pixel_values``). Evaluation uses the student's
centre crop as the shared region.

The transforms are read from the models' own torchvision pipelines (timm, open_clip, the plain CNNs): the
random geometry from ``RandomResizedCrop`` (any class with ``scale`` / ``ratio``) or ``RandomCrop(padding=...)`` and
``RandomHorizontalFlip``; the output size, interpolation and mean / std from each model's evaluation transform.
Any other step of the student's training transform (e.g. ``ColorJitter``) is applied to the shared view, once.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from ..checks import DistillationInputError

# Steps that only convert or finish an image (each model's own finishing is rebuilt from its eval transform).
_FINISHING = ("Resize", "CenterCrop", "ToTensor", "MaybeToTensor", "MaybeConvertMode", "Normalize", "ToNumpy",
              "ConvertImageDtype", "PILToTensor", "Grayscale", "ResizeKeepRatio", "ToRGB")


def _steps(transform) -> list:
    steps = getattr(transform, "transforms", None)
    if steps is None:
        raise DistillationInputError(
            f"cannot read the steps of {type(transform).__name__}: a same-view pair needs torchvision Compose "
            "transforms (timm / open_clip / hf_cifd's own); pass separate transforms instead.")
    return list(steps)


def _size(value) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    value = tuple(value)
    return (value[0], value[0]) if len(value) == 1 else (int(value[0]), int(value[1]))


@dataclass(frozen=True)
class Finish:
    """A model's own resize + normalisation of a view: PIL image -> normalised tensor of ``size``."""

    size: tuple[int, int]
    interpolation: Any
    mean: tuple[float, ...]
    std: tuple[float, ...]
    grayscale: bool = False

    def __call__(self, view) -> torch.Tensor:
        from torchvision.transforms import functional as F

        img = F.resize(view, list(self.size), interpolation=self.interpolation, antialias=True)
        if self.grayscale:
            img = F.to_grayscale(img, num_output_channels=1)
        return F.normalize(F.to_tensor(img), list(self.mean), list(self.std))


def finish_of(eval_transform) -> tuple[Finish, float]:
    """``(Finish, centre-crop fraction)`` read from an evaluation transform ``[Resize, CenterCrop, ..., Normalize]``:
    output size = the CenterCrop's, interpolation = the Resize's, mean / std = the Normalize's; the fraction is
    crop size / resize size (timm's crop_pct)."""
    from torchvision.transforms import InterpolationMode

    size = resize = None
    interpolation, mean, std, gray = InterpolationMode.BILINEAR, None, None, False
    for step in _steps(eval_transform):
        name = type(step).__name__
        if name in ("Resize", "ResizeKeepRatio"):
            resize = step.size
            interpolation = getattr(step, "interpolation", interpolation)
        elif name == "CenterCrop":
            size = _size(step.size)
        elif name == "Normalize":
            mean = tuple(float(v) for v in torch.as_tensor(step.mean).flatten())
            std = tuple(float(v) for v in torch.as_tensor(step.std).flatten())
        elif name == "Grayscale":
            gray = True
    if size is None or mean is None:
        raise DistillationInputError(
            f"the evaluation transform {eval_transform} has no CenterCrop or no Normalize: cannot tell the model's input "
            "size and normalisation for a same-view pair.")
    if isinstance(interpolation, str):
        interpolation = InterpolationMode(interpolation)
    shorter = min(_size(resize)) if resize is not None else min(size)
    return Finish(size, interpolation, mean, std, gray), min(1.0, min(size) / shorter)


class SharedView:
    """``img -> (student_tensor, teacher_tensor or None)``: one geometry, each model's own finishing.

    Args:
        student_train: the student's training transform (its random geometry and augmentations are reused).
        student_eval / teacher_eval: the models' evaluation transforms (their sizes, interpolation, mean / std).
        train: random geometry (training) or the student's centre crop (evaluation).
        seed: seeds the geometry draws (per worker: the seed plus the DataLoader worker id).

    The teacher tensor is None when both models finish identically (the teacher then reads ``pixel_values``).
    """

    def __init__(self, student_train, student_eval, teacher_eval, *, train: bool = True, seed: int | None = None):
        self.student, self.crop_fraction = finish_of(student_eval)
        self.teacher, _ = finish_of(teacher_eval)
        self.same = self.teacher == self.student
        self.train = train
        self.resized_crop = self.pad = None
        self.flip = 0.0
        self.extra: list[Callable] = []
        if train:
            for step in _steps(student_train):
                name = type(step).__name__
                if hasattr(step, "scale") and hasattr(step, "ratio"):
                    self.resized_crop = (tuple(step.scale), tuple(step.ratio))
                elif name == "RandomCrop":
                    pad = step.padding if isinstance(step.padding, int) else max(step.padding or (0,))
                    self.pad = pad / max(_size(step.size))
                elif name == "RandomHorizontalFlip":
                    self.flip = float(step.p)
                elif name not in _FINISHING:
                    self.extra.append(step)
        self._seed = seed
        self._rng: random.Random | None = None

    def describe(self) -> str:
        if not self.train:
            return f"centre crop {self.crop_fraction:.3g} of the shorter side"
        geometry = (f"random resized crop scale={self.resized_crop[0]} ratio={self.resized_crop[1]}"
                    if self.resized_crop else f"pad {self.pad:.3g} + random crop" if self.pad else "centre crop")
        extra = "".join(f" + {type(s).__name__}" for s in self.extra)
        return f"{geometry}, flip p={self.flip:g}{extra}"

    def _random(self) -> random.Random:
        if self._rng is None:
            info = torch.utils.data.get_worker_info()
            base = self._seed if self._seed is not None else torch.initial_seed()
            self._rng = random.Random(base + (info.id if info is not None else 0))
        return self._rng

    def box(self, width: int, height: int) -> tuple[tuple[int, int, int, int], bool]:
        """``((left, top, right, bottom), flipped)`` of the next view of a ``width`` x ``height`` image; the box may
        extend beyond the image (zero padding) for pad-crop geometry."""
        rng = self._random()
        if not self.train or (self.resized_crop is None and not self.pad):
            side = round(min(width, height) * self.crop_fraction)
            left, top = (width - side) // 2, (height - side) // 2
            return (left, top, left + side, top + side), self.train and rng.random() < self.flip
        if self.resized_crop is not None:
            (s0, s1), (r0, r1) = self.resized_crop
            area = width * height
            for _ in range(10):  # torchvision RandomResizedCrop.get_params
                target = area * rng.uniform(s0, s1)
                aspect = math.exp(rng.uniform(math.log(r0), math.log(r1)))
                w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
                if 0 < w <= width and 0 < h <= height:
                    left, top = rng.randint(0, width - w), rng.randint(0, height - h)
                    return (left, top, left + w, top + h), rng.random() < self.flip
            side = min(width, height)  # fallback: centre square
            left, top = (width - side) // 2, (height - side) // 2
            return (left, top, left + side, top + side), rng.random() < self.flip
        pad = round(self.pad * max(width, height))
        left, top = rng.randint(-pad, pad), rng.randint(-pad, pad)
        return (left, top, left + width, top + height), rng.random() < self.flip

    def view(self, img):
        """The shared PIL view of ``img`` (crop box, flip, the student's other augmentations)."""
        from PIL import ImageOps

        box, flipped = self.box(*img.size)
        view = img.crop(box)  # PIL pads outside the image with zeros
        if flipped:
            view = ImageOps.mirror(view)
        for step in self.extra:
            view = step(view)
        return view

    def __call__(self, img) -> tuple[torch.Tensor, torch.Tensor | None]:
        view = self.view(img)
        return self.student(view), (None if self.same else self.teacher(view))


def shared_views(student_train, student_eval, teacher_eval, seed: int | None = None) -> tuple[SharedView, SharedView]:
    """(training view, evaluation view) for a teacher / student pair."""
    return (SharedView(student_train, student_eval, teacher_eval, train=True, seed=seed),
            SharedView(student_train, student_eval, teacher_eval, train=False, seed=seed))


def needs_teacher_view(student_eval, teacher_eval) -> bool:
    """Whether the teacher's size / interpolation / normalisation differ from the student's."""
    return finish_of(student_eval)[0] != finish_of(teacher_eval)[0]


def progressive_resolution(epoch: float, min_res: int, max_res: int, start_epoch: float, end_epoch: float) -> int:
    """ffcv's progressive-resizing rule (ffcv-imagenet ``get_resolution``, the "defaults from ffcv" the paper's
    ImageNet students train with): ``min_res`` up to ``start_epoch``, ``max_res`` from ``end_epoch``, linear in
    between, rounded to a multiple of 32."""
    if epoch <= start_epoch:
        return int(min_res)
    if epoch >= end_epoch:
        return int(max_res)
    res = min_res + (epoch - start_epoch) / (end_epoch - start_epoch) * (max_res - min_res)
    return int(round(res / 32)) * 32


__all__: Sequence[str] = ("Finish", "SharedView", "finish_of", "needs_teacher_view", "progressive_resolution",
                          "shared_views")
