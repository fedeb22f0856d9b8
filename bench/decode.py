"""Caption decoding speed: beam search (or greedy/nucleus) on random weights and random images.

    python bench/decode.py --config configs/bicaptioning_R_50_L1_H2048.yaml \
        --batch-size 8 --beam-size 5 --max-steps 30 --device cpu [key=value ...]

Early stopping is off, so every batch decodes the full ``--max-steps`` tokens (random weights would
otherwise stop at an arbitrary step). Timing covers the whole caption: backbone, cache set-up and
every step. Ends with one JSON line: images_per_s, seconds_per_batch and the settings.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from capvis.config import load_config
from capvis.models.decoding import decode
from capvis.tasks import build_task


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--beam-size", type=int, default=5)
    p.add_argument("--max-steps", type=int, default=30)
    p.add_argument("--method", choices=("beam", "greedy", "nucleus"), default="beam")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--repeats", type=int, default=2, help="timed batches (default 2)")
    p.add_argument("--warmup", type=int, default=1, help="untimed batches first (default 1)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--threads", type=int, default=0, help="CPU threads (default: torch's choice)")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    cfg = load_config(args.config, [f"data.image_size={args.image_size}", "data.vocab=",
                                    f"data.max_caption_length={max(args.max_steps, 3)}", *args.overrides])
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    task = build_task(cfg, cfg.model.vocab_size).to(device).eval()
    if cfg.train.channels_last:
        task.to(memory_format=torch.channels_last)
    images = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=device)
    kwargs = {"max_steps": args.max_steps, "early_stop": False}
    if args.method == "beam":
        kwargs["beam_size"] = args.beam_size
    for _ in range(args.warmup):
        decode(task, images, method=args.method, **kwargs)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(args.repeats):
        out = decode(task, images, method=args.method, **kwargs)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    steps = max(len(t) for t in out.tokens)
    result = {"config": args.config, "task": cfg.model.task, "backbone": cfg.model.backbone,
              "hidden": cfg.model.textual.hidden, "layers": cfg.model.textual.layers, "method": args.method,
              "beam_size": args.beam_size if args.method == "beam" else None, "max_steps": args.max_steps,
              "tokens_per_caption": steps, "batch_size": args.batch_size, "image_size": args.image_size,
              "device": args.device, "threads": torch.get_num_threads(), "repeats": args.repeats,
              "seconds": round(seconds, 3), "seconds_per_batch": round(seconds / args.repeats, 3),
              "images_per_s": round(args.batch_size * args.repeats / seconds, 3)}
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
