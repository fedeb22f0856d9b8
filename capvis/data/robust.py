"""Bad-sample accounting: skip unreadable inputs with a counted warning, fail once there are too many.

A scraped dataset always holds a few broken files (a truncated JPEG, an empty caption, a line that
is not UTF-8). Stopping a multi-day run for one of them is wrong, and so is silently training on a
dataset that is mostly broken. :class:`BadSampleBudget` sits between the two:

* every sample a process *visits* counts as ``seen``; every visit that fails counts as ``bad`` and
  logs one warning with the file and the reason (the first time a given item fails; later visits of
  the same item log at debug level);
* the run fails with a :class:`~capvis.errors.DataError` naming the last culprit and the counts once
  ``bad > max_bad_fraction * seen`` **and** at least ``min_seen(max_bad_fraction)`` samples were
  seen (``max(20, 10 / max_bad_fraction)``: 1000 at the default 1%), so a bad file or two among the
  first samples cannot stop a healthy run by chance while the share is still noisy;
* ``max_bad_fraction = 0`` fails on the first bad sample; ``>= 1`` never fails on the share, only when
  nothing usable is left (a dataset whose every item is bad fails at once, see ``CaptionDataset``).

Counters are per process: each DataLoader worker holds its own copy of the dataset and so its own
budget, judged on the samples that worker has seen. For shard streams the batches also carry their
worker's counts, which :class:`BadSampleTally` sums in the training process for the end-of-run report,
``metrics.jsonl`` and the checkpoint (so the totals of a resumed run cover the whole run).
"""

from __future__ import annotations

import logging
import math
import re
from typing import Sequence

from capvis.errors import CapvisError, DataError

log = logging.getLogger(__name__)

MIN_SEEN = 20


def min_seen(max_bad_fraction: float) -> int:
    """Samples a process must have seen before the bad share is judged (the share is noisy before)."""
    if max_bad_fraction <= 0:
        return 0
    return max(MIN_SEEN, math.ceil(10 / max_bad_fraction))


class BadSampleBudget:
    """Counts visited and bad samples of one process and enforces ``max_bad_fraction``.

    Args:
        max_bad_fraction: the share of visited samples that may be bad (``data.max_bad_fraction``).
        what: the noun used in messages ("samples", "annotation lines").
    """

    def __init__(self, max_bad_fraction: float, what: str = "samples") -> None:
        if max_bad_fraction < 0:
            raise DataError(f"max_bad_fraction must be >= 0, got {max_bad_fraction}")
        self.max_bad_fraction = max_bad_fraction
        self.what = what
        self.seen = 0
        self.bad = 0
        self._reported: set[str] = set()

    def good(self) -> None:
        self.seen += 1

    def record_bad(self, culprit: str, reason: str) -> None:
        """Count a bad visit, warn (once per culprit), and raise DataError if over budget."""
        self.seen += 1
        self.bad += 1
        if culprit not in self._reported:
            self._reported.add(culprit)
            log.warning("skipping bad %s: %s (%s) [%d bad of %d seen in this process]",
                        self.what.rstrip("s"), culprit, reason, self.bad, self.seen)
        else:
            log.debug("skipping known-bad %s again: %s (%s)", self.what.rstrip("s"), culprit, reason)
        if self.over_budget():
            raise DataError(
                f"too many bad {self.what}: {self.bad} of {self.seen} seen ({100 * self.bad / self.seen:.1f}%) "
                f"exceed data.max_bad_fraction={self.max_bad_fraction:g}; last: {culprit} ({reason})")

    def over_budget(self) -> bool:
        if self.max_bad_fraction <= 0:
            return self.bad > 0
        if self.max_bad_fraction >= 1:
            return False
        return self.seen >= min_seen(self.max_bad_fraction) and self.bad > self.max_bad_fraction * self.seen


class BadSampleTally:
    """The bad and seen samples of one process's loader workers, from the counts their batches carry.

    Each worker's counts are cumulative, so the latest batch of each worker holds its totals. ``base``
    holds the run's totals (all processes) before a resume; :meth:`totals` adds it to the counts of
    this run summed over processes (the caller reduces :meth:`local` over ranks).
    """

    def __init__(self, base: dict[str, int] | None = None) -> None:
        self.base = (int((base or {}).get("bad", 0)), int((base or {}).get("seen", 0)))
        self._latest: dict[int, tuple[int, int]] = {}

    def update(self, stats: Sequence[int]) -> None:
        """``(worker, bad, seen)`` of one batch."""
        worker, bad, seen = (int(v) for v in stats)
        self._latest[worker] = (bad, seen)

    def local(self) -> tuple[int, int]:
        """(bad, seen) of this process's workers since the start of this run."""
        return sum(b for b, _ in self._latest.values()), sum(s for _, s in self._latest.values())

    def totals(self, summed_local: tuple[int, int] | None = None) -> dict[str, int]:
        """Plain data (checkpoint, report): ``base`` plus this run's counts (default: this process's)."""
        bad, seen = summed_local if summed_local is not None else self.local()
        return {"bad": self.base[0] + int(bad), "seen": self.base[1] + int(seen)}


_WORKER_HEADER = re.compile(r"^Caught \w+ in DataLoader worker process \d+\.")


def unwrap_worker_error(exc: CapvisError) -> CapvisError:
    """A CapvisError re-raised by a DataLoader worker carries a whole traceback in its message;
    return the same error type with only the original one-line message (for ``capvis: error: ...``)."""
    text = str(exc)
    if not _WORKER_HEADER.match(text):
        return exc
    last = text.rstrip().splitlines()[-1]
    name = type(exc).__name__
    message = last.split(f"{name}: ", 1)[1] if f"{name}: " in last else last
    return type(exc)(f"{message} (in a DataLoader worker)")
