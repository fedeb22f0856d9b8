"""``capvis finetune caption --checkpoint C --train CAPTIONS --output DIR [--freeze-backbone] [--layers L]
[--val CAPTIONS] [key=value ...]``.

Continues training a captioning checkpoint's head (and backbone, unless frozen) on new image-caption
data in any supported format (COCO JSON, JSONL, CSV). The run is an ordinary pretraining run directory
(config.yaml, metrics, checkpoints), so ``capvis caption --checkpoint DIR`` uses it directly. Set
``train.iterations=N train.warmup=M`` (and learning rates) for the new run; other settings come from
the checkpoint's config.
"""

from __future__ import annotations

import argparse

COMMAND = ("finetune", "caption")
HELP = "continue training a captioning model on new image-caption data (frozen backbone or not, deeper head)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="captioning/bicaptioning checkpoint or run directory")
    parser.add_argument("--train", required=True, help="training captions (COCO JSON, JSONL or CSV)")
    parser.add_argument("--train-images", help="image folder of --train (default: from its layout)")
    parser.add_argument("--val", help="validation captions, for the validation loss")
    parser.add_argument("--val-images", help="image folder of --val")
    parser.add_argument("--output", required=True, help="run directory (config, metrics, checkpoints)")
    parser.add_argument("--freeze-backbone", action="store_true",
                        help="train the head only; the backbone's weights and BatchNorm statistics stay fixed")
    parser.add_argument("--layers", type=int, help="Transformer layers of the head; more than the checkpoint's "
                        "adds freshly initialised layers")
    parser.add_argument("--resume", nargs="?", const="auto", default=None, metavar="auto|PATH",
                        help="continue this fine-tuning run from its newest checkpoint (auto) or PATH")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")


def run(args: argparse.Namespace) -> int:
    from capvis.eval.captioning import finetune_captioning

    summary = finetune_captioning(args.checkpoint, args.output, train=args.train, train_images=args.train_images,
                                  val=args.val, val_images=args.val_images, layers=args.layers,
                                  freeze_backbone=args.freeze_backbone, overrides=args.overrides,
                                  resume=args.resume, progress=not args.no_progress)
    last = summary.get("last") or {}
    new = summary["new_weights"]
    print(f"finetune caption: stopped at iteration {summary['iteration']}, loss {last.get('loss', float('nan')):.4f}, "
          f"backbone {'frozen' if summary['freeze_backbone'] else 'trained'}, "
          f"{len(new)} new weight tensors, output {summary['output']}")
    return 0
