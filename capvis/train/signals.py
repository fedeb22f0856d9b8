"""Pre-emption: SIGTERM/SIGINT ask the loop to checkpoint and leave, instead of dying mid-step.

Under DDP the ranks agree (an all-reduce of the flag each step), so every rank stops at the same
iteration and no collective is left waiting.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType

import torch
import torch.distributed as dist

from capvis.train.distributed import DistInfo


class StopRequest:
    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, info: DistInfo) -> None:
        self.info = info
        self._flag = False
        self._previous: dict[int, object] = {}

    def _handler(self, signum: int, frame: FrameType | None) -> None:
        self._flag = True

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def requested(self) -> bool:
        if not self.info.enabled:
            return self._flag
        flag = torch.tensor([1.0 if self._flag else 0.0], device=self.info.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())
