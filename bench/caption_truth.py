"""Caption truth of a demo run under several decoders: is a wrong colour-shape pair the search's or the model's?

    python bench/caption_truth.py --run RUN [--images 200] [--decoders beam5,greedy,...]

``RUN`` is a ``capvis demo --output`` folder (``RUN/pretrain``, ``RUN/world``). Each decoder captions the
first ``--images`` test images, the demo's way (``capvis.demo.caption_truth``): of the colour-shape
mentions, the share true of the image; of the image's objects, the share named. Decoders:

- ``beamK`` (beam search, K beams; ``beam5`` is the demo's), ``beamK_lpP`` (length penalty P), ``greedy``;
- ``rerankK``: the K finalists of beam K re-ranked by the sum of the forward and the backward head's
  log-likelihood (bicaptioning: the backward head reads the caption right to left, so it judges the whole
  sentence); ``rerankK_per_token``: the same divided by the caption's scored tokens.

One JSON line per decoder: ``decoder``, ``seconds`` and the caption-truth figures; with ``--by-size BINS``
also ``shape_right_by_size``: of the mentions whose colour picks out one object, the share naming its shape
right, in BINS groups of equal count by the object's extent in pixels (is a wrong shape a small object's?).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import torch
from torch import Tensor

from capvis.data.annotations import read_records
from capvis.demo.caption_truth import caption_truth, shape_right_by_size, world_objects
from capvis.demo.report import load_images
from capvis.eval.likelihood import pack_captions, pair_log_likelihood
from capvis.loading import load_pretrained
from capvis.models.decoding import decode

DECODERS = "beam5,greedy,beam5_lp1,beam10,rerank5,rerank5_per_token,rerank10_per_token"
CHUNK = 50  # images decoded together, as the demo does


def rerank(task, batch: Tensor, alternatives: list[list[list[int]]], max_len: int, per_token: bool) -> list[list[int]]:
    """Each image's alternative with the highest forward + backward log-likelihood (per token if asked)."""
    flat = [(i, ids) for i, alts in enumerate(alternatives) for ids in alts]
    tokens, lengths = pack_captions([ids for _, ids in flat], max_len)
    with torch.no_grad():
        grid = task.visual(batch)
        total, counts = pair_log_likelihood(task, grid, tokens, lengths, torch.tensor([i for i, _ in flat]),
                                            torch.arange(len(flat)))
    score = total / counts.clamp(min=1) if per_token else total
    best: dict[int, tuple[float, list[int]]] = {}
    for (i, ids), s in zip(flat, score.tolist()):
        if i not in best or s > best[i][0]:
            best[i] = (s, ids)
    return [best[i][1] for i in range(len(alternatives))]


def decode_chunk(task, batch: Tensor, name: str, max_steps: int) -> list[list[int]]:
    """Token ids of each image under decoder ``name`` (module docstring)."""
    if name == "greedy":
        return decode(task, batch, method="greedy", max_steps=max_steps).tokens
    found = re.fullmatch(r"(beam|rerank)(\d+)(?:_lp([\d.]+))?(_per_token)?", name)
    if not found:
        raise SystemExit(f"unknown decoder {name!r}; e.g. {DECODERS}")
    kind, k, penalty, per_token = found.groups()
    k = int(k)
    out = decode(task, batch, method="beam", beam_size=k, max_steps=max_steps, length_penalty=float(penalty or 0),
                 n_best=k if kind == "rerank" else 1)
    if kind == "beam":
        return out.tokens
    return rerank(task, batch, out.alternatives, max_steps + 1, bool(per_token))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="a capvis demo output folder")
    p.add_argument("--images", type=int, default=200, help="first N test images (the demo's 200)")
    p.add_argument("--decoders", default=DECODERS)
    p.add_argument("--by-size", type=int, default=0, metavar="BINS",
                   help="also the share of right shapes by object extent, in BINS groups (0: off)")
    args = p.parse_args(argv)
    run = Path(args.run)
    pre = load_pretrained(run / "pretrain")
    task, tokenizer = pre.task.for_inference(), pre.tokenizer
    world = run / "world" / "annotations"
    records = read_records(world / "captions_test.json")[: args.images]
    objects = world_objects(world / "instances_test.json", extent=True)
    max_steps = pre.config.data.max_caption_length - 1
    chunks = [records[lo:lo + CHUNK] for lo in range(0, len(records), CHUNK)]
    batches = [load_images([r.path for r in chunk], pre.config.data.image_size)[0] for chunk in chunks]
    for name in args.decoders.split(","):
        start = time.perf_counter()
        captions = {}
        for chunk, batch in zip(chunks, batches):
            ids = decode_chunk(task, batch, name, max_steps)
            captions.update({r.image_id: tokenizer.decode(t) for r, t in zip(chunk, ids)})
        line = {"decoder": name, "seconds": round(time.perf_counter() - start, 2), **caption_truth(captions, objects)}
        if args.by_size:
            line["shape_right_by_size"] = shape_right_by_size(captions, objects, args.by_size)
        print(json.dumps(line), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
