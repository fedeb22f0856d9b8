"""Optimizers for pretraining: SGD or AdamW over a task's parameter groups, wrapped in Lookahead.

The task decides the groups (which parameters are backbone or head, which take no weight decay);
this module only turns them into an optimizer, so the trainer never knows which task it trains.
"""

from __future__ import annotations

from typing import Any

import torch

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
    def step(self, closure: Any = None, *, skip: torch.Tensor | None = None) -> Any:
        """One inner step, and every ``k`` steps the slow-weight update as ``torch._foreach`` ops.

        ``skip`` (a 0-d tensor, 1 = skip) masks the update on the device, with no host sync: the
        inner optimizer must then be fused (it reads ``found_inf``), and a skipped step still counts
        as one of the ``k`` but leaves the fast and slow weights as they were.
        """
        if skip is None:
            loss = self.optimizer.step(closure)
        else:
            loss = fused_step(self.optimizer, skip, closure)
        self.step_count += 1
        if self.step_count % self.k == 0:
            fast = self._params()
            if skip is None:
                torch._foreach_lerp_(self.slow, fast, self.alpha)  # slow += alpha * (fast - slow)
                torch._foreach_copy_(fast, self.slow)
            else:  # lerp with weight 0 is the identity and with weight 1 a copy, both bit-exact
                keep = 1.0 - skip.float()
                torch._foreach_lerp_(self.slow, fast, keep * self.alpha)
                torch._foreach_lerp_(fast, self.slow, keep)
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


def _fusable(groups: list[dict[str, Any]]) -> bool:
    """torch's fused kernels take plain floating-point tensors on a supported device (not DTensors)."""
    from torch.distributed.tensor import DTensor
    from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

    devices = _get_fused_kernels_supported_devices()
    params = [p for g in groups for p in g["params"]]
    return bool(params) and all(p.is_floating_point() and p.device.type in devices and not isinstance(p, DTensor)
                                for p in params)


def build_optimizer(groups: list[dict[str, Any]], cfg: TrainConfig) -> torch.optim.Optimizer | Lookahead:
    """SGD (momentum, no Nesterov) or AdamW over ``groups``; ``lr`` of each group is its peak LR.

    The fused kernels are used where torch has them (CPU and CUDA tensors): one kernel per step, and
    they skip a non-finite update on the device (``found_inf``) with no host sync. Elsewhere (FSDP's
    DTensors) the multi-tensor ``foreach`` kernels.
    """
    for group in groups:
        group.setdefault("initial_lr", group["lr"])
    fused = _fusable(groups)
    kernel = {"fused": True} if fused else {"foreach": True}
    if cfg.optimizer == "sgd":
        inner: torch.optim.Optimizer = torch.optim.SGD(groups, lr=cfg.lr_textual, momentum=cfg.momentum,
                                                       weight_decay=cfg.weight_decay, **kernel)
        if fused and cfg.momentum > 0:
            _zero_momentum(inner)
    else:
        inner = torch.optim.AdamW(groups, lr=cfg.lr_textual, weight_decay=cfg.weight_decay, **kernel)
    if cfg.lookahead:
        return Lookahead(inner, alpha=cfg.lookahead_alpha, k=cfg.lookahead_k)
    return inner


def _zero_momentum(sgd: torch.optim.SGD) -> None:
    """Start SGD's momentum at zero, which gives the first step's ``buf = grad`` bit for bit: torch's
    fused SGD allocates the buffers uninitialised on its first step and leaves them so when that step
    is skipped by ``found_inf``, which would poison every later step."""
    for group in sgd.param_groups:
        for p in group["params"]:
            sgd.state[p].setdefault("momentum_buffer", torch.zeros_like(p, memory_format=torch.preserve_format))


def is_fused(optimizer: torch.optim.Optimizer | Lookahead) -> bool:
    return all(group.get("fused") for group in inner_optimizer(optimizer).param_groups)


def fused_step(optimizer: torch.optim.Optimizer, skip: torch.Tensor, closure: Any = None) -> Any:
    """A fused optimizer's step that its kernel skips on the device when ``skip`` is 1 (no host sync):
    the ``found_inf`` mechanism of torch's GradScaler, used for every precision."""
    optimizer.grad_scale, optimizer.found_inf = None, skip.float()  # type: ignore[attr-defined]
    try:
        return optimizer.step(closure)
    finally:
        del optimizer.grad_scale, optimizer.found_inf  # type: ignore[attr-defined]


def step_unless(optimizer: torch.optim.Optimizer | Lookahead, skip: torch.Tensor) -> None:
    """Step unless ``skip`` (0-d bool tensor): on the device for fused optimizers; otherwise (foreach,
    e.g. FSDP's DTensors, or an optimizer built elsewhere) after one host sync."""
    if is_fused(optimizer):
        if isinstance(optimizer, Lookahead):
            optimizer.step(skip=skip)
        else:
            fused_step(optimizer, skip)
    elif not bool(skip):  # host sync: only optimizers without a fused kernel
        optimizer.step()


def inner_optimizer(optimizer: torch.optim.Optimizer | Lookahead) -> torch.optim.Optimizer:
    """The torch optimizer that LR schedulers act on (Lookahead shares its param groups)."""
    return optimizer.optimizer if isinstance(optimizer, Lookahead) else optimizer

