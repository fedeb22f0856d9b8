"""``capvis eval labels``: every task of a downstream-label file, each by the protocol that fits it.

A task where some image lists more than one class is multi-label: VOC07 SVMs, mAP. Any other task is
single-label: a linear probe (multinomial logistic regression, weight decay chosen on held-out train
images), top-1 %; images with an empty list have no answer and are left out of that task.
Features come from the frozen backbone (``--checkpoint``) or from ``capvis features`` files.
"""

from __future__ import annotations

import argparse

from capvis.eval.common import add_image_arguments, add_model_arguments, add_runtime_arguments

COMMAND = ("eval", "labels")
HELP = "score every task of downstream-label files: multi-label by VOC07 SVMs (mAP), single-label by a probe (top-1)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser, required=False)
    parser.add_argument("--train", required=True, help="train label file (downstream-label format)")
    parser.add_argument("--test", required=True, help="test label file (same tasks and classes)")
    parser.add_argument("--images-train", default=None,
                        help="image folder of --train (default: DIR/<split> for DIR/annotations/labels_<split>.json, "
                             "else the label file's folder)")
    parser.add_argument("--images-test", default=None, help="image folder of --test (default as --images-train)")
    parser.add_argument("--features-train", default=None, help="precomputed features (.npy from capvis features)")
    parser.add_argument("--features-test", default=None, help="precomputed features of --test")
    parser.add_argument("--tasks", nargs="+", default=None, metavar="TASK",
                        help="score only these tasks of the label files (default: all)")
    parser.add_argument("--stage", default="layer4", choices=("layer1", "layer2", "layer3", "layer4"))
    parser.add_argument("--cache-dir", default=None, help="reuse/write extracted features here")
    parser.add_argument("--workers", type=int, default=None, help="SVM processes (liblinear solver only)")
    parser.add_argument("--solver", default=None, help="SVM solver (default: the SVM protocol's default)")
    parser.add_argument("--weight-decays", default=None, metavar="LIST",
                        help="probe: comma-separated weight decays to sweep (default 1e-6,...,1)")
    parser.add_argument("--holdout", type=float, default=0.2,
                        help="probe: share of train images held out to choose the weight decay (default 0.2)")
    add_image_arguments(parser)
    add_runtime_arguments(parser, batch_size=128, workers=4, workers_flag="--loader-workers")


def _print_rows(rows: list[dict]) -> None:
    for r in rows:
        if r["metric"] == "mAP":
            print(f"{r['eval_task']}: mAP {r['value']:.2f} ({r['protocol']}, {r['scored_classes']} of "
                  f"{r['classes']} classes scored)")
        else:
            print(f"{r['eval_task']}: top-1 {r['value']:.2f} ({r['protocol']}, {r['classes']} classes, "
                  f"{r['train_rows']} train / {r['test_rows']} test images, majority class "
                  f"{r.get('chance_top1', float('nan')):.1f})")


def run(args: argparse.Namespace) -> int:
    from capvis.data.labels import read_label_file
    from capvis.errors import ConfigError
    from capvis.eval.common import check_positive, load_model, print_final_json, resolve_device
    from capvis.eval.downstream import (check_same_tasks, evaluate_feature_tasks, label_file_features,
                                        load_feature_file, select_tasks)
    from capvis.eval.probe import check_holdout, parse_weight_decays

    check_positive(image_size=args.image_size, resize=args.resize, batch_size=args.batch_size, workers=args.workers)
    probe = {"weight_decays": parse_weight_decays(args.weight_decays), "holdout": check_holdout(args.holdout)}
    svm = {"solver": args.solver} if args.solver else {}
    cached = (args.features_train, args.features_test)
    if any(cached) and not all(cached):
        raise ConfigError("give both --features-train and --features-test, or neither")
    device = resolve_device(args.device)
    if all(cached):
        tasks, train_entries = read_label_file(args.train)
        test_tasks, test_entries = read_label_file(args.test)
        check_same_tasks(tasks, test_tasks)
        train_x = load_feature_file(args.features_train, train_entries, args.train)
        test_x = load_feature_file(args.features_test, test_entries, args.test)
        source = "features"
    else:
        if not args.checkpoint:
            raise ConfigError("give --checkpoint (or --features-train and --features-test)")
        model = load_model(args)
        tasks, train_entries, train_x, test_entries, test_x = label_file_features(
            model.backbone, args.train, args.test, images_train=args.images_train, images_test=args.images_test,
            image_size=args.image_size or model.config.data.image_size, resize=args.resize, stage=args.stage,
            batch_size=args.batch_size, num_workers=args.loader_workers, device=device, cache_dir=args.cache_dir,
            source=model.source)
        source = model.source
    rows = evaluate_feature_tasks(train_x, train_entries, test_x, test_entries, select_tasks(tasks, args.tasks),
                                  workers=args.workers, svm_options=svm, probe_options={**probe, "device": device})
    _print_rows(rows)
    print_final_json({"command": "eval labels", "checkpoint": source, "results": rows})
    return 0
