"""One sink for training metrics: ``metrics.jsonl``, TensorBoard scalars and a tqdm progress bar.

Only the main process writes. Values arrive as Python floats: the loop calls ``.item()`` at the
log cadence only, never every step.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from tqdm import tqdm

log = logging.getLogger(__name__)


class MetricsSink:
    def __init__(self, output: str | Path, *, total: int, start: int = 0, enabled: bool = True,
                 progress: bool = True) -> None:
        self.enabled = enabled
        self.output = Path(output)
        self._jsonl = None
        self._tb = None
        self._bar = None
        self._write_failed = False
        if not enabled:
            return
        self.output.mkdir(parents=True, exist_ok=True)
        self._jsonl = (self.output / "metrics.jsonl").open("a")
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.output / "tensorboard"))
        except Exception as exc:  # tensorboard missing or broken: keep training, say so once
            log.warning("TensorBoard disabled: %s", exc)
        self._bar = tqdm(total=total, initial=start, desc="pretrain", dynamic_ncols=True, disable=not progress,
                         mininterval=1.0)

    def log(self, iteration: int, values: dict[str, Any], *, prefix: str = "train") -> None:
        if not self.enabled:
            return
        record = {"iteration": iteration, **values} if prefix == "train" else \
            {"iteration": iteration, **{f"{prefix}/{k}": v for k, v in values.items()}}
        self._write(json.dumps(record) + "\n")
        if self._tb is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)):
                    self._tb.add_scalar(f"{prefix}/{key}", value, iteration)
        if self._bar is not None and prefix == "train":
            shown = {k: values[k] for k in ("loss", "lr", "images_per_s") if k in values}
            self._bar.set_postfix({k: f"{v:.4g}" for k, v in shown.items()}, refresh=False)

    def _write(self, line: str) -> None:
        """A full disk must not stop training: say so once, keep going (checkpoints report their own failures)."""
        try:
            self._jsonl.write(line)
            self._jsonl.flush()
        except OSError as exc:
            if not self._write_failed:
                log.warning("could not write %s (%s): metrics are not being recorded; training goes on",
                            self.output / "metrics.jsonl", exc.strerror or exc)
            self._write_failed = True

    def advance(self, n: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.close()
        if self._jsonl is not None:
            self._jsonl.close()
