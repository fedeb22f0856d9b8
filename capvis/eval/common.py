"""What every ``capvis eval``/``finetune`` command shares: model arguments, runtime arguments, final JSON.

Each evaluation takes the model the same way (``--checkpoint CKPT|RUN_DIR|random``, ``--config FILE``
for ``random``, trailing ``key=value`` config overrides such as ``model.backbone=resnet18``), runs on
``--device``, and ends by printing one JSON line with its metrics, so scripts read the last line of
stdout and nothing else. Heavy imports stay inside the functions (``capvis --help`` stays fast).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from capvis.loading import Pretrained


def add_model_arguments(parser: argparse.ArgumentParser, *, required: bool = True) -> None:
    """``--checkpoint``, ``--config`` and positional ``key=value`` overrides."""
    parser.add_argument("--checkpoint", required=required, metavar="CKPT|RUN_DIR|random",
                        help="capvis training checkpoint, run directory (newest valid checkpoint), or "
                             "'random' for the randomly initialised baseline (needs --config)")
    parser.add_argument("--config", default=None,
                        help="config (file or bundled name) that defines the model for --checkpoint random")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides, e.g. model.backbone=resnet18 (applied to the checkpoint's config too)")


def add_runtime_arguments(parser: argparse.ArgumentParser, *, batch_size: int = 64, workers: int = 4,
                          workers_flag: str = "--workers") -> None:
    """``--device``, ``--batch-size`` and the data-loading processes: ``--loader-workers`` everywhere, also
    spelled ``workers_flag`` (``--workers``) where that name is not taken by SVM processes."""
    parser.add_argument("--device", default="auto", help="auto (cuda when available) | cpu | cuda | cuda:N")
    parser.add_argument("--batch-size", type=int, default=batch_size, help=f"images per batch (default {batch_size})")
    flags = (workers_flag,) if workers_flag == "--loader-workers" else (workers_flag, "--loader-workers")
    parser.add_argument(*flags, dest="loader_workers", type=int, default=workers,
                        help=f"data-loading processes (default {workers})")


def add_image_arguments(parser: argparse.ArgumentParser, *, default_size: int | None = None) -> None:
    """``--image-size`` (center crop) and ``--resize`` (shorter side before the crop)."""
    where = f"{default_size}" if default_size else "the checkpoint's data.image_size"
    parser.add_argument("--image-size", type=int, default=default_size,
                        help=f"center-crop size (default {where})")
    parser.add_argument("--resize", type=int, default=None,
                        help="shorter side before the crop (default image_size * 256/224: 256 for 224)")


def load_model(args: argparse.Namespace) -> Pretrained:
    """The pretrained (or random) model named by the model arguments, in eval mode, on the CPU."""
    from capvis.loading import load_pretrained

    return load_pretrained(args.checkpoint, config=args.config, overrides=tuple(args.overrides or ()))


def default_images_dir(label_file: str | Path) -> Path:
    """``DIR/annotations/<kind>_<split>.json`` -> ``DIR/<split>`` when that folder exists (CaptionWorld,
    COCO: labels, instances, captions); otherwise the annotation file's own folder."""
    path = Path(label_file)
    if path.parent.name == "annotations" and "_" in path.stem:
        split = path.stem.split("_", 1)[1]
        candidate = path.parent.parent / split
        if candidate.is_dir():
            return candidate
    return path.parent


def resolve_device(name: str) -> torch.device:
    """``auto`` -> ``cuda`` when available, else ``cpu``; a CUDA request without CUDA is a ConfigError."""
    import torch

    from capvis.errors import ConfigError

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown --device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name} but no CUDA device is available")
    return device


def check_positive(**values: int | float | None) -> None:
    """ConfigError naming the first option that is not > 0 (``None`` means "default", allowed)."""
    from capvis.errors import ConfigError

    for name, value in values.items():
        if value is not None and value <= 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be > 0, got {value}")


def _json_safe(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None  # strict JSON has no NaN
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item") and callable(value.item):  # numpy / torch scalars
        return _json_safe(value.item())
    return value


def final_json(metrics: dict[str, Any]) -> str:
    """The one-line, strict-JSON form of ``metrics`` (NaN and inf become ``null``)."""
    return json.dumps(_json_safe(metrics), allow_nan=False)


def print_final_json(metrics: dict[str, Any]) -> None:
    """Print ``metrics`` as the last line of stdout (what scripts and tests parse)."""
    print(final_json(metrics), flush=True)
