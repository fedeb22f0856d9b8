"""The shrunken demo runs end to end and writes a report whose numbers were computed in the run."""

from __future__ import annotations

import json
import re

from capvis.cli import main


def test_quick_demo_writes_report(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--output", str(out), "--seed", "3"]) == 0
    printed = capsys.readouterr().out
    assert "| bicaptioning |" in printed and "| random init |" in printed
    results = json.loads((out / "results.json").read_text())
    assert results["seed"] == 3 and results["quick"] is True
    rows = results["results"]
    assert {r["method"] for r in rows} == {"bicaptioning", "random init"}
    assert {r["task"] for r in rows} == {"shape", "color_shape", "count"}
    assert all(0.0 <= r["mAP"] <= 100.0 for r in rows)
    for stage in ("world", "vocabulary", "pretrain_bicaptioning", "svm_bicaptioning", "svm_random_init", "total"):
        assert results["seconds"][stage] >= 0
    for name in ("report.md", "report.html", "loss_curve.png", "captions.png", "attention_0.png"):
        assert (out / name).stat().st_size > 0, name
    md = (out / "report.md").read_text()
    table_numbers = re.findall(r"\| (\d+\.\d) ", md)
    assert len(table_numbers) == 6  # 2 methods x 3 tasks, as computed in results.json
    assert sorted(float(x) for x in table_numbers) == sorted(round(r["mAP"], 1) for r in rows)
    assert "captions.png" in (out / "report.html").read_text()
    assert len(results["captions"]) == 4 and all("caption" in c for c in results["captions"])
