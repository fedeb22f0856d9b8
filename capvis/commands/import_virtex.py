"""``capvis import-virtex CHECKPOINT.pth --vocab coco_10k.model --output OUT.pt [--config NAME]``."""

from __future__ import annotations

import argparse

COMMAND = ("import-virtex",)
HELP = "convert a checkpoint of the original VirTex code into a capvis checkpoint (config and vocabulary inside)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint",
                        help="original VirTex checkpoint (.pth: {'model': state_dict, ...} or a bare state dict)")
    parser.add_argument("--vocab", required=True, help="the SentencePiece model it was trained with (coco_10k.model)")
    parser.add_argument("--output", required=True, help="capvis checkpoint to write (.pt)")
    parser.add_argument("--config", default=None,
                        help="capvis config (file or bundled name) for what shapes cannot tell (attention heads, "
                             "masked-LM vs captioning); checked against the shapes. Default: inferred")


def run(args: argparse.Namespace) -> int:
    from capvis.interop.virtex import import_virtex
    from capvis.loading import load_pretrained

    out = import_virtex(args.checkpoint, args.vocab, args.output, config=args.config)
    pre = load_pretrained(out)  # proves it loads with no other file
    m = pre.config.model
    print(f"import-virtex: wrote {out} ({m.task}, {m.backbone}, L{m.textual.layers} H{m.textual.hidden} "
          f"A{m.textual.heads} F{m.textual.feedforward}, vocab {pre.tokenizer.vocab_size}, iteration {pre.iteration})")
    return 0
