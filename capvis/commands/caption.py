"""``capvis caption --checkpoint C IMAGES_OR_DIR... [--output captions.json]
[--method beam|greedy|nucleus|parallel] [--beam-size 5] [--top-p 0.9] [--max-steps 30] [--batch-size 32]
[--attention DIR]``.

Prints one ``file_name<TAB>caption`` line per image when no ``--output`` is given; with ``--output``
writes COCO results JSON ``[{"image_id", "caption", "file_name"}]``.
"""

from __future__ import annotations

import argparse

from capvis.eval.common import add_decoding_arguments

COMMAND = ("caption",)
HELP = "caption images (files or folders, any file names) with a captioning checkpoint"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="training checkpoint or run directory")
    parser.add_argument("images", nargs="+", metavar="IMAGES_OR_DIR", help="image files and/or folders of images")
    parser.add_argument("--output", help="write COCO results JSON here (default: print captions)")
    parser.add_argument("--attention", metavar="DIR", help="also save per-word attention overlays (PNG) here")
    add_decoding_arguments(parser)


def run(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from capvis.errors import ConfigError
    from capvis.eval.captioning import caption_images, collect_images
    from capvis.eval.common import decode_settings, resolve_device
    from capvis.loading import load_pretrained
    from capvis.tasks.protocols import Captioner, require

    settings = decode_settings(args)
    paths = collect_images(args.images)  # an empty folder fails here, before the checkpoint is read
    pre = load_pretrained(args.checkpoint)
    require(pre.task, Captioner, doing="capvis caption", source=args.checkpoint)
    if pre.tokenizer is None:
        raise ConfigError(f"{args.checkpoint} carries no vocabulary; captioning needs its tokenizer")
    results = caption_images(pre.task, pre.tokenizer, paths, image_size=pre.config.data.image_size,
                             settings=settings, batch_size=args.batch_size, num_workers=args.workers,
                             device=resolve_device(args.device), attention_dir=args.attention)
    if args.output:
        out = Path(args.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=1, ensure_ascii=False), encoding="utf-8")
        print(f"caption: {len(results)} of {len(paths)} images -> {out}")
    else:
        for r in results:
            print(f"{r['file_name']}\t{r['caption']}")
    if args.attention:
        print(f"caption: attention overlays -> {args.attention}")
    return 0
