"""Image-caption transforms on uint8 CHW tensors (torchvision.transforms.v2 functional ops).

The train transform is a *pair* transform: a horizontal flip mirrors the image and swaps the whole
words "left" and "right" in the caption in one decision (unlike the original VirTex, whose plain
substring swap turns "bright" into "bleft"). All random draws come from an explicit
``torch.Generator`` in a fixed order, whatever the outcomes, so one seed gives one sample and a
flipped sample is exactly the mirror of the unflipped one drawn with the same seed. The global torch
RNG is never touched, so data loading in the main process cannot disturb model randomness.
"""

from __future__ import annotations

import math
import re

import torch
from torch import Tensor
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from capvis.config import DataConfig

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_LEFT_RIGHT = re.compile(r"\b(left|right)\b", re.IGNORECASE)


def swap_left_right(caption: str) -> str:
    """Swap the whole words "left" and "right" (keeping their case); "bright" and "leftover" stay."""

    def swap(match: re.Match[str]) -> str:
        word = match.group(0)
        new = "right" if word.lower() == "left" else "left"
        if word.isupper():
            return new.upper()
        return new.capitalize() if word[0].isupper() else new

    return _LEFT_RIGHT.sub(swap, caption)


def _uniform(g: torch.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=g))


def _randint(g: torch.Generator, n: int) -> int:
    """Uniform integer in [0, n)."""
    return int(torch.randint(n, (), generator=g))


class PairTransform:
    """Base class of transforms that see the caption too: ``(image, caption, generator) -> (image, caption)``."""

    def __call__(self, image: Tensor, caption: str, generator: torch.Generator) -> tuple[Tensor, str]:
        raise NotImplementedError


class TrainTransform(PairTransform):
    """VirTex's train pipeline: random resized crop -> flip (+ caption swap) -> color jitter -> normalize."""

    def __init__(
        self,
        *,
        size: int = 224,
        crop_scale: tuple[float, float] = (0.2, 1.0),
        crop_ratio: tuple[float, float] = (3 / 4, 4 / 3),
        hflip_p: float = 0.5,
        color_jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.1),
        color_jitter_p: float = 0.8,
    ) -> None:
        self.size = size
        self.crop_scale = crop_scale
        self.crop_ratio = crop_ratio
        self.hflip_p = hflip_p
        self.color_jitter = color_jitter
        self.color_jitter_p = color_jitter_p

    def __call__(self, image: Tensor, caption: str, generator: torch.Generator) -> tuple[Tensor, str]:
        plan, caption = self.plan(image.shape[-2], image.shape[-1], caption, generator)
        return apply_plan(image, plan), caption

    def plan(self, height: int, width: int, caption: str, generator: torch.Generator) -> tuple[Tensor, str]:
        """Every random decision for an image of ``height`` x ``width``, as a (15,) float64 tensor that
        :func:`apply_plan` carries out on any device (so a worker can plan and a GPU decode and apply);
        the caption comes back with left/right swapped when the plan flips."""
        top, left, h, w = self.crop_params(height, width, generator)
        flip = float(torch.rand((), generator=generator)) < self.hflip_p
        jitter = float(torch.rand((), generator=generator)) < self.color_jitter_p
        order, factors = self.jitter_params(generator)  # always drawn: outcomes never shift later draws
        if flip:
            caption = swap_left_right(caption)
        values = [top, left, h, w, float(flip), float(jitter), *order, *factors, self.size]
        return torch.tensor(values, dtype=torch.float64), caption

    def crop_params(self, height: int, width: int, g: torch.Generator) -> tuple[int, int, int, int]:
        """torchvision's RandomResizedCrop.get_params, drawing from ``g``: (top, left, h, w)."""
        area = height * width
        log_lo, log_hi = math.log(self.crop_ratio[0]), math.log(self.crop_ratio[1])
        for _ in range(10):
            target = area * _uniform(g, *self.crop_scale)
            aspect = math.exp(_uniform(g, log_lo, log_hi))
            w = int(round(math.sqrt(target * aspect)))
            h = int(round(math.sqrt(target / aspect)))
            if 0 < w <= width and 0 < h <= height:
                return _randint(g, height - h + 1), _randint(g, width - w + 1), h, w
        ratio = width / height  # fallback: the largest central crop within the ratio range
        if ratio < self.crop_ratio[0]:
            w, h = width, int(round(width / self.crop_ratio[0]))
        elif ratio > self.crop_ratio[1]:
            h, w = height, int(round(height * self.crop_ratio[1]))
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w

    def jitter_params(self, g: torch.Generator) -> tuple[list[int], tuple[float, float, float, float]]:
        """Random order of the four adjustments and their factors (as torchvision's ColorJitter)."""
        b, c, s, hue = self.color_jitter
        order = torch.randperm(4, generator=g).tolist()
        factors = (_uniform(g, max(0.0, 1 - b), 1 + b), _uniform(g, max(0.0, 1 - c), 1 + c),
                   _uniform(g, max(0.0, 1 - s), 1 + s), _uniform(g, -hue, hue))
        return order, factors


