"""``capvis pretrain --config FILE --output DIR [--resume [auto|PATH]] [key=value ...]``."""

from __future__ import annotations

import argparse

COMMAND = ("pretrain",)
HELP = "pretrain a visual backbone with a pretext task (bicaptioning by default)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="YAML config file, or the name of a bundled one")
    parser.add_argument("--output", required=True, help="run directory (config, metrics, checkpoints)")
    parser.add_argument("--resume", nargs="?", const="auto", default=None, metavar="auto|PATH",
                        help="continue from the newest valid checkpoint in --output (auto) or from PATH")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")


def run(args: argparse.Namespace) -> int:
    from capvis.config import load_config
    from capvis.train.loop import pretrain

    cfg = load_config(args.config, args.overrides)
    summary = pretrain(cfg, args.output, resume=args.resume, progress=not args.no_progress)
    last = summary.get("last") or {}
    how = "stopped early (resume with --resume)" if summary.get("stopped_early") else "stopped"
    print(f"pretrain: {how} at iteration {summary['iteration']}, loss {last.get('loss', float('nan')):.4f}, "
          f"output {summary['output']}")
    return 0
