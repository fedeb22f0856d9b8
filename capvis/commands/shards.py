"""``capvis shards --input ANNOTATIONS --output DIR [--shard-size N]``: WebDataset tar shards + manifest."""

from __future__ import annotations

import argparse

COMMAND = ("shards",)
HELP = "write WebDataset tar shards (.jpg bytes as-is, .json captions, .txt) and manifest.json from annotations"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input", required=True, metavar="ANNOTATIONS",
                        help="COCO captions JSON, JSONL or CSV (image,caption)")
    parser.add_argument("--images", default=None, metavar="DIR",
                        help="image folder (default: derived from the annotation file, as for data.train_images)")
    parser.add_argument("--output", required=True, metavar="DIR", help="folder for shard-NNNNNN.tar and manifest.json")
    parser.add_argument("--shard-size", type=int, default=1000, metavar="N", help="samples per shard (default 1000)")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from capvis.data.shards import write_shards_from_annotations

    manifest = write_shards_from_annotations(args.input, args.output, images=args.images,
                                             shard_size=args.shard_size)
    skipped = f", {manifest['skipped']} unreadable images skipped" if manifest["skipped"] else ""
    print(f"wrote {len(manifest['shards'])} shards with {manifest['samples']} samples{skipped}; "
          f"train with data.train={Path(args.output) / manifest['pattern']}")
    return 0
