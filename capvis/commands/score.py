"""``capvis score --checkpoint C --annotations CAPTIONS.json [--images DIR]``: caption NLL per token."""

from __future__ import annotations

import argparse
import json

from capvis.eval.common import add_model_arguments, add_runtime_arguments

COMMAND = ("score",)
HELP = "token-weighted NLL of every caption of every image under a captioning model (forward and backward)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--annotations", required=True, help="captions: COCO captions JSON, JSONL or CSV")
    parser.add_argument("--images", default=None, help="image folder (default: derived from the annotation file)")
    parser.add_argument("--image-size", type=int, default=None,
                        help="shorter side and center crop (default the checkpoint's data.image_size)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_runtime_arguments(parser, batch_size=32, workers=2)


def run(args: argparse.Namespace) -> int:
    from capvis.data.annotations import read_records
    from capvis.errors import CheckpointError
    from capvis.eval.common import check_positive, load_model, resolve_device
    from capvis.eval.score import score_captions
    from capvis.hub import load
    from capvis.release import is_release
    from capvis.tasks.protocols import CaptionLikelihoodModel, require

    check_positive(batch_size=args.batch_size, image_size=args.image_size)
    if is_release(args.checkpoint):
        task = load(args.checkpoint, "model", overrides=tuple(args.overrides))
        cfg, tokenizer = task.config, task.tokenizer
    else:
        pre = load_model(args)
        task, cfg, tokenizer = pre.task, pre.config, pre.tokenizer
    require(task, CaptionLikelihoodModel, doing="capvis score", source=args.checkpoint)
    if tokenizer is None:
        raise CheckpointError(f"{args.checkpoint} carries no vocabulary; scoring needs the tokenizer")
    records = read_records(args.annotations, args.images)
    result = score_captions(task, tokenizer, records, image_size=args.image_size or cfg.data.image_size,
                            max_caption_length=cfg.data.max_caption_length, batch_size=args.batch_size,
                            num_workers=args.loader_workers, device=resolve_device(args.device),
                            progress=not args.no_progress, source=args.checkpoint)
    print(json.dumps(result))
    return 0
