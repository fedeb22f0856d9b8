"""``capvis eval labels``: every task of a downstream-label file, each by the protocol that fits it.

A task where some image lists more than one class is multi-label: VOC07 SVMs, mAP. Any other task is
single-label: a linear probe (multinomial logistic regression, weight decay chosen on held-out train
images), top-1 %; images with an empty list have no answer and are left out of that task.
Features come from the frozen backbone (``--checkpoint``) or from ``capvis features`` files.
"""

from __future__ import annotations

import argparse

from capvis.eval.common import (add_image_arguments, add_label_file_arguments, add_model_arguments,
                                add_probe_arguments, add_runtime_arguments)

COMMAND = ("eval", "labels")
HELP = "score every task of downstream-label files: multi-label by VOC07 SVMs (mAP), single-label by a probe (top-1)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser, required=False)
    add_label_file_arguments(parser)
    parser.add_argument("--workers", type=int, default=None, help="SVM processes (liblinear solver only)")
    parser.add_argument("--solver", default=None, help="SVM solver (default: the SVM protocol's default)")
    add_probe_arguments(parser, scope="probe",
                        holdout_help="share of train images held out to choose the weight decay (default 0.2)")
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
    from capvis.eval.common import check_positive, label_inputs, print_final_json, resolve_device
    from capvis.eval.downstream import evaluate_feature_tasks, select_tasks
    from capvis.eval.probe import check_holdout, parse_weight_decays

    check_positive(image_size=args.image_size, resize=args.resize, batch_size=args.batch_size, workers=args.workers)
    probe = {"weight_decays": parse_weight_decays(args.weight_decays), "holdout": check_holdout(args.holdout)}
    svm = {"solver": args.solver} if args.solver else {}
    device = resolve_device(args.device)
    tasks, train_entries, train_x, test_entries, test_x, source = label_inputs(args)
    rows = evaluate_feature_tasks(train_x, train_entries, test_x, test_entries, select_tasks(tasks, args.tasks),
                                  workers=args.workers, svm_options=svm, probe_options={**probe, "device": device})
    _print_rows(rows)
    print_final_json({"command": "eval labels", "checkpoint": source, "results": rows})
    return 0
