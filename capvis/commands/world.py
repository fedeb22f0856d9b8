"""``capvis world``: write a CaptionWorld dataset (COCO captions/instances, JPEGs, downstream labels).

The output is an ordinary COCO-style folder, so ``data.train=DIR/annotations/captions_train.json``
trains on it with no other key.
"""

from __future__ import annotations

import argparse

COMMAND = ("world",)
HELP = "generate the CaptionWorld synthetic image-caption dataset as COCO-format files"

MIN_IMAGE_SIZE = 32  # below this the small shapes are a few pixels wide and no longer recognisable


def _count(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", required=True, help="dataset folder to write (created if missing)")
    parser.add_argument("--train", type=_count, default=20000, help="training images (default 20000)")
    parser.add_argument("--val", type=_count, default=1000, help="validation images (default 1000)")
    parser.add_argument("--test", type=_count, default=2000, help="test images (default 2000)")
    parser.add_argument("--seed", type=int, default=0, help="world seed; same seed, same bytes (default 0)")
    parser.add_argument("--image-size", type=int, default=64, help="image side in pixels (default 64)")
    parser.add_argument("--workers", type=int, default=None, help="processes (default: all CPU cores, max 8)")


def run(args: argparse.Namespace) -> int:
    from capvis.world import write_world
    from capvis.errors import ConfigError

    if args.image_size < MIN_IMAGE_SIZE:
        raise ConfigError(f"--image-size must be >= {MIN_IMAGE_SIZE}, got {args.image_size}")
    splits = {"train": args.train, "val": args.val, "test": args.test}
    if not any(splits.values()):
        raise ConfigError("nothing to write: --train, --val and --test are all 0")
    summary = write_world(args.output, splits, seed=args.seed, image_size=args.image_size,
                          workers=args.workers)
    counts = ", ".join(f"{split} {n}" for split, n in summary["splits"].items())
    print(f"CaptionWorld: {counts} images ({args.image_size}px, seed {args.seed}) -> {args.output} "
          f"in {summary['seconds']:.1f} s")
    return 0
