"""One sink for training metrics: ``metrics.jsonl``, TensorBoard scalars and a tqdm progress bar.

Only the main process writes. Values arrive as Python floats: the loop calls ``.item()`` at the
log cadence only, never every step.

A run that starts at iteration ``start`` (a resume from the checkpoint of that iteration, or 0 for a
fresh run) first cuts ``metrics.jsonl`` back to the rows of iterations ``<= start``, atomically
(temporary file, fsync, rename), so the steps it re-runs after a stop appear once, not twice, to
every reader; a partial last line left by a killed process goes too. TensorBoard gets
``purge_step=start + 1``, which makes it discard the earlier events of the re-run steps.
"""

from __future__ import annotations

import json
import logging
import stat
from pathlib import Path
from typing import Any

from tqdm import tqdm

from capvis.train.checkpoint import atomic_write_bytes

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
        try:
            truncate_metrics(self.output / "metrics.jsonl", start)
        except OSError as exc:  # as for a full disk: say so, keep training
            log.warning("could not cut %s back to iteration %d (%s): re-run steps will appear twice",
                        self.output / "metrics.jsonl", start, exc.strerror or exc)
        self._jsonl = (self.output / "metrics.jsonl").open("a")
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.output / "tensorboard"), purge_step=start + 1)
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


def truncate_metrics(path: Path, iteration: int) -> int:
    """Keep only the rows of ``path`` whose iteration is ``<= iteration`` (atomically); returns rows dropped."""
    if not path.is_file():
        return 0
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines(keepends=True)
    keep = [line for line in lines if (it := _row_iteration(line)) is not None and it <= iteration]
    dropped = len([line for line in lines if line.strip()]) - len(keep)
    if not dropped:
        return 0
    text = "".join(line if line.endswith("\n") else line + "\n" for line in keep)
    # keep the file's permissions; the same all-or-nothing write as checkpoints
    atomic_write_bytes(text.encode("utf-8"), path, mode=stat.S_IMODE(path.stat().st_mode))
    log.info("%s: dropped %d rows after iteration %d (they are re-run from the checkpoint)", path, dropped, iteration)
    return dropped


def _row_iteration(line: str) -> int | None:
    try:
        row = json.loads(line)
    except ValueError:
        return None
    value = row.get("iteration") if isinstance(row, dict) else None
    return value if isinstance(value, int) and not isinstance(value, bool) else None
