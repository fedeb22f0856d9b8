"""Speed and memory of one pretraining step (forward, backward, optimizer) on random data.

    python bench/train_step.py --config configs/bicaptioning_R_50_L1_H2048.yaml \
        --batch-size 8 --image-size 224 --steps 5 --device cpu [key=value ...]

Ends with one JSON line: images_per_s, peak_memory_mb, params (and the settings used).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time

import torch

from capvis.config import load_config
from capvis.tasks import build_task
from capvis.tasks.base import count_parameters
from capvis.train.loop import to_device
from capvis.train.optim import build_optimizer, inner_optimizer
from capvis.train.precision import resolve_precision, use_channels_last
from capvis.train.schedule import build_scheduler
from capvis.train.step import train_step


def random_batch(batch: int, size: int, length: int, vocab: int) -> dict[str, torch.Tensor]:
    tokens = torch.randint(4, vocab, (batch, length))
    tokens[:, 0], tokens[:, -1] = 1, 2
    return {"image": torch.randn(batch, 3, size, size), "caption_tokens": tokens,
            "caption_lengths": torch.full((batch,), length), "image_id": torch.arange(batch),
            "categories": torch.zeros(batch, 80).scatter_(1, torch.randint(0, 80, (batch, 3)), 1.0)}


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup-steps", type=int, default=2)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--compile", action="store_true", help="torch.compile the task")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    cfg = load_config(args.config, [f"data.image_size={args.image_size}", f"train.batch_size={args.batch_size}",
                                    f"train.device={args.device}", "data.vocab=", *args.overrides])
    device = torch.device(args.device)
    task = build_task(cfg, cfg.model.vocab_size).to(device)
    channels_last = use_channels_last(cfg.train.channels_last, device)
    if channels_last:
        task.to(memory_format=torch.channels_last)
    model = torch.compile(task) if args.compile else task
    optimizer = build_optimizer(task.param_groups(cfg.train), cfg.train)
    scheduler = build_scheduler(inner_optimizer(optimizer), cfg.train)
    precision = resolve_precision(cfg.train.precision, device)
    scaler = precision.scaler()
    batch = to_device(random_batch(args.batch_size, args.image_size, cfg.data.max_caption_length,
                                   cfg.model.vocab_size), device, channels_last)
    task.train()
    for _ in range(args.warmup_steps):
        train_step(model, batch, optimizer, scheduler, scaler, precision, clip_grad_norm=cfg.train.clip_grad_norm)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        result = train_step(model, batch, optimizer, scheduler, scaler, precision,
                            clip_grad_norm=cfg.train.clip_grad_norm)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    out = {"config": args.config, "task": cfg.model.task, "backbone": cfg.model.backbone,
           "hidden": cfg.model.textual.hidden, "layers": cfg.model.textual.layers, "device": args.device,
           "precision": precision.name, "batch_size": args.batch_size, "image_size": args.image_size,
           "threads": torch.get_num_threads(), "channels_last": channels_last, "steps": args.steps, "seconds_per_step": seconds / args.steps,
           "loss": float(result.loss), "images_per_s": args.batch_size * args.steps / seconds,
           "peak_memory_mb": round(peak_memory_mb(device), 1), "params": count_parameters(task)}
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
