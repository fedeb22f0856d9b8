"""Optimizers for pretraining: SGD or AdamW over a task's parameter groups, wrapped in Lookahead.

The task decides the groups (which parameters are backbone or head, which take no weight decay);
this module only turns them into an optimizer, so the trainer never knows which task it trains.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from capvis.config import TrainConfig


class Lookahead:
    """Lookahead (Zhang et al., 2019) around any inner optimizer.

    Every ``k`` inner steps the fast weights move ``alpha`` of the way towards the slow weights,
    and the slow weights take that value. Unlike the original VirTex code, the slow weights are
    part of :meth:`state_dict`, so a resumed run continues exactly.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, *, alpha: float = 0.5, k: int = 5) -> None:
        if not 0.0 < alpha <= 1.0 or k < 1:
            raise ValueError(f"Lookahead needs 0 < alpha <= 1 and k >= 1, got alpha={alpha}, k={k}")
        self.optimizer = optimizer
        self.alpha = alpha
        self.k = k
        self.step_count = 0
        self.slow = [p.detach().clone() for p in self._params()]

    def _params(self) -> list[torch.Tensor]:
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.optimizer.param_groups

    @property
    def state(self) -> Any:
        return self.optimizer.state

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = self.optimizer.step(closure)
        self.step_count += 1
        if self.step_count % self.k == 0:
            fast = self._params()
            torch._foreach_lerp_(self.slow, fast, self.alpha)  # slow += alpha * (fast - slow)
            torch._foreach_copy_(fast, self.slow)
        return loss

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict(), "slow": [s.clone() for s in self.slow],
                "step_count": self.step_count, "alpha": self.alpha, "k": self.k}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        if len(state["slow"]) != len(self.slow):
            raise ValueError("Lookahead state does not match the parameters")
        for mine, saved in zip(self.slow, state["slow"]):
            mine.copy_(saved)
        self.step_count = int(state["step_count"])


def build_optimizer(groups: list[dict[str, Any]], cfg: TrainConfig) -> torch.optim.Optimizer | Lookahead:
    """SGD (momentum, no Nesterov) or AdamW over ``groups``; ``lr`` of each group is its peak LR."""
    for group in groups:
        group.setdefault("initial_lr", group["lr"])
    if cfg.optimizer == "sgd":
        inner: torch.optim.Optimizer = torch.optim.SGD(groups, lr=cfg.lr_textual, momentum=cfg.momentum,
                                                       weight_decay=cfg.weight_decay)
    else:
        inner = torch.optim.AdamW(groups, lr=cfg.lr_textual, weight_decay=cfg.weight_decay)
    if cfg.lookahead:
        return Lookahead(inner, alpha=cfg.lookahead_alpha, k=cfg.lookahead_k)
    return inner


def inner_optimizer(optimizer: torch.optim.Optimizer | Lookahead) -> torch.optim.Optimizer:
    """The torch optimizer that LR schedulers act on (Lookahead shares its param groups)."""
    return optimizer.optimizer if isinstance(optimizer, Lookahead) else optimizer


def trainable_parameters(module: nn.Module) -> list[nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]
