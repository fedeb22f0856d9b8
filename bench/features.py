"""Speed of frozen-feature extraction: the training module against its inference copy.

    python bench/features.py --config configs/demo.yaml --batch-size 128 --image-size 64
    python bench/features.py --config configs/bicaptioning_R_50_L1_H2048.yaml --batch-size 16 --image-size 224

Times ``backbone.pooled`` on one random batch three ways: the training module in eval mode (what
evaluations ran before), :meth:`Backbone.for_inference` (a ResNet's BatchNorms folded into its
convolutions, its weights channels-last), and that copy on channels-last inputs (what
``capvis.eval.features`` runs). The BatchNorms get non-trivial running statistics first, so the
folded weights are not the identity.
Ends with one JSON line: seconds per batch of each, images per second and the largest difference
of the features from the training module's.

``--compile BACKEND`` also times the last one through ``torch.compile`` (what ``capvis features --compile``
runs): ``compile_s`` (the first call, compiling), the compiled seconds per batch, and ``break_even_images``,
the number of images past which compiling has paid for itself (null when compiled is not faster).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Callable

import torch
from torch import Tensor

from capvis.config import load_config
from capvis.models.backbones.base import Backbone
from capvis.tasks import build_task
from capvis.train.precision import compile_model


def seconds(backbone: Backbone | Callable[[Tensor], Tensor], images: Tensor, repeats: int) -> tuple[float, Tensor]:
    forward = backbone.pooled if isinstance(backbone, Backbone) else backbone
    with torch.no_grad():
        out = forward(images)  # warm-up
        start = time.perf_counter()
        for _ in range(repeats):
            out = forward(images)
    return (time.perf_counter() - start) / repeats, out


def compiled(fast: Backbone, images: Tensor, repeats: int, backend: str, eager_s: float, ref: Tensor) -> dict:
    """The compiled forward's first call (compiling), its steady seconds per batch, and the break-even."""
    forward = compile_model(fast.pooled, backend=backend, device=images.device, option="--compile")
    start = time.perf_counter()
    with torch.no_grad():
        forward(images)
    compile_s = time.perf_counter() - start
    steady_s, out = seconds(forward, images, repeats)
    per_image_saved = (eager_s - steady_s) / images.shape[0]
    return {"compile_backend": backend, "compile_s": round(compile_s, 2), "compiled_s": round(steady_s, 4),
            "compiled_images_per_s": round(images.shape[0] / steady_s, 1),
            "break_even_images": round(compile_s / per_image_saved) if per_image_saved > 0 else None,
            "compiled_max_abs_diff": float((out - ref).abs().max())}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/demo.yaml")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--compile", default=None, metavar="BACKEND", help="also time torch.compile (e.g. inductor)")
    p.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    cfg = load_config(args.config, [f"data.image_size={args.image_size}", "data.vocab=", *args.overrides])
    backbone = build_task(cfg, cfg.model.vocab_size).visual.train()
    with torch.no_grad():  # running statistics that are not the initial (0, 1)
        for _ in range(3):
            backbone(torch.randn(8, 3, args.image_size, args.image_size))
    backbone.eval()
    images = torch.randn(args.batch_size, 3, args.image_size, args.image_size)
    fast = backbone.for_inference()
    plain_s, ref = seconds(backbone, images, args.repeats)
    folded_s, folded = seconds(fast, images, args.repeats)
    last_s, last = seconds(fast, images.contiguous(memory_format=torch.channels_last), args.repeats)
    result = {"config": args.config, "backbone": cfg.model.backbone, "batch_size": args.batch_size,
              "image_size": args.image_size, "threads": torch.get_num_threads(),
              "eval_mode_s": round(plain_s, 4), "for_inference_s": round(folded_s, 4),
              "for_inference_channels_last_s": round(last_s, 4),
              "images_per_s": {k: round(args.batch_size / v, 1) for k, v in
                               (("eval_mode", plain_s), ("for_inference", folded_s), ("channels_last", last_s))},
              "speedup": round(plain_s / last_s, 2),
              "max_abs_diff": float(max((folded - ref).abs().max(), (last - ref).abs().max()))}
    if args.compile:
        result |= compiled(fast, images.contiguous(memory_format=torch.channels_last), args.repeats, args.compile,
                           last_s, ref)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
