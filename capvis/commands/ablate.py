"""``capvis ablate --tasks LIST --budget small|default --output DIR [--data PATH]``."""

from __future__ import annotations

import argparse

COMMAND = ("ablate",)
HELP = "pretrain each pretext task on the same data and budget, evaluate each with the same SVM protocol"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tasks", default="bicaptioning,captioning,token_classification,multilabel_classification,"
                        "masked_lm,contrastive,random_init", help="comma-separated task names (and random_init)")
    parser.add_argument("--budget", default="small", help="small | default | tiny (tiny: seconds, for tests)")
    parser.add_argument("--output", required=True)
    parser.add_argument("--data", default=None, help="a CaptionWorld-like directory (default: generate one)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--config", default="demo", help="base pretraining config (default configs/demo.yaml)")


def run(args: argparse.Namespace) -> int:
    from capvis.demo.ablate import parse_tasks, run_ablation

    rows = run_ablation(parse_tasks(args.tasks), budget=args.budget, output=args.output, data=args.data,
                        seed=args.seed, config=args.config)
    print(open(f"{args.output}/ablation.md").read())
    print(f"ablation: {len(rows)} rows -> {args.output}/ablation.csv, ablation.png")
    return 0
