"""The training step: the one place that owns the ordering of autocast, backward, unscale, clip,
step, scaler update and LR step, and the skipping of non-finite updates.

A skipped step leaves the model exactly as it was: parameters and optimizer state are untouched
(no optimizer step), and buffers the forward pass may have written (BatchNorm running statistics,
which a NaN activation would poison) are restored from a copy taken before the forward.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from capvis.train.optim import Lookahead
from capvis.train.precision import Precision


@dataclass
class StepResult:
    loss: torch.Tensor  # detached, on device; read with .item() only at the log cadence
    logs: dict[str, torch.Tensor]
    grad_norm: torch.Tensor
    finite: bool  # False: the update was skipped (non-finite loss or gradient)
    loss_finite: bool = True  # False: the loss itself was NaN/inf (under fp16, the only "bad" step)


def train_step(
    model: nn.Module,
    batch: dict[str, Any],
    optimizer: torch.optim.Optimizer | Lookahead,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
    precision: Precision,
    *,
    clip_grad_norm: float = 0.0,
) -> StepResult:
    """One optimisation step on ``batch``.

    A non-finite loss or gradient norm skips the update (the fp16 scaler also skips and lowers its
    scale); the scheduler still advances, so the LR stays a function of the iteration alone.
    """
    optimizer.zero_grad(set_to_none=True)
    buffers = list(model.buffers())
    saved = [b.detach().clone() for b in buffers]  # BatchNorm statistics and counters: a few KB
    with precision.autocast():
        out = model(batch)
    scaler.scale(out.loss).backward()
    scaler.unscale_(optimizer)
    params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    if clip_grad_norm > 0:
        grad_norm = torch.nn.utils.clip_grad_norm_(params, clip_grad_norm)
    else:
        grad_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params]))
    flags = torch.isfinite(torch.stack([out.loss.detach().float(), grad_norm.float()])).tolist()  # one host sync
    loss_finite, finite = bool(flags[0]), bool(flags[0] and flags[1])
    if finite or precision.uses_scaler:
        scaler.step(optimizer)  # with fp16 the scaler itself skips non-finite gradients
    if not finite:
        with torch.no_grad():
            for b, s in zip(buffers, saved):
                b.copy_(s)
    scaler.update()
    scheduler.step()
    return StepResult(out.loss.detach(), {k: v.detach() for k, v in out.logs.items()}, grad_norm.detach(), finite,
                      loss_finite)
