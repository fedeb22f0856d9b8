"""``bench/train_step.py``: the parts it times run and print their JSON line; the original VirTex's part
names what it needs in one line when the checkout is missing (the checkout itself is not in CI)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "train_step.py"
TINY = ["--config", "configs/demo.yaml", "--batch-size", "2", "--image-size", "32", "--steps", "1",
        "--warmup-steps", "0", "model.textual.hidden=64", "model.visual_width=16", "model.vocab_size=64"]


def _run(*args: str, overrides: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args, *TINY, *overrides], capture_output=True, text=True,
                          timeout=300, check=False, cwd=SCRIPT.parents[1])


@pytest.mark.parametrize("part", ["task", "head"])
def test_a_part_prints_one_json_line(part):
    proc = _run("--part", part)
    assert proc.returncode == 0, proc.stderr[-2000:]
    line = json.loads(proc.stdout.strip().splitlines()[-1])
    assert line["part"] == part and line["images_per_s"] > 0 and line["batch_size"] == 2


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("part", ["backbone", "head", "matmuls"])
def test_the_limits_run_under_the_step_s_precision(part, precision):
    proc = _run("--part", part, overrides=(f"train.precision={precision}",))
    assert proc.returncode == 0, proc.stderr[-2000:]
    line = json.loads(proc.stdout.strip().splitlines()[-1])
    assert line["part"] == part and line["precision"] == precision and line["images_per_s"] > 0


def test_original_without_a_checkout_says_what_it_needs(tmp_path):
    proc = _run("--part", "original")
    assert proc.returncode != 0 and proc.stderr.strip().endswith("--part original needs --virtex DIR "
                                                                   "(a checkout of kdexd/virtex)")
    proc = _run("--part", "original", "--virtex", str(tmp_path))
    assert proc.returncode != 0 and "no virtex/models/captioning.py there" in proc.stderr.strip().splitlines()[-1]
    assert "Traceback" not in proc.stderr
