"""``bench/decode.py --compare``: both decoders timed on the same batch, the ratio and caption equality."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "decode.py"
ARGS = ["--config", "configs/demo.yaml", "--image-size", "32", "--batch-size", "3", "--max-steps", "6",
        "--repeats", "2", "--warmup", "0", "--compare", "model.vocab_size=60", "model.textual.hidden=64",
        "model.visual_width=16"]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def bench():
    spec = importlib.util.spec_from_file_location("bench_decode", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("force", ["--force", "--no-force"])
def test_compare_reports_both_decoders_and_the_same_captions(bench, capsys, monkeypatch, force):
    monkeypatch.chdir(SCRIPT.parents[1])
    assert bench.main([*ARGS, force]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["same_captions"] is True and line["rounds"] == 2
    assert line["legacy_s"] > 0 and line["current_s"] > 0
    assert line["speedup"] == pytest.approx(line["legacy_s"] / line["current_s"], rel=0.01)


def test_compare_notices_different_captions(bench, capsys, monkeypatch):
    monkeypatch.chdir(SCRIPT.parents[1])
    real = bench.decode

    def off_by_one(*args, **kwargs):
        out = real(*args, **kwargs)
        out.tokens[0] = [*out.tokens[0], 5]
        return out

    monkeypatch.setattr(bench, "decode", off_by_one)
    assert bench.main([*ARGS, "--force"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["same_captions"] is False


def test_floor_counts_the_rows_each_step_fed(bench, capsys, monkeypatch):
    """``--floor``: forced steps feed one row per image, then every beam; the floor is the visual forward
    plus the products of exactly those steps, and below the whole decode."""
    monkeypatch.chdir(SCRIPT.parents[1])
    args = [a for a in ARGS if a != "--compare"]
    assert bench.main([*args, "--floor", "--no-limit", "--beam-size", "4"]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["rows_fed"] == [3] + [12] * 5  # batch 3, beam 4, six forced steps
    assert line["products_s"] > 0 and line["floor_s"] == pytest.approx(
        line["floor_visual_s"] + line["products_s"], abs=2e-4)
    assert line["floor_s"] < line["seconds_per_batch"] and line["batch_over_floor"] > 1
