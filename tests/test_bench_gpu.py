"""``bench/gpu.sh --dry-run``: every piece of the prepared GPU benchmark runs on the CPU at toy sizes and
prints its JSON lines, in under a minute, so the script is known to work before a GPU is lent."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "gpu.sh"


@pytest.mark.slow
def test_dry_run_prints_every_piece_in_under_a_minute():
    start = time.monotonic()
    proc = subprocess.run(["bash", str(SCRIPT), "--dry-run"], capture_output=True, text=True, timeout=1800, check=False,
                          env={**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "2"})
    seconds = time.monotonic() - start
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = [json.loads(line) for line in proc.stdout.splitlines()]  # JSON lines only
    assert not [r for r in lines if "error" in r]
    by = {}
    for row in lines:
        by.setdefault(row["bench"], []).append(row)
    assert set(by) == {"device", "train", "ac", "loader", "svm", "decode"}
    train = {(r["batch_size"], r["variant"]) for r in by["train"]}
    assert train == {(b, v) for b in (2, 4) for v in ("fp32", "bf16", "bf16+channels_last",
                                                      "bf16+channels_last+compile")}
    for row in by["train"] + by["ac"]:
        assert row["images_per_s"] > 0 and row["peak_memory_mb"] > 0 and row["config"] == "bicaptioning_R_50_L1_H2048"
    assert all(r["compile"] == ("compile" in r["variant"]) for r in by["train"])
    assert by["ac"][0]["activation_checkpointing"] is True
    assert by["loader"][0]["images_per_s"] > 0 and by["svm"][0]["seconds"] >= 0 and by["decode"][0]["images_per_s"] > 0
    # the goal is under a minute on an idle 2-core machine (quoted in the issue note); the bound here only
    # catches a dry run that grew into a real one (hours on a CPU), not a busy CI machine's slowness (a CI run
    # beside two training jobs once took a piece past 60 s)
    assert seconds < 900, f"dry run took {seconds:.0f} s"


def test_unknown_argument_is_a_usage_line():
    proc = subprocess.run(["bash", str(SCRIPT), "--bogus"], capture_output=True, text=True, timeout=30,
                          check=False)
    assert proc.returncode == 2 and "usage: bench/gpu.sh [--dry-run]" in proc.stderr
