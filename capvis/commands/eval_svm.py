"""``capvis eval svm``: the VOC07 SVM protocol on downstream-label files, one mAP per task.

Images go through the protocol's preprocessing (shorter side ``image_size * 256/224``, center crop
``image_size``, ImageNet normalisation) and the frozen backbone; or features come precomputed from
``capvis features`` (``--features-train/--features-test``), which gives the same numbers.
"""

from __future__ import annotations

import argparse

from capvis.eval.common import (add_image_arguments, add_label_file_arguments, add_model_arguments,
                                add_runtime_arguments)

COMMAND = ("eval", "svm")
HELP = "VOC07-protocol linear SVMs on downstream-label files (one mAP per task)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser, required=False)
    add_label_file_arguments(parser)
    parser.add_argument("--workers", type=int, default=None,
                        help="liblinear solver: processes training SVM classes in parallel (default: all cores)")
    parser.add_argument("--solver", default="batched", choices=("batched", "liblinear"),
                        help="batched: every class x cost x fold in one torch solve (default); "
                             "liblinear: scikit-learn's LinearSVC per class, for exact reproduction")
    add_image_arguments(parser)
    add_runtime_arguments(parser, batch_size=128, workers=4, workers_flag="--loader-workers")


def run(args: argparse.Namespace) -> int:
    from capvis.eval.common import check_positive, label_inputs, print_final_json
    from capvis.eval.downstream import select_tasks, svm_eval_tasks

    check_positive(image_size=args.image_size, resize=args.resize, batch_size=args.batch_size,
                   workers=args.workers)
    tasks, train_entries, train_x, test_entries, test_x, source = label_inputs(args)
    results = svm_eval_tasks(train_x, train_entries, test_x, test_entries, select_tasks(tasks, args.tasks),
                             workers=args.workers, solver=args.solver)
    for task, r in results.items():
        print(f"{task}: mAP {r.map:.2f} over {len(r.per_class)} classes"
              + (f" ({len(r.skipped)} skipped)" if r.skipped else ""))
    print_final_json({"command": "eval svm", "checkpoint": source,
                      "mAP": {task: r.map for task, r in results.items()},
                      "ap": {task: r.ap for task, r in results.items()},
                      "skipped": {task: r.skipped for task, r in results.items()}})
    return 0
