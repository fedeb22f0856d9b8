"""Caption decoding speed: beam search (or greedy/nucleus) on random weights and random images, and its limit.

    python bench/decode.py --config configs/bicaptioning_R_50_L1_H2048.yaml \
        --batch-size 8 --beam-size 5 --max-steps 30 --device cpu [--decoder legacy] [key=value ...]

By default the steps are forced: [EOS] is banned, so every hypothesis decodes ``--max-steps`` tokens
(random weights would otherwise stop at an arbitrary step); ``--no-force`` lets captions end (and the
current decoder stop early). Timing covers the whole caption: backbone, cache set-up and every step.
``--decoder legacy`` times the decoder this one replaced (kept here only for the comparison);
``--backbone training`` runs the training module instead of the task's ``for_inference()`` view.
``--compare`` times the legacy decoder on the training module (the caption commands before issue 13)
against the current one on the inference view, alternating batch by batch for ``--repeats`` rounds, so a
noisy machine slows both alike; it prints their medians, ``speedup`` and ``same_captions``.
``--checkpoint C --images DIR`` decodes the first ``--batch-size`` images of DIR (sorted, the
checkpoint's eval transform) with trained weights instead, where ``--no-force`` measures early exit;
the line then carries the captions' token ids, to compare decoders.

Also measured, as the limit beam search can approach: the visual forward alone, the visual keys/values
(projection and every layer's cross-attention K/V) alone, and one decoder step of batch x beam rows
alone (position max-steps/2); ``limit_s`` = visual + K/V + max-steps x step. ``--floor`` adds a lower
bound for the run as it went (early exit included): the visual forward alone plus the matrix products of
every step alone, at the rows each step fed (``rows_fed``, ``products_s``, ``floor_s``). Ends with one JSON
line: images_per_s, seconds_per_batch, the limit figures and the settings.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from capvis.config import load_config
from capvis.models.decoding import BANNED_IDS, EOS_ID, _eval_mode, _finish, decode
from capvis.tasks import build_task


def legacy_beam_search(model, images: Tensor, *, beam_size: int, max_steps: int, banned_ids, **_: object):
    """The previous decoder (capvis before issue 13): cross-attention K/V copied per beam, every
    hypothesis fed at every step. Timing reference only; tests/test_beam_search.py holds the same code."""
    with _eval_mode(model):
        cache = model.init_decoding(images, max_len=max_steps)
        b, k, dev = cache.batch_size, beam_size, images.device
        cache.reorder(torch.arange(b, device=dev).repeat_interleave(k), memory=True)  # (B*K) rows
        scores = torch.full((b, k), float("-inf"), device=dev)
        scores[:, 0] = 0.0
        finished = torch.zeros(b, k, dtype=torch.bool, device=dev)
        history = torch.empty(b * k, 0, dtype=torch.long, device=dev)
        tokens = torch.full((b * k,), 1, dtype=torch.long, device=dev)
        offsets = (torch.arange(b, device=dev) * k).unsqueeze(1)
        for _ in range(cache.max_len):
            logp = model.decode_step(tokens, cache).float().log_softmax(dim=-1)
            logp[:, [i for i in banned_ids if i < logp.shape[-1]]] = float("-inf")
            v = logp.shape[-1]
            eos_only = torch.full((v,), float("-inf"), device=dev)
            eos_only[EOS_ID] = 0.0
            logp = torch.where(finished.view(-1, 1), eos_only, logp).view(b, k, v)
            top, index = (scores.unsqueeze(-1) + logp).view(b, k * v).topk(k, dim=1)
            rows = (index // v + offsets).view(-1)
            new = (index % v).view(-1)
            cache.reorder(rows)
            history = torch.cat([history[rows], new[:, None]], dim=1)
            finished = finished.view(-1)[rows].view(b, k) | (new == EOS_ID).view(b, k) | top.isinf()
            scores, tokens = top, new
            if bool(finished.all()):
                break
        best = scores.argmax(dim=1) + offsets[:, 0]
        return _finish(history[best], scores.view(-1)[best], EOS_ID, None, None)


def timed(fn: Callable[[], object], repeats: int, device: torch.device) -> float:
    """Best wall time of ``repeats`` calls (after one untimed call)."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


