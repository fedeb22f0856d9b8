"""``capvis eval zeroshot``: zero-shot classification on one task of a label file, by embedding or likelihood.

Prompts are built from the label file's class names with ``--templates`` and tokenized with the
checkpoint's own vocabulary; ``--method embedding`` scores them with the text encoder (contrastive,
coca), ``--method likelihood`` by their log-likelihood under the captioning head (captioning,
bicaptioning, coca; see :mod:`capvis.eval.zeroshot`). The last line of stdout is JSON:
``{"method", "top1", "chance", "mAP", "mAP_chance", "images", "classes", ...}``.
"""

from __future__ import annotations

import argparse

from capvis.eval.common import add_model_arguments, add_runtime_arguments

COMMAND = ("eval", "zeroshot")
HELP = "zero-shot classification with prompt templates (by embedding or by caption likelihood)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--labels", required=True, help="downstream-label file (e.g. CaptionWorld labels_test.json)")
    parser.add_argument("--task", required=True, help="task of the label file to classify (e.g. shape)")
    parser.add_argument("--method", choices=("auto", "embedding", "likelihood"), default="auto",
                        help="embedding: text-encoder similarity (contrastive, coca); likelihood: log p(prompt | "
                             "image) under the captioning head(s) (captioning, bicaptioning, coca); "
                             "auto (default): embedding when the model has one, else likelihood")
    parser.add_argument("--images", default=None,
                        help="image folder of --labels (default: DIR/<split> for DIR/annotations/labels_<split>.json)")
    parser.add_argument("--templates", nargs="+", default=None, metavar="TEMPLATE",
                        help="prompt templates with {} for the class name (default: 'a photo of a {}.')")
    parser.add_argument("--image-size", type=int, default=None,
                        help="center crop (default: the model's data.image_size)")
    parser.add_argument("--resize", type=int, default=None, help="shorter side before the crop (default: image size)")
    add_runtime_arguments(parser, batch_size=128, workers=0)


def run(args: argparse.Namespace) -> int:
    from capvis.eval.common import check_positive, load_model, print_final_json, resolve_device
    from capvis.eval.zeroshot import DEFAULT_TEMPLATES, check_zeroshot_model, evaluate_zeroshot, resolve_method

    check_positive(image_size=args.image_size, resize=args.resize, batch_size=args.batch_size)
    device = resolve_device(args.device)
    model = load_model(args)
    method = resolve_method(model.task, args.method)
    check_zeroshot_model(model.task, model.tokenizer, method)
    result = evaluate_zeroshot(
        model.task, model.tokenizer, args.labels, args.task, max_len=model.config.data.max_caption_length,
        image_size=args.image_size or model.config.data.image_size, resize=args.resize, images_dir=args.images,
        templates=tuple(args.templates or DEFAULT_TEMPLATES), batch_size=args.batch_size,
        workers=args.loader_workers, device=device, method=method)
    print_final_json({"command": "eval zeroshot", "checkpoint": model.source, "model_task": model.config.model.task,
                      **result})
    return 0
