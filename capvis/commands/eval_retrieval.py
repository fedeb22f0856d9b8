"""``capvis eval retrieval --checkpoint C --annotations CAPTIONS.json [--images DIR]``: recall@1/5/10 both ways.

Embedding models (contrastive, coca) score pairs by cosine similarity, captioning models (captioning,
bicaptioning, coca with ``--method likelihood``) by caption likelihood, every pair or a reranked first
stage (see :mod:`capvis.eval.retrieval`). The last line of stdout is JSON: ``{"i2t_r@1", "i2t_r@5",
"i2t_r@10", "t2i_r@1", "t2i_r@5", "t2i_r@10", "method", "scoring", "images", "captions", ...}``.
"""

from __future__ import annotations

import argparse

from capvis.eval.common import add_model_arguments, add_runtime_arguments

COMMAND = ("eval", "retrieval")
HELP = "image-text retrieval recall@1/5/10 both ways (by embedding or by caption likelihood)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--annotations", required=True, help="captions: COCO captions JSON, JSONL or CSV")
    parser.add_argument("--images", default=None, help="image folder (default: derived from the annotation file)")
    parser.add_argument("--method", choices=("auto", "embedding", "likelihood"), default="auto",
                        help="embedding (contrastive, coca) or likelihood (captioning models); auto (default): "
                             "embedding when the model has one")
    parser.add_argument("--scoring", choices=("auto", "all", "rerank"), default="auto",
                        help="likelihood: score every pair (all), or rerank the top --rerank-top of a TF-IDF first "
                             "stage (rerank); auto (default): all up to --max-pairs pairs, else rerank")
    parser.add_argument("--rerank-top", type=int, default=20, help="candidates reranked per query (default 20)")
    parser.add_argument("--max-pairs", type=int, default=50_000,
                        help="largest images x captions scored in full by --scoring auto (default 50000)")
    parser.add_argument("--image-size", type=int, default=None,
                        help="center crop (default: the model's data.image_size)")
    parser.add_argument("--resize", type=int, default=None, help="shorter side before the crop (default: image size)")
    add_runtime_arguments(parser, batch_size=64, workers=0)


def run(args: argparse.Namespace) -> int:
    from capvis.data.annotations import read_records
    from capvis.eval.common import check_positive, load_model, print_final_json, resolve_device
    from capvis.eval.retrieval import evaluate_retrieval

    check_positive(image_size=args.image_size, resize=args.resize, batch_size=args.batch_size,
                   rerank_top=args.rerank_top, max_pairs=args.max_pairs)
    device = resolve_device(args.device)
    model = load_model(args)
    records = read_records(args.annotations, args.images)
    result = evaluate_retrieval(
        model.task, model.tokenizer, records, max_len=model.config.data.max_caption_length,
        image_size=args.image_size or model.config.data.image_size, resize=args.resize, method=args.method,
        scoring=args.scoring, rerank_top=args.rerank_top, max_pairs=args.max_pairs, batch_size=args.batch_size,
        workers=args.loader_workers, device=device)
    print_final_json({"command": "eval retrieval", "checkpoint": model.source, "model_task": model.config.model.task,
                      **result})
    return 0