def apply_plan(image: Tensor, plan: Tensor) -> Tensor:
    """uint8 (3, H, W) -> the normalized (3, S, S) crop :meth:`TrainTransform.plan` decided, on the image's device."""
    values = plan.tolist()
    top, left, h, w, flip, jitter = (int(v) for v in values[:6])
    order, factors, size = [int(v) for v in values[6:10]], tuple(values[10:14]), int(values[14])
    image = F.resized_crop(image, top, left, h, w, [size, size], antialias=True)
    if flip:
        image = F.horizontal_flip(image)
    if jitter:
        image = _apply_jitter(image, order, factors)
    return normalize(image)


def _apply_jitter(image: Tensor, order: list[int], factors: tuple[float, float, float, float]) -> Tensor:
    ops = (F.adjust_brightness, F.adjust_contrast, F.adjust_saturation, F.adjust_hue)
    neutral = (1.0, 1.0, 1.0, 0.0)
    for k in order:
        if factors[k] != neutral[k]:
            image = ops[k](image, factors[k])
    return image


def normalize(image: Tensor) -> Tensor:
    """uint8 (3, H, W) -> float32 ImageNet-normalized (same result as VirTex's 0-255 mean/std)."""
    image = F.to_dtype(image, torch.float32, scale=True)
    return F.normalize(image, list(IMAGENET_MEAN), list(IMAGENET_STD))


def build_train_transform(cfg: DataConfig) -> TrainTransform:
    return TrainTransform(size=cfg.image_size, crop_scale=tuple(cfg.crop_scale), hflip_p=cfg.hflip_p,
                          color_jitter=tuple(cfg.color_jitter), color_jitter_p=cfg.color_jitter_p)


def eval_geometry(image_size: int, resize: int | None = None) -> v2.Compose:
    """The uint8 part of :func:`build_eval_transform`: shorter side to ``resize`` (default ``image_size``),
    center crop."""
    return v2.Compose([v2.Resize(resize or image_size, antialias=True), v2.CenterCrop(image_size)])


def eval_normalize() -> v2.Compose:
    """The float part of :func:`build_eval_transform`: scale to [0, 1], ImageNet normalisation."""
    return v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(IMAGENET_MEAN), list(IMAGENET_STD))])


def normalize_batch(images: Tensor) -> Tensor:
    """uint8 (B, 3, H, W) -> float32, scaled and normalised: :func:`eval_normalize` on a whole batch (the
    same elementwise arithmetic, so the same values)."""
    return eval_normalize()(images)


def build_eval_transform(image_size: int, resize: int | None = None) -> v2.Compose:
    """Deterministic image-only transform: shorter side to ``resize`` (default ``image_size``), center crop.

    VirTex's pretraining val loss resizes to the crop size itself; downstream evaluations pass 256.
    """
    return v2.Compose([*eval_geometry(image_size, resize).transforms, *eval_normalize().transforms])
