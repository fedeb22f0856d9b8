"""The ablation runner: tasks with options x seeds x data, scored at 1/4, 1/2 and all of the budget;
CSV, mean ± std markdown with the seed-spread verdicts, curves."""

from __future__ import annotations

import csv
import logging
import math
import os
import re
from pathlib import Path

import pytest

from capvis.cli import main
from capvis.demo.ablate import (
    BUDGETS,
    RunSpec,
    checkpoint_plan,
    parse_captions,
    parse_fractions,
    parse_task,
    parse_tasks,
    plan_runs,
    run_config,
    split_list,
)
from capvis.demo.ablate_report import markdown, write_outputs
from capvis.errors import ConfigError

REQUIRED = ["task", "seed", "images_seen", "eval_task", "metric", "value", "seconds", "fraction", "captions_per_image"]
EVALS = {"shape": "mAP", "color_shape": "mAP", "count": "top1", "leftmost_color": "top1", "topmost_shape": "top1",
         "largest_color_shape": "top1"}


def test_tiny_ablation_over_two_seeds_writes_every_checkpoint_and_mean_std(tmp_path, capsys):
    out = tmp_path / "ablation"
    argv = ["ablate", "--tasks", "bicaptioning:dropout=0,random_init", "--budget", "tiny", "--seeds", "2",
            "--output", str(out)]
    assert main(argv) == 0
    rows = list(csv.DictReader((out / "ablation.csv").open()))
    assert set(REQUIRED) <= set(rows[0])
    keys = [(r["task"], r["seed"], r["images_seen"], r["eval_task"]) for r in rows]
    assert len(keys) == len(set(keys))  # one row per (task, seed, checkpoint, eval task)
    batch = 8
    expected = {("bicaptioning:dropout=0", str(s), str(i * batch), e) for s in (0, 1) for i in (1, 2, 4)
                for e in EVALS} | {("random_init", str(s), "0", e) for s in (0, 1) for e in EVALS}
    assert set(keys) == expected
    assert all(EVALS[r["eval_task"]] == r["metric"] for r in rows)
    assert all(math.isnan(float(r["value"])) or 0 <= float(r["value"]) <= 100 for r in rows)
    # the task option reached the run's config; only the final checkpoint is kept once scored
    run = out / "runs" / "bicaptioning_dropout=0" / "seed1"
    assert "dropout: 0.0" in (run / "config.yaml").read_text()
    assert [p.name for p in (run / "checkpoints").glob("*.pt")] == ["checkpoint_00000004.pt"]
    md = (out / "ablation.md").read_text()
    main_table = md.split("## Differences")[0]  # the zero-shot / retrieval tables follow (test_ablate_family.py)
    table = [line for line in main_table.splitlines() if line.startswith(("| bicaptioning", "| random_init"))]
    assert len(table) == 2 and all(line.count(" ± ") == len(EVALS) for line in table)
    assert "2 seeds" in md and "seed spread" in md
    assert (out / "ablation.png").stat().st_size > 0
    assert "ablation.csv" in capsys.readouterr().out
    # a second run in the same folder reuses every run's scores
    assert main(argv) == 0
    assert list(csv.DictReader((out / "ablation.csv").open())) == rows


@pytest.mark.usefixtures("one_thread")  # both ways one thread a run: the same arithmetic, equal results
def test_jobs_run_the_grid_in_parallel_processes_with_the_sequential_results(tmp_path, caplog):
    argv = ["ablate", "--tasks", "bicaptioning:dropout=0,random_init", "--budget", "tiny"]
    assert main([*argv, "--output", str(tmp_path / "one")]) == 0
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="capvis.demo.ablate"):
        assert main([*argv, "--output", str(tmp_path / "two"), "--jobs", "2"]) == 0
    found = (re.search(r"done \(process (\d+)\)", r.getMessage()) for r in caplog.records)
    workers = {int(m.group(1)) for m in found if m}
    assert len(workers) >= 1 and os.getpid() not in workers  # both runs trained in pool processes

    def results(name: str) -> list[dict[str, str]]:
        rows = list(csv.DictReader((tmp_path / name / "ablation.csv").open()))
        return [{k: v for k, v in r.items() if "seconds" not in k} for r in rows]

    one, two = results("one"), results("two")
    assert len(one) == 3 * len(EVALS) + len(EVALS) and two == one  # same rows, same order


def test_jobs_must_be_positive(tmp_path, capsys):
    assert main(["ablate", "--budget", "tiny", "--jobs", "0", "--output", str(tmp_path / "x")]) != 0
    err = capsys.readouterr().err.strip()
    assert "--jobs must be >= 1" in err and len(err.splitlines()) == 1


def test_task_entries_take_generic_config_options():
    spec = parse_task("bicaptioning:model.textual.hidden=512:dropout=0.2")
    assert spec.task == "bicaptioning" and spec.overrides == ("model.textual.hidden=512", "model.textual.dropout=0.2")
    assert spec.label == "bicaptioning:model.textual.hidden=512:dropout=0.2"
    assert split_list("a:data.crop_scale=[0.5,1.0], b") == ["a:data.crop_scale=[0.5,1.0]", "b"]
    assert [s.task for s in parse_tasks("token_classification,bicaptioning:layers=2,random_init")] == [
        "token_classification", "bicaptioning", "random_init"]
    for bad, complaint in (("bicaptioning:loss=x", "ambiguous"), ("bicaptioning:telepathy=1", "not a config"),
                           ("bicaptioning:hidden", "key=value"), ("random_init:train.iterations=5", "trains nothing"),
                           ("bicaptioning,bicaptioning", "twice"), ("telepathy", "telepathy")):
        with pytest.raises(ConfigError, match=complaint):
            parse_tasks(bad)


