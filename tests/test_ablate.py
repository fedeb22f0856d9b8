"""The ablation runner on a tiny budget: every task on the same data, one table, one chart."""

from __future__ import annotations

import csv


from capvis.cli import main


def test_tiny_ablation_writes_table_csv_and_chart(tmp_path, capsys):
    out = tmp_path / "ablation"
    tasks = "bicaptioning,token_classification,random_init"
    assert main(["ablate", "--tasks", tasks, "--budget", "tiny", "--output", str(out)]) == 0
    rows = list(csv.DictReader((out / "ablation.csv").open()))
    assert [r["task"] for r in rows[::3]] == tasks.split(",")
    assert {r["eval_task"] for r in rows} == {"shape", "color_shape", "count"}
    assert all(0 <= float(r["mAP"]) <= 100 and float(r["seconds"]) >= 0 for r in rows)
    assert "| random_init |" in (out / "ablation.md").read_text()
    assert (out / "ablation.png").stat().st_size > 0
    assert "ablation.csv" in capsys.readouterr().out


def test_unknown_task_is_one_line(tmp_path, capsys):
    assert main(["ablate", "--tasks", "bicaptioning,telepathy", "--output", str(tmp_path)]) == 2
    assert "telepathy" in capsys.readouterr().err
