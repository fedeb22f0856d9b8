"""Learning-rate schedules: linear warm-up, then cosine (or linear, or constant) decay to zero.

The multiplier for the update made at iteration ``t`` (0-based) is ``(t + 1) / warmup`` during
warm-up, so the first update already moves (the original's first update used LR 0), then
``0.5 * (1 + cos(pi * (t - warmup) / (total - warmup)))`` for cosine, reaching 0 at ``total``.
"""

from __future__ import annotations

import math
from functools import partial

import torch

from capvis.config import TrainConfig


def lr_multiplier(t: int, *, warmup: int, total: int, kind: str) -> float:
    if t < warmup:
        return (t + 1) / warmup
    if kind == "none" or total <= warmup:
        return 1.0
    progress = min(1.0, (t - warmup) / (total - warmup))
    if kind == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if kind == "linear":
        return 1.0 - progress
    raise ValueError(f"unknown schedule {kind!r}")


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    fn = partial(lr_multiplier, warmup=cfg.warmup, total=cfg.iterations, kind=cfg.schedule)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)
