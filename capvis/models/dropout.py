"""Dropout whose CPU masks cost a quarter of the random draws.

PyTorch draws a CPU dropout mask one element at a time from its sequential generator, which neither
vectorises nor spreads over threads: in the demo's step the textual heads' masks (~3.4 M elements) were
17% of the step on two cores (docs/demo.md). Here one 64-bit draw gives four 16-bit numbers, and an element
is kept when its number is at or above ``round(p * 2**16)`` of the 2**16 values: a drop probability within
2**-17 of ``p`` (0.100006 for 0.1). Same expectation as ``nn.Dropout`` (kept values scaled by 1/(1-p)), a
different random stream. Elsewhere (CUDA's fused kernel, eval mode, p = 0 or 1) it is ``nn.Dropout``.
Attention probabilities keep SDPA's dropout (a few percent of the draws): computing them outside SDPA would
round the scores to bf16 under autocast.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_LEVELS = 1 << 16  # 16-bit numbers
_INT16_MIN = -(1 << 15)


def keep_mask(shape: torch.Size, p: float, *, device: torch.device | str = "cpu") -> Tensor:
    """A boolean mask of ``shape``, each element False with probability ``round(p * 2**16) / 2**16``."""
    n = shape.numel()
    words = torch.empty((n + 3) // 4, dtype=torch.int64, device=device).random_(-(1 << 63), None)
    return words.view(torch.int16)[:n].view(shape) >= round(p * _LEVELS) + _INT16_MIN


def apply_dropout(x: Tensor, p: float, training: bool = True) -> Tensor:
    """``F.dropout`` with the cheaper CPU masks (module docstring)."""
    if not training or x.device.type != "cpu" or not 0.0 < p < 1.0:
        return F.dropout(x, p, training=training)
    return x * keep_mask(x.shape, p, device=x.device) * (1.0 / (1.0 - p))


class Dropout(nn.Dropout):
    """``nn.Dropout`` with cheaper masks on CPU (module docstring); no parameters, so state dicts and
    module names are those of ``nn.Dropout`` (VirTex's checkpoints load unchanged)."""

    def forward(self, x: Tensor) -> Tensor:
        if self.inplace:
            return super().forward(x)
        return apply_dropout(x, self.p, self.training)
