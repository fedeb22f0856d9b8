"""``capvis summary``: the resolved config and the model's parameter counts, built without data.

The vocabulary size comes from the ``data.vocab`` file when it exists, else from ``model.vocab_size``.
Unlike training, a ``data.vocab`` path that does not exist is not an error here (a warning is logged
and ``model.vocab_size`` is used), so the paper configs can be summarised with no vocabulary at hand.
"""

from __future__ import annotations

import argparse
import json
import logging
from typing import Any

import yaml

COMMAND = ("summary",)
HELP = "print the resolved config and the parameter counts of its model"

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="YAML file or bundled config name")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def summarize(cfg: Any) -> dict[str, Any]:
    """``{"config": ..., "vocab_size": V, "params": {"total", "visual", "textual"}}`` for ``cfg``."""
    import torch

    from capvis.tasks import build_task, count_parameters

    vocab_size = resolve_vocab_size(cfg)
    with torch.device("meta"):  # shapes only: no memory, no init time
        task = build_task(cfg, vocab_size)
    return {"config": cfg.to_dict(), "vocab_size": vocab_size, "params": count_parameters(task)}


def resolve_vocab_size(cfg: Any) -> int:
    from capvis.data.tokenizer import tokenizer_of_config, vocab_size_of

    tokenizer = tokenizer_of_config(cfg)
    if cfg.data.vocab and tokenizer is None:
        log.warning("data.vocab %s does not exist; using model.vocab_size=%d", cfg.data.vocab,
                    cfg.model.vocab_size)
    return vocab_size_of(tokenizer, cfg)


def run(args: argparse.Namespace) -> int:
    from capvis.config import load_config

    cfg = load_config(args.config, args.overrides)
    info = summarize(cfg)
    if args.json:
        print(json.dumps(info))
        return 0
    print(yaml.safe_dump(info["config"], sort_keys=False).rstrip())
    p = info["params"]
    print(f"\n{cfg.model.task} / {cfg.model.backbone}, vocabulary {info['vocab_size']:,}")
    for part in ("visual", "textual", "total"):
        print(f"  {part:<8} {p[part]:>13,} parameters")
    return 0
