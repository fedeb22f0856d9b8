"""``capvis release --checkpoint C --output DIR|ARCHIVE``: the shareable format (safetensors + JSON + vocab)."""

from __future__ import annotations

import argparse

COMMAND = ("release",)
HELP = "write a training checkpoint as a release: safetensors weights, JSON config, SentencePiece model"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="capvis training checkpoint or run directory")
    parser.add_argument("--output", required=True,
                        help="release directory, or an archive ending in .tar, .tar.gz, .tgz or .zip")


def run(args: argparse.Namespace) -> int:
    from capvis.loading import release_from_checkpoint

    out = release_from_checkpoint(args.checkpoint, args.output)
    print(f"release: wrote {out}")
    return 0
