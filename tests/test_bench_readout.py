"""``bench/readout.py``: readout 1 is the demo's own protocol (global average pooling), so on the quick
demo's run it reproduces the demo's columns exactly, for the trained and the random-init backbone; finer
readouts concatenate cells (C x n^2 features)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from capvis.cli import main

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "readout.py"


def _readout_module():
    spec = importlib.util.spec_from_file_location("bench_readout", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_readout_1_is_the_demo_protocol_and_cells_concatenate(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--output", str(out), "--seed", "1"]) == 0
    capsys.readouterr()
    demo = json.loads((out / "results.json").read_text())["results"]
    assert _readout_module().main(["--run", str(out / "pretrain"), "--world", str(out / "world"),
                                   "--readouts", "1,2"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["model"], r["readout"]) for r in lines] == [("pretrained", 1), ("pretrained", 2),
                                                            ("random init", 1), ("random init", 2)]
    for row in lines:
        if row["readout"] == 1:
            name = "bicaptioning" if row["model"] == "pretrained" else "random init"
            expected = {r["task"]: round(r["value"], 2) for r in demo if r["method"] == name}
            assert row["columns"].keys() == expected.keys()
            for task, value in expected.items():
                assert row["columns"][task] == pytest.approx(value, abs=0.01, nan_ok=True), task
    assert lines[1]["features"] == 4 * lines[0]["features"]


def test_a_directory_without_a_run_is_one_line(tmp_path):
    with pytest.raises(SystemExit, match="no config.yaml there"):
        _readout_module().main(["--run", str(tmp_path), "--world", str(tmp_path)])
