"""``capvis caption --checkpoint C IMAGES_OR_DIR... [--output captions.json]
[--method beam|greedy|nucleus|parallel] [--beam-size 5] [--top-p 0.9] [--max-steps 30] [--batch-size 32]
[--attention DIR]``.

Prints one ``file_name<TAB>caption`` line per image when no ``--output`` is given; with ``--output``
writes COCO results JSON ``[{"image_id", "caption", "file_name"}]``.
"""

from __future__ import annotations

import argparse

COMMAND = ("caption",)
HELP = "caption images (files or folders, any file names) with a captioning checkpoint"


def add_decoding_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags shared with ``capvis eval captioning``."""
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


def resolve_device(name: str):  # -> torch.device
    import torch

    from capvis.errors import ConfigError

    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda, but no CUDA device is available")
    return torch.device("cuda" if name == "auto" and torch.cuda.is_available() else name.replace("auto", "cpu"))


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
    from capvis.loading import load_pretrained

    settings = decode_settings(args)
    paths = collect_images(args.images)  # an empty folder fails here, before the checkpoint is read
    pre = load_pretrained(args.checkpoint)
    if not hasattr(pre.task, "init_decoding") or pre.tokenizer is None:
        raise ConfigError(f"{args.checkpoint} holds a {pre.config.model.task!r} model, which cannot caption")
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
