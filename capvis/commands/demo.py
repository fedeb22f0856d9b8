"""``capvis demo [--output DIR] [--seed S] [--quick] [--config FILE] [key=value ...]``: the whole idea, end to
end, on a CPU."""

from __future__ import annotations

import argparse

COMMAND = ("demo",)
HELP = "generate CaptionWorld, pretrain with bicaptioning, compare with random init, write a report"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", default="runs/demo", help="report directory (default runs/demo)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="tiny sizes (under a minute; used by the tests)")
    parser.add_argument("--config", default="demo", help="pretraining config (default configs/demo.yaml)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides applied last, e.g. train.iterations=2400 (a longer run)")


def run(args: argparse.Namespace) -> int:
    from capvis.demo.run import run_demo

    run_demo(args.output, seed=args.seed, quick=args.quick, config=args.config, overrides=args.overrides)
    return 0
