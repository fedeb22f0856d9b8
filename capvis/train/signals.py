"""Pre-emption: SIGTERM/SIGINT ask the loop to checkpoint and leave, instead of dying mid-step.

The first signal only sets a flag; the loop finishes its step, writes a checkpoint and returns, and
``capvis pretrain`` exits 0. A *second* signal of the same kind means "now": the previous handler
is restored and the signal re-delivered (SIGINT raises KeyboardInterrupt, SIGTERM kills), losing at
most the iterations since the last checkpoint, as SIGKILL does.

Under DDP/FSDP the ranks agree through an all-reduce of the flag every ``every`` calls (the loop
passes ``train.log_every``), not every step: that collective reads a value back to the host, which
stalls a GPU pipeline. Every rank counts the same calls, so all stop at the same iteration and no
collective is left waiting; a stop waits at most ``every`` steps.
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

    def __init__(self, info: DistInfo, *, every: int = 1) -> None:
        if every < 1:
            raise ValueError(f"StopRequest needs every >= 1, got {every}")
        self.info, self.every = info, every
        self._calls = 0
        self._flag = False
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else "stop request"

    def _handler(self, signum: int, frame: FrameType | None) -> None:
        if self._flag and signum == self.signum:  # asked twice: stop now, the old way
            signal.signal(signum, self._previous.get(signum) or signal.SIG_DFL)
            signal.raise_signal(signum)
            return
        self._flag = True
        self.signum = signum

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)

    def request(self) -> None:
        """Ask for a stop from code (as a signal would)."""
        self._flag = True

    def requested(self) -> bool:
        """Once per step. Single process: the flag. Distributed: the ranks' agreed flag every ``every``
        calls (False in between, so a rank's own signal cannot make it leave alone)."""
        if not self.info.enabled:
            return self._flag
        self._calls += 1
        if self._calls % self.every:
            return False
        flag = torch.tensor([1.0 if self._flag else 0.0], device=self.info.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())