@torch.no_grad()
def limit_figures(task, images: Tensor, beam: int, steps: int, repeats: int) -> dict[str, float]:
    """Visual forward, visual K/V and one decoder step of B*beam rows, each alone (seconds)."""
    dev = images.device
    visual = timed(lambda: task.visual(images), repeats, dev)
    grid = task.visual(images)
    kv = timed(lambda: task.textual.init_cache(grid, max_len=steps), repeats, dev)
    cache = task.textual.init_cache(grid, max_len=steps)
    b = images.shape[0]
    cache.regroup(torch.arange(b, device=dev).repeat_interleave(beam),
                  torch.arange(b * beam, device=dev), beam)  # every beam live, K/V shared per image
    tokens = torch.randint(4, task.textual.vocab_size, (b * beam,), device=dev)

    def one_step() -> Tensor:
        cache.length = steps // 2
        return task.decode_step(tokens, cache).float().log_softmax(dim=-1).topk(beam, dim=-1)

    step = timed(one_step, repeats, dev)
    return {"visual_s": round(visual, 4), "visual_kv_s": round(kv, 4), "step_s": round(step, 4),
            "limit_s": round(visual + kv + steps * step, 3)}


def head_products(textual) -> list[tuple[Tensor, Tensor]]:
    """(weight, bias) of every matrix product in one decoding step of a TextualHead: per layer the
    self-attention's packed q/k/v, the cross-attention's q, both output projections and the feed-forward
    pair; then the output layer."""
    e, mats = textual.hidden, []
    for layer in textual.transformer.layers:
        sa, ca = layer.self_attn, layer.multihead_attn
        mats += [(sa.in_proj_weight, sa.in_proj_bias), (sa.out_proj.weight, sa.out_proj.bias),
                 (ca.in_proj_weight[:e], ca.in_proj_bias[:e]), (ca.out_proj.weight, ca.out_proj.bias),
                 (layer.linear1.weight, layer.linear1.bias), (layer.linear2.weight, layer.linear2.bias)]
    return [*mats, (textual.output.weight, textual.output.bias)]


@torch.no_grad()
def floor_figures(task, images: Tensor, run: Callable[[], object], repeats: int) -> dict[str, object]:
    """What no decoder of these weights avoids: the visual forward alone, plus each step's matrix products
    alone at the rows that step fed in ``run`` (each row count timed on its own); seconds."""
    rows: list[int] = []
    real = task.decode_step

    def counting(tokens: Tensor, cache, **kwargs):
        rows.append(tokens.shape[0])
        return real(tokens, cache, **kwargs)

    task.decode_step = counting
    try:
        run()
    finally:
        del task.decode_step  # the class's method again
    dev, mats = images.device, head_products(task.textual)
    per_rows = {}
    for r in sorted(set(rows)):
        xs = [torch.randn(r, w.shape[1], device=dev, dtype=w.dtype) for w, _ in mats]
        per_rows[r] = timed(lambda: [F.linear(x, w, b) for x, (w, b) in zip(xs, mats)], 10 * repeats, dev)
    visual = timed(lambda: task.visual(images), repeats, dev)
    products = sum(per_rows[r] for r in rows)
    return {"rows_fed": rows, "floor_visual_s": round(visual, 4), "products_s": round(products, 4),
            "floor_s": round(visual + products, 4)}


