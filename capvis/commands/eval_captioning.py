"""``capvis eval captioning --checkpoint C --annotations captions_val.json [--images DIR] [--output preds.json]``.

Captions every image of the caption file and scores the captions against its references: CIDEr-D and
BLEU-4 always, SPICE when Java and the SPICE jar are present (otherwise the notes say so). Ends with
one JSON line: ``cider``, ``bleu4``, ``spice``, ``notes``, ``images`` (raw scores; papers show x100).
"""

from __future__ import annotations

import argparse

from capvis.eval.common import add_decoding_arguments, decode_settings, resolve_device

COMMAND = ("eval", "captioning")
HELP = "caption a COCO-format caption set and report CIDEr-D, BLEU-4 (and SPICE when available)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="training checkpoint, run directory, or 'random'")
    parser.add_argument("--config", help="model config for --checkpoint random (needs data.vocab)")
    parser.add_argument("--annotations", required=True, help="captions JSON (COCO), JSONL or CSV")
    parser.add_argument("--images", help="image folder (default: the COCO layout's, beside annotations/)")
    parser.add_argument("--output", help="also write the predictions (COCO results JSON) here")
    parser.add_argument("--no-spice", action="store_true", help="skip SPICE even when Java is present")
    add_decoding_arguments(parser)
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides (model.* for random)")


def run(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from capvis.errors import ConfigError
    from capvis.eval.captioning import evaluate_captioning
    from capvis.loading import load_pretrained
    from capvis.tasks.protocols import Captioner, require

    settings = decode_settings(args)
    pre = load_pretrained(args.checkpoint, config=args.config, overrides=tuple(args.overrides))
    require(pre.task, Captioner, doing="capvis eval captioning", source=args.checkpoint)
    if pre.tokenizer is None:
        raise ConfigError("no vocabulary: a random model needs data.vocab=FILE.model")
    result = evaluate_captioning(pre.task, pre.tokenizer, args.annotations, images_dir=args.images,
                                 image_size=pre.config.data.image_size, settings=settings, spice=not args.no_spice,
                                 batch_size=args.batch_size, num_workers=args.workers,
                                 device=resolve_device(args.device))
    predictions = result.pop("predictions")
    if args.output:
        out = Path(args.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(predictions, indent=1, ensure_ascii=False), encoding="utf-8")
    for note in result["notes"]:
        print(f"note: {note}")
    spice = "n/a" if result["spice"] is None else f"{100 * result['spice']:.1f}"
    print(f"captioning ({pre.source}): CIDEr {100 * result['cider']:.1f}, BLEU-4 {100 * result['bleu4']:.1f}, "
          f"SPICE {spice} on {result['images']} images")
    print(json.dumps({"checkpoint": pre.source, **result}))
    return 0
