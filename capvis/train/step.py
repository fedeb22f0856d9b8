"""The training step: the one place that owns the ordering of autocast, backward (over ``accumulate``
micro-batches), unscale, clip, step, scaler update and LR step, and the skipping of non-finite updates.

A skipped step leaves the model exactly as it was: parameters and optimizer state are untouched
(the fused optimizer kernels skip on the device through ``found_inf``), and buffers the forward pass
may have written (BatchNorm running statistics, which a NaN activation would poison) are put back
from a copy taken before the forward. None of this reads a value back to the host: the decision is
a 0-d tensor, and the loop reads it at its log cadence.

Accumulation: the batch (this process's share of ``train.batch_size``) is split into ``accumulate``
equal micro-batches; each one's loss is weighted ``1/accumulate``, so the gradient is that of the
mean of the micro-batch losses, and gradients are all-reduced (DDP) or reduce-scattered (FSDP) only
on the last one. With batch-independent layers (GroupNorm, no dropout) and equal token counts per
micro-batch, this is the gradient of the whole batch; BatchNorm sees micro-batch statistics.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from capvis.train.distributed import skip_grad_sync
from capvis.train.optim import Lookahead, inner_optimizer, step_unless
from capvis.train.precision import Precision


@dataclass
class StepResult:
    loss: torch.Tensor  # detached, on device: the mean over the step's micro-batches
    logs: dict[str, torch.Tensor]  # idem, each averaged over micro-batches
    grad_norm: torch.Tensor
    skipped: torch.Tensor  # () bool on device: the update was skipped (non-finite loss or gradient)
    loss_nonfinite: torch.Tensor  # () bool on device: the loss itself was NaN/inf (under fp16 the only "bad")

    @property
    def finite(self) -> bool:
        """Host copy of ``not skipped`` (a sync: for tests and the log cadence, not every step)."""
        return not bool(self.skipped)

    @property
    def loss_finite(self) -> bool:
        return not bool(self.loss_nonfinite)


def split_batch(batch: dict[str, Any], parts: int) -> list[dict[str, Any]]:
    """``parts`` micro-batches of ``batch``: every tensor whose first dimension is the batch is split
    (``tensor_split``: views, no copy); anything else is shared by all of them."""
    if parts == 1:
        return [batch]
    size = next(v.shape[0] for v in batch.values() if isinstance(v, torch.Tensor) and v.ndim)
    if size % parts:
        raise ValueError(f"a batch of {size} cannot be split into {parts} equal micro-batches")
    split = {k: v.tensor_split(parts) if isinstance(v, torch.Tensor) and v.ndim and v.shape[0] == size else None
             for k, v in batch.items()}
    return [{k: (split[k][i] if split[k] is not None else v) for k, v in batch.items()} for i in range(parts)]


def forward_backward(model: nn.Module, batch: dict[str, Any], scaler: torch.amp.GradScaler, precision: Precision,
                     accumulate: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Backward over ``accumulate`` micro-batches, gradient sync on the last only; (mean loss, mean logs)."""
    chunks = split_batch(batch, accumulate)
    loss, logs = torch.zeros(()), {}
    for i, chunk in enumerate(chunks):
        with skip_grad_sync(model, i < len(chunks) - 1):
            with precision.autocast():
                out = model(chunk)
            scaler.scale(out.loss / accumulate if accumulate > 1 else out.loss).backward()
        if i == 0:
            loss, logs = out.loss.detach().float(), {k: v.detach() for k, v in out.logs.items()}
        else:
            loss = loss + out.loss.detach().float()
            logs = {k: logs[k] + v.detach() for k, v in out.logs.items()}
    if accumulate > 1:
        loss, logs = loss / accumulate, {k: v / accumulate for k, v in logs.items()}
    return loss, logs


def gradient_norm(params: list[torch.Tensor], clip: float) -> torch.Tensor:
    """Total L2 norm of the gradients (clipped to ``clip`` when > 0), as a plain tensor on the device
    (FSDP's DTensor norm is reduced over the shards)."""
    if clip > 0:
        norm = torch.nn.utils.clip_grad_norm_(params, clip)
    else:
        norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


def train_step(
    model: nn.Module,
    batch: dict[str, Any],
    optimizer: torch.optim.Optimizer | Lookahead,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
    precision: Precision,
    *,
    clip_grad_norm: float = 0.0,
    accumulate: int = 1,
    distributed: bool = False,
) -> StepResult:
    """One optimisation step on ``batch``.

    A non-finite loss or gradient norm skips the update (under fp16 the scaler also lowers its
    scale); the scheduler still advances, so the LR stays a function of the iteration alone. With
    ``distributed`` the ranks agree on the skip (a MAX all-reduce of two flags, on the device): a
    loss that is infinite on one rank only must not let the replicas drift apart.
    """
    optimizer.zero_grad(set_to_none=True)
    buffers = list(model.buffers())
    saved = [b.detach().clone() for b in buffers]  # BatchNorm statistics and counters: a few KB
    loss, logs = forward_backward(model, batch, scaler, precision, accumulate)
    scaler.unscale_(inner_optimizer(optimizer))
    params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    grad_norm = gradient_norm(params, clip_grad_norm)
    flags = torch.stack([~torch.isfinite(loss), ~torch.isfinite(grad_norm.float())])  # (loss bad, grad bad)
    if distributed:
        flags = flags.to(torch.uint8)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        flags = flags.bool()
    loss_nonfinite, skipped = flags[0], flags.any()
    step_unless(optimizer, skipped)
    with torch.no_grad():
        for b, s in zip(buffers, saved):
            b.copy_(torch.where(skipped, s, b))
    scaler.update()
    scheduler.step()
    return StepResult(loss, logs, grad_norm.detach(), skipped, loss_nonfinite)