def compare(task, images: Tensor, kwargs: dict, repeats: int, warmup: int) -> dict[str, object]:
    """The decoder before issue 13 (legacy, on the training module) against today's (current, on the
    inference view), interleaved batch by batch so that both see the same machine: median seconds a
    batch of each, their ratio, and whether every caption is the same."""
    runs = {"legacy": functools.partial(legacy_beam_search, task, images, **kwargs),
            "current": functools.partial(decode, task.for_inference(), images, method="beam", **kwargs)}
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    tokens = {}
    for round_ in range(warmup + repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            out = run()
            if images.device.type == "cuda":
                torch.cuda.synchronize()
            if round_ >= warmup:
                seconds[name].append(time.perf_counter() - start)
            tokens[name] = out.tokens
    median = {name: statistics.median(t) for name, t in seconds.items()}
    b = images.shape[0]
    return {"legacy_s": round(median["legacy"], 6), "current_s": round(median["current"], 6),
            "legacy_images_per_s": round(b / median["legacy"], 2),
            "current_images_per_s": round(b / median["current"], 2),
            "speedup": round(median["legacy"] / median["current"], 3),
            "same_captions": tokens["legacy"] == tokens["current"], "rounds": repeats}


def trained(checkpoint: str, folder: str | None, n: int, device: torch.device):
    """``(task, config, images)``: a trained captioning task and the first ``n`` images of ``folder``."""
    from pathlib import Path

    from capvis.data.decode import load_image
    from capvis.data.transforms import build_eval_transform
    from capvis.loading import load_pretrained

    if not folder:
        raise SystemExit("--checkpoint needs --images DIR")
    pre = load_pretrained(checkpoint)
    size = pre.config.data.image_size
    transform = build_eval_transform(size)
    paths = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))[:n]
    images = torch.stack([transform(load_image(p)) for p in paths]).to(device)
    return pre.task.to(device).eval(), pre.config, images


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, help="model config (random weights), or give --checkpoint")
    p.add_argument("--checkpoint", default=None, help="trained weights (a run, a checkpoint or a release)")
    p.add_argument("--images", default=None, help="with --checkpoint: a folder of images to caption")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--beam-size", type=int, default=5)
    p.add_argument("--max-steps", type=int, default=30)
    p.add_argument("--method", choices=("beam", "greedy", "nucleus"), default="beam")
    p.add_argument("--decoder", choices=("current", "legacy"), default="current",
                   help="beam only: legacy = the decoder before K/V sharing and early exit (comparison)")
    p.add_argument("--compare", action="store_true",
                   help="beam only: time the legacy decoder on the training module against the current one on "
                        "the inference view, interleaved round by round (--repeats rounds); prints medians, "
                        "speedup and same_captions")
    p.add_argument("--backbone", choices=("inference", "training"), default="inference",
                   help="inference: the task's for_inference() view (BatchNorms folded; what caption commands "
                        "run); training: the training module in eval mode (what they ran before)")
    p.add_argument("--force", action=argparse.BooleanOptionalAction, default=True,
                   help="ban [EOS] so every hypothesis decodes --max-steps tokens (default on)")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--repeats", type=int, default=2, help="timed batches (default 2)")
    p.add_argument("--warmup", type=int, default=1, help="untimed batches first (default 1)")
    p.add_argument("--no-limit", action="store_true", help="skip the limit figures")
    p.add_argument("--floor", action="store_true",
                   help="also time the floor: the visual forward alone + every step's matrix products alone at "
                        "the rows that step fed (with --no-force, the rows early exit leaves)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--threads", type=int, default=0, help="CPU threads (default: torch's choice)")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.checkpoint:
        task, cfg, images = trained(args.checkpoint, args.images, args.batch_size, device)
        args.image_size = images.shape[-1]
    else:
        if not args.config:
            p.error("give --config (random weights) or --checkpoint")
        cfg = load_config(args.config, [f"data.image_size={args.image_size}", "data.vocab=",
                                        f"data.max_caption_length={max(args.max_steps, 3)}", *args.overrides])
        task = build_task(cfg, cfg.model.vocab_size).to(device).eval()
        images = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=device)
    if args.compare:
        if args.method != "beam":
            p.error("--compare times beam search")
        banned = (*BANNED_IDS, EOS_ID) if args.force else BANNED_IDS
        result = compare(task, images, {"beam_size": args.beam_size, "max_steps": args.max_steps,
                                        "banned_ids": banned}, args.repeats, args.warmup)
        result.update(checkpoint=args.checkpoint, config=args.config, batch_size=args.batch_size,
                      beam_size=args.beam_size, max_steps=args.max_steps, forced=args.force,
                      image_size=args.image_size, device=args.device, threads=torch.get_num_threads())
        print(json.dumps(result))
        return 0
    if args.backbone == "inference":
        task = task.for_inference()
    if cfg.train.channels_last and device.type == "cuda":
        task.to(memory_format=torch.channels_last)
    banned = (*BANNED_IDS, EOS_ID) if args.force else BANNED_IDS
    kwargs = {"max_steps": args.max_steps, "banned_ids": banned}
    if args.method == "beam":
        kwargs["beam_size"] = args.beam_size
    legacy = args.method == "beam" and args.decoder == "legacy"

    def run() -> object:
        if legacy:
            return legacy_beam_search(task, images, **kwargs)
        return decode(task, images, method=args.method, **kwargs)

    for _ in range(args.warmup):
        run()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(args.repeats):
        out = run()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    steps = max(len(t) for t in out.tokens)
    result = {"config": args.config, "task": cfg.model.task, "backbone": cfg.model.backbone,
              "hidden": cfg.model.textual.hidden, "layers": cfg.model.textual.layers, "method": args.method,
              "decoder": args.decoder if args.method == "beam" else None, "forced": args.force,
              "backbone_module": args.backbone,
              "beam_size": args.beam_size if args.method == "beam" else None, "max_steps": args.max_steps,
              "tokens_per_caption": steps, "batch_size": args.batch_size, "image_size": args.image_size,
              "device": args.device, "threads": torch.get_num_threads(), "repeats": args.repeats,
              "seconds": round(seconds, 3), "seconds_per_batch": round(seconds / args.repeats, 4),
              "images_per_s": round(args.batch_size * args.repeats / seconds, 3)}
    if args.checkpoint:
        result.update(checkpoint=args.checkpoint, captions=out.tokens)
    if args.floor:
        result.update(floor_figures(task, images, run, max(args.repeats, 2)))
        result["batch_over_floor"] = round(result["seconds_per_batch"] / result["floor_s"], 3)
    if not args.no_limit and args.method == "beam":
        result.update(limit_figures(task, images, args.beam_size, args.max_steps, max(args.repeats, 2)))
        result["batch_over_limit"] = round(result["seconds_per_batch"] / result["limit_s"], 3)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
