"""``capvis vocab``: train the SentencePiece BPE caption vocabulary (PREFIX.model, PREFIX.vocab)."""

from __future__ import annotations

import argparse
import logging

COMMAND = ("vocab",)
HELP = "train a SentencePiece BPE vocabulary from caption files (COCO captions JSON, JSONL or CSV)"

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--captions", nargs="+", required=True, metavar="FILE",
                        help="caption files: COCO captions JSON, JSONL or CSV (image,caption)")
    parser.add_argument("--vocab-size", type=int, default=10000, metavar="N", help="pieces (default 10000)")
    parser.add_argument("--output", required=True, metavar="PREFIX", help="writes PREFIX.model and PREFIX.vocab")


def run(args: argparse.Namespace) -> int:
    from capvis.data.annotations import read_caption_texts
    from capvis.data.tokenizer import Tokenizer, train_tokenizer

    texts = read_caption_texts(args.captions)
    model = train_tokenizer(texts, args.output, args.vocab_size)
    size = Tokenizer(model).vocab_size
    print(f"wrote {model} and {model.with_suffix('.vocab')} ({size} pieces from {len(texts)} captions)")
    return 0
