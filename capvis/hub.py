"""``capvis.load``: a pretrained backbone (or the whole pretraining model) in one line.

Accepts a release (directory or archive, see :mod:`capvis.release`), a training checkpoint file, a
run directory (its newest valid checkpoint), or the name of a release stored under
``$CAPVIS_HOME/releases`` (default ``~/.cache/capvis/releases``). Nothing is ever downloaded.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal, Sequence

import torch
from torch import nn

from capvis.errors import CheckpointError, ConfigError

Part = Literal["backbone", "model"]
PARTS = ("backbone", "model")


def releases_dir() -> Path:
    """Where named releases live: ``$CAPVIS_HOME/releases``."""
    return Path(os.environ.get("CAPVIS_HOME", Path.home() / ".cache" / "capvis")) / "releases"


def resolve(path_or_name: str | Path) -> Path:
    """An existing path as given, else a release named so under :func:`releases_dir`."""
    path = Path(path_or_name).expanduser()
    if path.exists():
        return path
    if str(path_or_name) and os.sep not in str(path_or_name):
        for suffix in ("", ".tar", ".tar.gz", ".tgz", ".zip"):
            candidate = releases_dir() / f"{path_or_name}{suffix}"
            if candidate.exists():
                return candidate
    raise CheckpointError(f"no release, checkpoint or run directory at {path_or_name!s} "
                          f"(and no release of that name under {releases_dir()})")


def load(path_or_name: str | Path, part: Part = "backbone", *, overrides: Sequence[str] = (),
         device: str | torch.device = "cpu") -> nn.Module:
    """A ready module in eval mode, rebuilt from the file alone.

    Args:
        path_or_name: release directory/archive, training checkpoint, run directory or release name.
        part: ``"backbone"`` gives the :class:`~capvis.models.backbones.VisualBackbone` (forward
            returns the last-stage grid (B, C, h, w); ``.pooled`` the (B, C) average); ``"model"``
            gives the whole pretraining task with its ``.tokenizer`` attached.
        overrides: dotted ``key=value`` config overrides that do not change the architecture
            (e.g. ``model.textual.dropout=0``).
        device: where the module is put.

    Both carry ``.config`` (the :class:`~capvis.config.Config` it was trained with; its
    ``data.image_size`` and the ImageNet mean/std are the preprocessing).
    """
    from capvis import release
    from capvis.config import apply_overrides
    from capvis.loading import load_pretrained

    if part not in PARTS:
        raise ConfigError(f"part must be one of {', '.join(PARTS)}, got {part!r}")
    path = resolve(path_or_name)
    if release.is_release(path):
        rel = release.read_release(path, prefix="visual." if part == "backbone" else None)
        cfg = apply_overrides(rel.config, tuple(overrides)) if overrides else rel.config
        if part == "backbone":
            module = release.build_loaded_backbone(cfg, rel.state, where=str(path))
        else:
            module = release.build_loaded_task(cfg, rel.vocab_size, rel.state, where=str(path))
        tokenizer = rel.tokenizer
    else:
        pre = load_pretrained(path, overrides=tuple(overrides))
        module = pre.backbone if part == "backbone" else pre.task
        cfg, tokenizer = pre.config, pre.tokenizer
    module = module.to(device).eval()
    module.config = cfg
    if part == "model":
        module.tokenizer = tokenizer
    return module


__all__ = ["PARTS", "load", "releases_dir", "resolve"]
