"""``capvis ablate --tasks LIST --budget tiny|small|default --output DIR [--seeds N] [--fractions F,...]
[--captions-per-image C,...] [--data PATH] [--jobs N]``."""

from __future__ import annotations

import argparse

COMMAND = ("ablate",)
HELP = ("pretrain each pretext task (x seeds x data fractions) on the same budget; score every labels task of "
        "the data at 1/4, 1/2 and all of the budget, plus zero-shot and retrieval where the task can")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tasks", default=None,
                        help="comma-separated task names, aliases (siglip = contrastive with "
                             "model.contrastive.loss=siglip) and random_init; an entry may add config overrides "
                             "after colons, e.g. bicaptioning:parallel_fraction=0.75 or "
                             "bicaptioning:model.textual.hidden=512 (bare keys name a unique config field). "
                             "Default: bicaptioning,captioning,token_classification,multilabel_classification,"
                             "masked_lm,contrastive,random_init; --budget default adds coca,siglip")
    parser.add_argument("--budget", default="small", help="small | default | tiny (tiny: seconds, for tests)")
    parser.add_argument("--output", required=True)
    parser.add_argument("--data", default=None, help="a CaptionWorld-like directory (default: generate one)")
    parser.add_argument("--seed", type=int, default=0, help="first seed (default 0)")
    parser.add_argument("--seeds", type=int, default=1,
                        help="runs per setting, seeds --seed, --seed+1, ... (default 1)")
    parser.add_argument("--fractions", default="1", help="data-efficiency: fractions of the training images, "
                        "e.g. 0.1,0.5,1 (data.fraction; default 1)")
    parser.add_argument("--captions-per-image", default=None, metavar="LIST",
                        help="data-efficiency: 1 (one seeded caption per image) and/or the data's count "
                             "(CaptionWorld: 5), e.g. 1,5 (default: every caption)")
    parser.add_argument("--config", default="demo", help="base pretraining config (default configs/demo.yaml)")
    parser.add_argument("--jobs", type=int, default=1,
                        help="runs at a time, each in its own process with an equal share of the CPU threads "
                             "(default 1; on 2 cores, 2 does ~1.3x the runs an hour for the demo's small model)")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from capvis.demo.ablate import parse_captions, parse_fractions, parse_tasks, run_ablation

    captions = parse_captions(args.captions_per_image) if args.captions_per_image else None
    tasks = parse_tasks(args.tasks) if args.tasks is not None else None  # None: the budget's default list
    rows = run_ablation(tasks, budget=args.budget, output=args.output, data=args.data,
                        seeds=args.seeds, seed=args.seed, config=args.config,
                        fractions=parse_fractions(args.fractions), captions_per_image=captions,
                        jobs=args.jobs)
    print((Path(args.output) / "ablation.md").read_text())
    print(f"ablation: {len(rows)} rows -> {args.output}/ablation.csv, ablation.md, ablation.png")
    return 0
