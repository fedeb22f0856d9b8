"""The rules a config must satisfy once it is built: allowed choices, positive sizes, ranges.

Kept apart from loading (capvis/config.py) so that each rule is one readable line of this module; derived
values (attention heads, feed-forward width) are filled in here, never stored as stale defaults.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from capvis.errors import ConfigError

CHOICES = {
    "train.optimizer": ("sgd", "adamw"),
    "train.schedule": ("cosine", "linear", "none"),
    "train.precision": ("auto", "fp32", "bf16", "fp16"),
    "train.device": ("auto", "cpu", "cuda"),
    "train.strategy": ("ddp", "fsdp"),
    "data.decode_device": ("cpu", "cuda"),
}


def validate(cfg: Any) -> Any:
    """Reject impossible combinations in a :class:`capvis.config.Config` (typed ``Any``: config imports this
    module, not the other way round) and return it with the derived values filled in."""
    flat = {"train.optimizer": cfg.train.optimizer, "train.schedule": cfg.train.schedule,
            "train.precision": cfg.train.precision, "train.device": cfg.train.device,
            "train.strategy": cfg.train.strategy, "data.decode_device": cfg.data.decode_device}
    for key, allowed in CHOICES.items():
        if flat[key] not in allowed:
            raise ConfigError(f"config key '{key}' must be one of {', '.join(allowed)}, got {flat[key]!r}")
    t = cfg.model.textual
    heads = t.heads or t.hidden // 64
    if t.hidden <= 0 or heads <= 0 or t.hidden % heads or (not t.heads and t.hidden % 64):
        raise ConfigError(
            f"model.textual.hidden={t.hidden} must be a positive multiple of 64 (heads = hidden/64) "
            f"or divisible by model.textual.heads={t.heads}")
    if not 0 <= t.parallel_fraction <= 1:
        raise ConfigError(f"model.textual.parallel_fraction must be in [0, 1], got {t.parallel_fraction}")
    if not 0 <= t.label_smoothing < 1:
        raise ConfigError(f"model.textual.label_smoothing must be in [0, 1), got {t.label_smoothing}")
    textual = dataclasses.replace(t, heads=heads, feedforward=t.feedforward or 4 * t.hidden)
    positive = {"data.image_size": cfg.data.image_size, "data.max_caption_length": cfg.data.max_caption_length,
                "train.batch_size": cfg.train.batch_size, "train.iterations": cfg.train.iterations,
                "train.log_every": cfg.train.log_every, "train.checkpoint_every": cfg.train.checkpoint_every,
                "model.textual.layers": t.layers, "train.accumulate": cfg.train.accumulate}
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"config key '{key}' must be positive, got {value}")
    rates = {"train.lr_backbone": cfg.train.lr_backbone, "train.lr_textual": cfg.train.lr_textual,
             "train.weight_decay": cfg.train.weight_decay, "train.momentum": cfg.train.momentum}
    for key, value in rates.items():
        if not math.isfinite(value) or value < 0:
            raise ConfigError(f"config key '{key}' must be a finite number >= 0, got {value}")
    if cfg.data.max_caption_length < 3:
        raise ConfigError("data.max_caption_length must be at least 3 ([SOS], a token, [EOS])")
    if cfg.data.cache_images_mb < 0:
        raise ConfigError(f"data.cache_images_mb must be >= 0 (0 keeps no decoded image), got {cfg.data.cache_images_mb}")
    if not 0 < cfg.data.fraction <= 1:
        raise ConfigError(f"data.fraction must be in (0, 1], got {cfg.data.fraction}")
    if cfg.train.warmup < 0 or cfg.train.warmup > cfg.train.iterations:
        raise ConfigError(f"train.warmup={cfg.train.warmup} must lie in [0, train.iterations={cfg.train.iterations}]")
    lo, hi = cfg.data.crop_scale
    if not 0 < lo <= hi <= 1:
        raise ConfigError(f"data.crop_scale must satisfy 0 < min <= max <= 1, got {cfg.data.crop_scale}")
    model = dataclasses.replace(cfg.model, textual=textual)
    return dataclasses.replace(cfg, model=model)
