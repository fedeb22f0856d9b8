"""``capvis eval voc07``: PASCAL VOC2007 classification with linear SVMs (VirTex paper, Appendix A.1).

Features: shorter side 256, center crop 224, ImageNet normalisation, frozen backbone in eval mode,
global-average-pooled ``layer4``, L2-normalised. One LinearSVC per class (squared hinge, dual,
max_iter 2000, tol 1e-4, class_weight {1: 2, -1: 1}), C in {0.01, 0.1, 1, 10} by 3-fold CV on
trainval; difficult images are negatives in training and left out of test AP. Reports test mAP over
the 20 classes (sklearn average precision, in percent). ``--solver batched`` (default) solves every
class x cost x fold at once in torch; ``--solver liblinear`` runs sklearn's LinearSVC per class, classes
in parallel (``--workers``).
"""

from __future__ import annotations

import argparse

from capvis.eval.common import (
    add_feature_arguments,
    add_image_arguments,
    add_model_arguments,
    add_runtime_arguments,
)

COMMAND = ("eval", "voc07")
HELP = "VOC2007 classification mAP with per-class linear SVMs on frozen features (paper A.1)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--voc-root", required=True, help="VOCdevkit/VOC2007 (or the VOCdevkit folder above it)")
    parser.add_argument("--train-split", default="trainval", help="split to train the SVMs on (default trainval)")
    parser.add_argument("--test-split", default="test", help="split to report mAP on (default test)")
    add_feature_arguments(parser)
    parser.add_argument("--cache-dir", default=None, help="reuse/write extracted features here")
    parser.add_argument("--workers", type=int, default=None,
                        help="liblinear solver: processes training SVM classes in parallel (default: all cores)")
    parser.add_argument("--solver", default="batched", choices=("batched", "liblinear"),
                        help="batched: every class x cost x fold in one torch solve (default); "
                             "liblinear: scikit-learn's LinearSVC per class, for exact reproduction")
    add_image_arguments(parser, default_size=224)
    add_runtime_arguments(parser, batch_size=128, workers=4, workers_flag="--loader-workers")


def run(args: argparse.Namespace) -> int:
    from capvis.eval.common import check_positive, load_model, print_final_json, resolve_device
    from capvis.eval.features import cached_features
    from capvis.eval.svm import train_eval_svms
    from capvis.eval.voc07 import read_voc07

    check_positive(image_size=args.image_size, resize=args.resize, batch_size=args.batch_size,
                   workers=args.workers)
    train_paths, train_y, classes = read_voc07(args.voc_root, args.train_split)
    test_paths, test_y, _ = read_voc07(args.voc_root, args.test_split)
    model = load_model(args)
    kwargs = dict(image_size=args.image_size, resize=args.resize, stage=args.stage, batch_size=args.batch_size,
                  num_workers=args.loader_workers, device=resolve_device(args.device), compile=args.compile,
                  progress=True)
    train_x = cached_features(model.backbone, train_paths, cache_dir=args.cache_dir, source=model.source, **kwargs)
    test_x = cached_features(model.backbone, test_paths, cache_dir=args.cache_dir, source=model.source, **kwargs)
    result = train_eval_svms(train_x, train_y, test_x, test_y, workers=args.workers, class_names=classes,
                             solver=args.solver)
    for c in result.per_class:
        print(f"{c.name:>12s}  AP {c.ap:6.2f}  C {c.cost:g}")
    print(f"VOC07 {args.test_split} mAP {result.map:.2f} over {len(result.per_class)} classes")
    print_final_json({"command": "eval voc07", "checkpoint": model.source, "image_size": args.image_size,
                      "train_images": len(train_paths), "test_images": len(test_paths), "solver": args.solver,
                      **result.to_dict()})
    return 0
