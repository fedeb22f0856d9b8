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


def add_decoding_arguments(parser: argparse.ArgumentParser) -> None:
    """The decoding flags of ``capvis caption`` and ``capvis eval captioning``."""
    parser.add_argument("--method", choices=("beam", "greedy", "nucleus", "parallel"), default="beam",
                        help="decoding method (default beam; parallel: one pass over [MASK] inputs, "
                             "for models trained with model.textual.parallel_fraction > 0)")
    parser.add_argument("--beam-size", type=int, default=5, help="beam width (default 5)")
    parser.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling mass (default 0.9)")
    parser.add_argument("--max-steps", type=int, default=30, help="most tokens per caption (default 30)")
    parser.add_argument("--seed", type=int, default=0, help="nucleus sampling seed (default 0)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per batch (default 32)")
    parser.add_argument("--workers", type=int, default=0, help="image-decoding worker processes (default 0)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="default: cuda if available")


def decode_settings(args: argparse.Namespace):  # -> DecodeSettings (imported lazily)
    from capvis.errors import ConfigError
    from capvis.eval.captioning import DecodeSettings

    if args.beam_size < 1 or args.max_steps < 1 or args.batch_size < 1:
        raise ConfigError("--beam-size, --max-steps and --batch-size must be positive")
    if not 0 < args.top_p <= 1:
        raise ConfigError(f"--top-p must be in (0, 1], got {args.top_p}")
    return DecodeSettings(method=args.method, beam_size=args.beam_size, top_p=args.top_p,
                          max_steps=args.max_steps, seed=args.seed)


def add_feature_arguments(parser: argparse.ArgumentParser) -> None:
    """How frozen features are computed: ``--stage`` (which backbone output is pooled; names depend on the
    backbone, checked when it is loaded) and ``--compile`` (the extraction through ``torch.compile``)."""
    parser.add_argument("--stage", default=None,
                        help="intermediate stage to pool instead of the final features: a ResNet's layer1..layer4, "
                             "a timm model's feature_info module (e.g. blocks.5, stages.2); default: the final "
                             "features (model.pool)")
    parser.add_argument("--compile", nargs="?", const="inductor", default=None, metavar="BACKEND",
                        help="extract features through torch.compile (default backend inductor): for GPUs and "
                             "large image sets; on a 2-core CPU it did not pay (docs/evaluation.md)")


def add_label_file_arguments(parser: argparse.ArgumentParser) -> None:
    """The downstream-label inputs of ``eval svm`` and ``eval labels``: two label files, their images or
    precomputed features, the tasks to score, the feature stage and cache."""
    parser.add_argument("--train", required=True, help="train label file (downstream-label format)")
    parser.add_argument("--test", required=True, help="test label file (same tasks and classes)")
    parser.add_argument("--images-train", default=None,
                        help="image folder of --train (default: DIR/<split> for DIR/annotations/labels_<split>.json, "
                             "else the label file's folder)")
    parser.add_argument("--images-test", default=None, help="image folder of --test (default as --images-train)")
    parser.add_argument("--features-train", default=None, help="precomputed features (.npy from capvis features)")
    parser.add_argument("--features-test", default=None, help="precomputed features of --test")
    parser.add_argument("--tasks", nargs="+", default=None, metavar="TASK",
                        help="score only these tasks of the label files (default: all)")
    add_feature_arguments(parser)
    parser.add_argument("--cache-dir", default=None, help="reuse/write extracted features here")


def add_probe_arguments(parser: argparse.ArgumentParser, *, scope: str, holdout_help: str) -> None:
    """The batched linear probe's sweep and held-out share (``scope`` prefixes the help: where they apply)."""
    parser.add_argument("--weight-decays", default=None, metavar="LIST",
                        help=f"{scope}: comma-separated weight decays to sweep (default 1e-6,...,1)")
    parser.add_argument("--holdout", type=float, default=0.2, help=f"{scope}: {holdout_help}")


def load_model(args: argparse.Namespace) -> Pretrained:
    """The pretrained (or random) model named by the model arguments, in eval mode, on the CPU."""
    from capvis.loading import load_pretrained

    return load_pretrained(args.checkpoint, config=args.config, overrides=tuple(args.overrides or ()))


def label_inputs(args: argparse.Namespace) -> tuple[dict[str, list[str]], list[dict], Any, list[dict], Any, str]:
    """``(tasks, train_entries, train_x, test_entries, test_x, source)`` for the arguments of
    :func:`add_label_file_arguments`: the label files with either their ``capvis features`` files or the
    frozen features of ``--checkpoint``; ``source`` is ``"features"`` or the checkpoint."""
    from capvis.data.labels import read_label_file
    from capvis.errors import ConfigError
    from capvis.eval.downstream import check_same_tasks, label_file_features, load_feature_file

    cached = (args.features_train, args.features_test)
    if any(cached) and not all(cached):
        raise ConfigError("give both --features-train and --features-test, or neither")
    if all(cached):
        tasks, train_entries = read_label_file(args.train)
        test_tasks, test_entries = read_label_file(args.test)
        check_same_tasks(tasks, test_tasks)
        train_x = load_feature_file(args.features_train, train_entries, args.train)
        test_x = load_feature_file(args.features_test, test_entries, args.test)
        return tasks, train_entries, train_x, test_entries, test_x, "features"
    if not args.checkpoint:
        raise ConfigError("give --checkpoint (or --features-train and --features-test)")
    model = load_model(args)
    tasks, train_entries, train_x, test_entries, test_x = label_file_features(
        model.backbone, args.train, args.test, images_train=args.images_train, images_test=args.images_test,
        image_size=args.image_size or model.config.data.image_size, resize=args.resize, stage=args.stage,
        batch_size=args.batch_size, num_workers=args.loader_workers, device=resolve_device(args.device),
        compile=args.compile, cache_dir=args.cache_dir, source=model.source)
    return tasks, train_entries, train_x, test_entries, test_x, model.source


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
    """A command's ``--device`` by training's rule (:func:`capvis.train.distributed.resolve_device`)."""
    from capvis.train.distributed import resolve_device as resolve

    return resolve(name, option="--device")


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
