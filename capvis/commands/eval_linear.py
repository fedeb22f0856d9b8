"""``capvis eval linear``: linear classifier on frozen features, ImageNet-1k style (paper A.1).

Defaults are the paper's: SGD momentum 0.9, weight decay 0, LR 0.3 with cosine decay, batch 256,
100 epochs, random-resized-crop + flip views, head N(0, 0.01), backbone frozen in eval mode.
``--cached-features`` is a clearly labelled fast path: multinomial logistic regression on cached
center-crop features (no augmentation), a sweep of weight decays solved together, the best chosen on
a held-out split of train (``--weight-decays``, ``--holdout``; the SGD flags do not apply there).
"""

from __future__ import annotations

import argparse

from capvis.eval.common import (
    add_feature_arguments,
    add_image_arguments,
    add_model_arguments,
    add_probe_arguments,
    add_runtime_arguments,
)

COMMAND = ("eval", "linear")
HELP = "linear probe on frozen backbone features over ImageFolder train/val folders (top-1/top-5)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--train", required=True, help="training images, ImageFolder layout DIR/<class>/<image>")
    parser.add_argument("--val", required=True, help="validation images, same layout and class names")
    parser.add_argument("--epochs", type=int, default=100, help="training epochs (default 100)")
    parser.add_argument("--lr", type=float, default=0.3, help="initial LR, cosine-decayed to 0 (default 0.3)")
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--weight-decay", type=float, default=0.0)
    add_feature_arguments(parser)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cached-features", action="store_true",
                        help="FAST PATH (not the paper protocol): logistic regression on cached center-crop "
                             "features, no augmentation, weight decay chosen on held-out train images")
    parser.add_argument("--cache-dir", default=None, help="feature cache for --cached-features")
    add_probe_arguments(parser, scope="--cached-features",
                        holdout_help="share of train images held out to choose the weight decay")
    add_image_arguments(parser)
    add_runtime_arguments(parser, batch_size=256, workers=4)


def run(args: argparse.Namespace) -> int:
    from capvis.eval.common import check_positive, load_model, print_final_json, resolve_device
    from capvis.eval.linear import linear_probe, linear_probe_cached
    from capvis.eval.probe import check_holdout, parse_weight_decays

    check_positive(epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, image_size=args.image_size,
                   resize=args.resize)
    weight_decays, holdout = parse_weight_decays(args.weight_decays), check_holdout(args.holdout)
    model = load_model(args)
    kwargs = dict(image_size=args.image_size or model.config.data.image_size, resize=args.resize,
                  batch_size=args.batch_size, stage=args.stage, num_workers=args.loader_workers,
                  device=resolve_device(args.device), seed=args.seed)
    if args.cached_features:
        result = linear_probe_cached(model.backbone, args.train, args.val, cache_dir=args.cache_dir,
                                     source=model.source, weight_decays=weight_decays, holdout=holdout,
                                     compile=args.compile, **kwargs)
    else:
        result = linear_probe(model.backbone, args.train, args.val, epochs=args.epochs, lr=args.lr,
                              momentum=args.momentum, weight_decay=args.weight_decay, **kwargs)
    print(f"linear probe: top-1 {result['top1']:.2f}, top-5 {result['top5']:.2f} ({result['protocol']})")
    print_final_json({"command": "eval linear", "checkpoint": model.source, **result})
    return 0
