"""``capvis eval svm``: the VOC07 SVM protocol on downstream-label files, one mAP per task.

Images go through the protocol's preprocessing (shorter side ``image_size * 256/224``, center crop
``image_size``, ImageNet normalisation) and the frozen backbone; or features come precomputed from
``capvis features`` (``--features-train/--features-test``), which gives the same numbers.
"""

from __future__ import annotations

import argparse

from capvis.eval.common import add_image_arguments, add_model_arguments, add_runtime_arguments

COMMAND = ("eval", "svm")
HELP = "VOC07-protocol linear SVMs on downstream-label files (one mAP per task)"


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
    parser.add_argument("--workers", type=int, default=None,
                        help="liblinear solver: processes training SVM classes in parallel (default: all cores)")
    parser.add_argument("--solver", default="batched", choices=("batched", "liblinear"),
                        help="batched: every class x cost x fold in one torch solve (default); "
                             "liblinear: scikit-learn's LinearSVC per class, for exact reproduction")
    add_image_arguments(parser)
    add_runtime_arguments(parser, batch_size=128, workers=4, workers_flag="--loader-workers")


def run(args: argparse.Namespace) -> int:
    from capvis.data.labels import read_label_file
    from capvis.errors import ConfigError
    from capvis.eval.common import check_positive, load_model, print_final_json, resolve_device
    from capvis.eval.downstream import (
        check_same_tasks, load_feature_file, select_tasks, svm_eval_label_files, svm_eval_tasks,
    )

    check_positive(image_size=args.image_size, resize=args.resize, batch_size=args.batch_size,
                   workers=args.workers)
    cached = (args.features_train, args.features_test)
    if any(cached) and not all(cached):
        raise ConfigError("give both --features-train and --features-test, or neither")
    if all(cached):
        tasks, train_entries = read_label_file(args.train)
        test_tasks, test_entries = read_label_file(args.test)
        check_same_tasks(tasks, test_tasks)
        train_x = load_feature_file(args.features_train, train_entries, args.train)
        test_x = load_feature_file(args.features_test, test_entries, args.test)
        results = svm_eval_tasks(train_x, train_entries, test_x, test_entries, select_tasks(tasks, args.tasks),
                                 workers=args.workers, solver=args.solver)
        source = "features"
    else:
        if not args.checkpoint:
            raise ConfigError("give --checkpoint (or --features-train and --features-test)")
        model = load_model(args)
        image_size = args.image_size or model.config.data.image_size
        results = svm_eval_label_files(
            model.backbone, args.train, args.test, images_train=args.images_train, images_test=args.images_test,
            image_size=image_size, resize=args.resize, stage=args.stage, batch_size=args.batch_size,
            num_workers=args.loader_workers, device=resolve_device(args.device), workers=args.workers,
            cache_dir=args.cache_dir, source=model.source, tasks=args.tasks, details=True, solver=args.solver)
        source = model.source
    for task, r in results.items():
        print(f"{task}: mAP {r.map:.2f} over {len(r.per_class)} classes"
              + (f" ({len(r.skipped)} skipped)" if r.skipped else ""))
    print_final_json({"command": "eval svm", "checkpoint": source,
                      "mAP": {task: r.map for task, r in results.items()},
                      "ap": {task: r.ap for task, r in results.items()},
                      "skipped": {task: r.skipped for task, r in results.items()}})
    return 0