def test_checkpoint_plan_and_the_data_grid(tmp_path):
    assert checkpoint_plan(300) == (75, [75, 150, 300])
    assert checkpoint_plan(1001) == (250, [250, 500, 1001])  # never a checkpoint every iteration
    assert checkpoint_plan(4) == (1, [1, 2, 4]) and checkpoint_plan(1) == (1, [1])
    specs = parse_tasks("bicaptioning,random_init")
    runs = plan_runs(specs, [0, 1], (0.1, 1.0), (1, 5))
    assert len(runs) == 2 * 2 * 2 + 2 and sum(r.spec.task == "random_init" for r in runs) == 2
    run = RunSpec(parse_task("bicaptioning:dropout=0"), seed=3, fraction=0.1, captions_per_image=1)
    cfg = run_config("demo", tmp_path, tmp_path / "v.model", BUDGETS["small"], run, available=5)
    assert (cfg.data.fraction, cfg.data.one_caption_per_image, cfg.train.seed) == (0.1, True, 3)
    assert (cfg.train.checkpoint_every, cfg.train.keep_checkpoints, cfg.model.textual.dropout) == (75, 5, 0.0)
    assert run.name == "bicaptioning_dropout=0/seed3_f0.1_c1"
    with pytest.raises(ConfigError, match="--captions-per-image 3"):
        run_config("demo", tmp_path, tmp_path / "v.model", BUDGETS["small"], RunSpec(run.spec, 0, 1.0, 3), 5)
    assert parse_fractions("0.1,0.5,1") == (0.1, 0.5, 1.0) and parse_captions("1,5") == (1, 5)
    for bad in ("0", "1.5", "a"):
        with pytest.raises(ConfigError, match="--fractions"):
            parse_fractions(bad)


def _rows(values: dict[str, list[float]], fraction: float = 1.0) -> list[dict]:
    return [{"task": task, "seed": seed, "fraction": fraction, "captions_per_image": 5, "iteration": 4,
             "images_seen": 32, "eval_task": "leftmost_color", "metric": "top1", "value": v, "seconds": 1.0,
             "eval_seconds": 0.1} for task, vs in values.items() for seed, v in enumerate(vs)]


def test_markdown_says_which_differences_exceed_the_seed_spread(tmp_path):
    rows = _rows({"bicaptioning": [50.0, 52.0, 54.0], "token_classification": [40.0, 41.0, 42.0],
                  "captioning": [49.0, 53.0, 57.0]})
    md = markdown(rows)
    assert "| bicaptioning | 52.0 ± 2.0 |" in md and "| token_classification | 41.0 ± 1.0 |" in md
    assert "bicaptioning > token_classification (+11.0, spread 3.0)" in md
    assert "; captioning > token_classification (+12.0, spread 5.0)" in md and "bicaptioning > captioning" not in md
    one_seed = markdown(_rows({"a": [1.0], "b": [9.0]}))
    assert "| a | 1.0 |" in one_seed and "One seed" in one_seed
    write_outputs(rows + _rows({"bicaptioning": [30.0, 31.0, 29.0]}, fraction=0.1), tmp_path)
    assert (tmp_path / "ablation_data.png").stat().st_size > 0 and (tmp_path / "ablation.png").is_file()
    assert "| bicaptioning | 0.1 | 5 | 30.0 ± 1.0 |" in Path(tmp_path / "ablation.md").read_text()


def test_bad_arguments_are_one_line(tmp_path, capsys):
    assert main(["ablate", "--tasks", "bicaptioning,telepathy", "--output", str(tmp_path)]) == 2
    assert "telepathy" in capsys.readouterr().err
    assert main(["ablate", "--tasks", "bicaptioning", "--seeds", "0", "--output", str(tmp_path)]) == 2
    assert "--seeds" in capsys.readouterr().err
    assert main(["ablate", "--tasks", "bicaptioning:hidden=63", "--output", str(tmp_path / "x")]) == 2
    assert "hidden" in capsys.readouterr().err and not (tmp_path / "x").exists()  # checked before any work


def test_images_seen_ticks_are_short(tmp_path, monkeypatch):
    from capvis.demo import ablate_report

    assert [ablate_report.short_count(x) for x in (0, 500, 48000, 192000, 1_500_000)] == ["0", "500", "48k", "192k",
                                                                                          "1.5M"]
    figures = []
    monkeypatch.setattr(ablate_report.plt, "close", figures.append)  # keep the figure to read its axes
    rows = [{"task": "bicaptioning", "fraction": "", "captions_per_image": "", "seed": 0, "images_seen": n,
             "eval_task": "shape", "metric": "mAP", "value": v} for n, v in ((48000, 60.0), (96000, 70.0), (192000, 80.0))]
    ablate_report.plot_curves(rows, tmp_path / "a.png")
    axis = figures[0].axes[0].xaxis
    assert axis.get_major_formatter()(96000, 0) == "96k" and len(axis.get_major_locator()()) <= 6
