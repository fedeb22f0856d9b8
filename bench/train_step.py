"""Speed and memory of one pretraining step (forward, backward, optimizer) on random data.

    python bench/train_step.py --config configs/bicaptioning_R_50_L1_H2048.yaml \
        --batch-size 8 --image-size 224 --steps 5 --device cpu [key=value ...]

The step is capvis' own (``capvis.train.step.train_step``) with the config's switches: ``train.precision``,
``train.channels_last`` (CUDA only), ``train.compile`` / ``train.compile_backend`` (or ``--compile``),
``train.accumulate`` and ``model.activation_checkpointing``. ``--part`` times the limits a step cannot beat:

    task      the whole step (default)
    backbone  the visual backbone alone: forward, backward (of the grid's mean), SGD step
    head      everything but the backbone: the textual heads on a fixed random grid, loss, step
    matmuls   the output projections' matrix products alone (forward and both backward products,
              one per captioning direction): the ``(B*T, H) x (H, V)`` GEMMs that dominate the head
    original  the original VirTex's step (bicaptioning, SGD + Lookahead) from a kdexd/virtex checkout,
              ``--virtex DIR``, on the same batch and sizes (``bench/original_virtex.py``)

The limits run under the config's ``train.precision`` as the step does (``auto``: bf16 on CUDA and on AMX
CPUs), so that a bf16 step is compared with bf16 limits; the original runs as its code does (fp32 on a CPU).

Ends with one JSON line: images_per_s, peak_memory_mb (process peak RSS on CPU, peak allocated on
CUDA), step_memory_mb (what the steps add to the memory of the set-up model and batch: activations,
gradients, optimizer state; on CPU the rise of the RSS high-water mark, on CUDA the peak allocated
minus the allocated before the first step), params and the settings.
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import sys
import time
from typing import Callable

import torch

from capvis.config import Config, load_config
from capvis.models.checkpointing import set_activation_checkpointing
from capvis.tasks import build_task
from capvis.tasks.base import count_parameters
from capvis.train.loop import to_device
from capvis.train.optim import build_optimizer, inner_optimizer
from capvis.train.precision import compile_model, resolve_precision, use_channels_last
from capvis.train.schedule import build_scheduler
from capvis.train.step import train_step


def random_batch(batch: int, size: int, length: int, vocab: int) -> dict[str, torch.Tensor]:
    tokens = torch.randint(4, vocab, (batch, length))
    tokens[:, 0], tokens[:, -1] = 1, 2
    return {"image": torch.randn(batch, 3, size, size), "caption_tokens": tokens,
            "caption_lengths": torch.full((batch,), length), "image_id": torch.arange(batch),
            "categories": torch.zeros(batch, 80).scatter_(1, torch.randint(0, 80, (batch, 3)), 1.0)}


def memory_mb(device: torch.device) -> float:
    """Peak so far: allocated tensors on CUDA, the process's resident-set high-water mark on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def task_step(cfg: Config, args: argparse.Namespace, device: torch.device) -> tuple[Callable[[], float], dict]:
    """The full capvis step; returns (one step -> loss, facts for the JSON line)."""
    task = build_task(cfg, cfg.model.vocab_size).to(device)
    set_activation_checkpointing(task, cfg.model.activation_checkpointing)
    channels_last = use_channels_last(cfg.train.channels_last, device)
    if channels_last:
        task.to(memory_format=torch.channels_last)
    compiled = args.compile or cfg.train.compile
    model = compile_model(task, backend=cfg.train.compile_backend, device=device) if compiled else task
    optimizer = build_optimizer(task.param_groups(cfg.train), cfg.train)
    scheduler = build_scheduler(inner_optimizer(optimizer), cfg.train)
    precision = resolve_precision(cfg.train.precision, device)
    scaler = precision.scaler()
    batch = to_device(random_batch(args.batch_size, args.image_size, cfg.data.max_caption_length,
                                   cfg.model.vocab_size), device, channels_last)
    task.train()

    def step() -> torch.Tensor:
        return train_step(model, batch, optimizer, scheduler, scaler, precision,
                          clip_grad_norm=cfg.train.clip_grad_norm, accumulate=cfg.train.accumulate).loss

    return step, {"precision": precision.name, "channels_last": channels_last, "compile": model is not task,
                  "accumulate": cfg.train.accumulate, "params": count_parameters(task),
                  "activation_checkpointing": cfg.model.activation_checkpointing}


def backbone_step(cfg: Config, args: argparse.Namespace, device: torch.device) -> tuple[Callable[[], float], dict]:
    task = build_task(cfg, cfg.model.vocab_size).to(device)
    visual = task.visual.train()
    opt = torch.optim.SGD(visual.parameters(), lr=0.01, momentum=0.9, fused=True)
    images = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=device)
    precision = resolve_precision(cfg.train.precision, device)  # the limit under the step's own numerics

    def step() -> torch.Tensor:
        opt.zero_grad(set_to_none=True)
        with precision.autocast():
            loss = visual(images).float().mean()
        loss.backward()
        opt.step()
        return loss.detach()

    return step, {"params": sum(p.numel() for p in visual.parameters()), "precision": precision.name}


def head_step(cfg: Config, args: argparse.Namespace, device: torch.device) -> tuple[Callable[[], float], dict]:
    task = build_task(cfg, cfg.model.vocab_size).to(device).train()
    with torch.no_grad():
        grid = task.visual(torch.randn(2, 3, args.image_size, args.image_size, device=device))
    grid = grid[:1].expand(args.batch_size, -1, -1, -1).contiguous()
    task.visual = _Constant(grid)
    params = [p for p in task.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.001, momentum=0.9, fused=True)
    batch = to_device(random_batch(args.batch_size, args.image_size, cfg.data.max_caption_length,
                                   cfg.model.vocab_size), device, False)
    precision = resolve_precision(cfg.train.precision, device)

    def step() -> torch.Tensor:
        opt.zero_grad(set_to_none=True)
        with precision.autocast():
            loss = task(batch).loss.float()
        loss.backward()
        opt.step()
        return loss.detach()

    return step, {"params": sum(p.numel() for p in params), "precision": precision.name}


