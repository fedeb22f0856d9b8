"""Activation checkpointing (``model.activation_checkpointing``): a block's activations are not kept
for backward but recomputed from its input, trading one more forward of it for memory.

The recomputation runs the block's forward again, in training mode, so BatchNorm would count the
batch twice (its running statistics and ``num_batches_tracked`` move once more); during the
recomputation the statistics are held still, so checkpointing changes neither the loss, the gradients
nor the buffers. Under ``torch.compile`` the recomputation is part of the compiled graph, which never
replays the buffer updates, and torch does not take the custom context there.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


class _HoldStatistics:
    """Context for the recomputation: BatchNorm layers of ``module`` update nothing."""

    def __init__(self, module: nn.Module) -> None:
        self.norms = [m for m in module.modules()
                      if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
        self.saved: list[tuple[float | None, torch.Tensor]] = []

    def __enter__(self) -> None:
        # momentum 0: running = 1 * running + 0 * batch, bit-exact; the counter is put back on exit
        self.saved = [(m.momentum, m.num_batches_tracked.clone()) for m in self.norms]
        for m in self.norms:
            m.momentum = 0.0

    def __exit__(self, *exc: object) -> None:
        for m, (momentum, count) in zip(self.norms, self.saved):
            m.momentum = momentum
            m.num_batches_tracked.copy_(count)


def wants_checkpoint(module: nn.Module) -> bool:
    """Checkpoint only where it saves something: training with autograd on."""
    return getattr(module, "activation_checkpointing", False) and module.training and torch.is_grad_enabled()


def checkpointed(block: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """``block(*args, **kwargs)`` with its activations recomputed in backward (non-reentrant; RNG state
    replayed, so dropout draws the same masks)."""
    if torch.compiler.is_compiling():
        return checkpoint(block, *args, use_reentrant=False, **kwargs)
    return checkpoint(block, *args, use_reentrant=False,
                      context_fn=lambda: (contextlib.nullcontext(), _HoldStatistics(block)), **kwargs)


def set_activation_checkpointing(module: nn.Module, enabled: bool) -> int:
    """Switch checkpointing on every submodule that supports it (backbones: each stage; textual heads:
    each Transformer layer); returns how many there are, so a caller can say when none is."""
    found = 0
    for m in module.modules():
        if hasattr(m, "activation_checkpointing"):
            m.activation_checkpointing = enabled
            found += 1
    return found