class _Constant(torch.nn.Module):
    def __init__(self, grid: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("grid", grid)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.grid


def matmul_step(cfg: Config, args: argparse.Namespace, device: torch.device) -> tuple[Callable[[], float], dict]:
    t, h, v = cfg.data.max_caption_length, cfg.model.textual.hidden, cfg.model.vocab_size
    heads = 2 if cfg.model.task == "bicaptioning" else 1
    precision = resolve_precision(cfg.train.precision, device)
    dtype = precision.dtype or torch.float32  # the dtype autocast gives these products in the step
    x = torch.randn(args.batch_size * t, h, device=device, dtype=dtype)  # (B*T, H) hidden states
    w = torch.randn(v, h, device=device, dtype=dtype) * 0.02  # (V, H) tied output weight
    g = torch.randn(args.batch_size * t, v, device=device, dtype=dtype)  # (B*T, V) gradient of the logits

    def step() -> torch.Tensor:
        total = torch.zeros((), device=device)
        for _ in range(heads):
            logits = x @ w.t()  # forward
            grad_x, grad_w = g @ w, g.t() @ x  # backward: inputs, weights
            total = total + logits[0, 0] + grad_x[0, 0] + grad_w[0, 0]
        return total

    flops = heads * 3 * 2 * args.batch_size * t * h * v
    return step, {"gflop_per_step": round(flops / 1e9, 2), "precision": precision.name}


def original(cfg: Config, args: argparse.Namespace, device: torch.device) -> tuple[Callable[[], float], dict]:
    if not args.virtex:
        raise SystemExit("--part original needs --virtex DIR (a checkout of kdexd/virtex)")
    from original_virtex import original_step  # bench/ is the script's directory, so it is on sys.path

    batch = to_device(random_batch(args.batch_size, args.image_size, cfg.data.max_caption_length,
                                   cfg.model.vocab_size), device, False)
    return original_step(cfg, batch, args.virtex)


PARTS = {"task": task_step, "backbone": backbone_step, "head": head_step, "matmuls": matmul_step, "original": original}

# --variants: named switches, joined with "+" (bf16+channels_last+compile); later ones override earlier
VARIANTS: dict[str, list[str]] = {
    "fp32": ["train.precision=fp32", "train.channels_last=false"],
    "bf16": ["train.precision=bf16", "train.channels_last=false"],
    "channels_last": ["train.channels_last=true"],
    "compile": ["train.compile=true"],
    "ac": ["model.activation_checkpointing=true"],
}


def variant_overrides(name: str) -> list[str]:
    unknown = [v for v in name.split("+") if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variant {unknown[0]!r}; known: {', '.join(VARIANTS)}")
    return [o for v in name.split("+") for o in VARIANTS[v]]


def run(args: argparse.Namespace, batch_size: int, overrides: list[str]) -> dict:
    """Time ``args.steps`` steps after ``args.warmup_steps``; the JSON line's fields."""
    cfg = load_config(args.config, [f"data.image_size={args.image_size}", f"train.batch_size={batch_size}",
                                    f"train.device={args.device}", "data.vocab=", *overrides])
    device = torch.device(args.device)
    torch.manual_seed(cfg.train.seed)  # same weights and batch in every run: losses comparable across switches
    args.batch_size = batch_size
    step, facts = PARTS[args.part](cfg, args, device)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device) / 2**20 if device.type == "cuda" else memory_mb(device)
    for _ in range(args.warmup_steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    loss = float(loss)  # waits for the device
    seconds = time.perf_counter() - start
    peak = memory_mb(device)
    return {"config": args.config, "part": args.part, "task": cfg.model.task, "backbone": cfg.model.backbone,
            "hidden": cfg.model.textual.hidden, "layers": cfg.model.textual.layers, "device": args.device,
            "batch_size": batch_size, "image_size": args.image_size, "threads": torch.get_num_threads(),
            "steps": args.steps, "seconds_per_step": seconds / args.steps, "loss": loss,
            "images_per_s": batch_size * args.steps / seconds, "peak_memory_mb": round(peak, 1),
            "step_memory_mb": round(peak - before, 1), **facts}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--batch-sizes", type=int, nargs="+", help="several batch sizes, one JSON line each")
    p.add_argument("--variants", nargs="+", help=f"one JSON line per variant and batch size ({', '.join(VARIANTS)}, "
                                                 "joined with +); a failed one prints its error and the rest run")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup-steps", type=int, default=2)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--compile", action="store_true", help="torch.compile the task (as train.compile=true)")
    p.add_argument("--part", choices=sorted(PARTS), default="task", help="what to time (see above)")
    p.add_argument("--virtex", help="a kdexd/virtex checkout (the directory holding virtex/), for --part original")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    if not args.variants:
        print(json.dumps(run(args, args.batch_size, args.overrides)))
        return 0
    failed = 0
    for batch_size in args.batch_sizes or [args.batch_size]:
        for name in args.variants:
            try:
                line = {"variant": name, **run(args, batch_size, [*args.overrides, *variant_overrides(name)])}
            except (RuntimeError, ValueError) as exc:  # e.g. out of memory: report it, measure the rest
                failed += 1
                line = {"variant": name, "batch_size": batch_size, "error": str(exc).strip().splitlines()[0][:300]}
            print(json.dumps(line), flush=True)
            gc.collect()
            if args.device == "cuda":
                torch.cuda.empty_cache()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
