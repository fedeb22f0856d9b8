"""The shrunken demo runs end to end and writes a report whose numbers were computed in the run."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

from capvis.cli import main


def test_quick_demo_writes_report(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--output", str(out), "--seed", "3", "model.textual.dropout=0.05"]) == 0
    printed = capsys.readouterr().out
    assert "| bicaptioning |" in printed and "| random init |" in printed
    results = json.loads((out / "results.json").read_text())
    assert results["seed"] == 3 and results["quick"] is True
    assert results["config"]["model"]["textual"]["dropout"] == 0.05  # the command line's override reached training
    # train.precision=auto, resolved and reported (fp32 here: conftest keeps auto at fp32 on AMX CPUs too)
    assert results["config"]["train"]["precision"] == "auto" and results["precision"] == "fp32"
    rows = results["results"]
    assert {r["method"] for r in rows} == {"bicaptioning", "random init"}
    labels = json.loads((out / "world" / "annotations" / "labels_test.json").read_text())
    tasks = {r["task"] for r in rows}
    assert tasks == set(labels["tasks"]) and {"shape", "color_shape", "count"} < tasks  # every task is a column
    metric = {r["task"]: r["metric"] for r in rows}
    assert metric["shape"] == "mAP" and metric["count"] == "top1"  # count: one class per image -> the probe
    assert all(0.0 <= r["value"] <= 100.0 for r in rows if r["value"] == r["value"])
    truth = results["caption_truth"]
    assert truth["captions"] == 8 and 0 <= truth["color_shape_precision"] <= 100
    false_share = sum(truth[f"{k}_mentions"] for k in ("wrong_shape", "wrong_colour", "misbound"))
    if truth["mentions_per_caption"]:  # every false mention is false one way: the shares add up
        assert abs(false_share + truth["color_shape_precision"] - 100) < 0.05
    assert all(c["count"] > 0 for c in results["shape_confusion"])
    for stage in ("world", "vocabulary", "pretrain_bicaptioning", "eval_bicaptioning", "eval_random_init",
                  "caption_truth", "total"):
        assert results["seconds"][stage] >= 0
    for name in ("report.md", "report.html", "loss_curve.png", "captions.png", "attention_0.png",
                 "shape_confusion.png"):
        assert (out / name).stat().st_size > 0, name
    md = (out / "report.md").read_text()
    table_numbers = re.findall(r"\| (\d+\.\d|nan) ", md)
    assert len(table_numbers) == len(rows)  # methods x tasks, as computed in results.json
    assert sorted(float(x) for x in table_numbers if x != "nan") == sorted(
        round(r["value"], 1) for r in rows if r["value"] == r["value"])
    assert "Are the captions true?" in md
    assert "captions.png" in (out / "report.html").read_text()
    assert "6 iterations of batch 8 in fp32 (train.precision=auto)" in md
    assert len(results["captions"]) == 4 and all("caption" in c for c in results["captions"])
    # bench/caption_truth.py on this run: its beam-5 line is the demo's own figure
    bench = _load_bench("caption_truth")
    assert bench.main(["--run", str(out), "--images", "8", "--decoders", "beam5,greedy,rerank3,rerank3_per_token",
                       "--by-size", "2"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert [line["decoder"] for line in lines] == ["beam5", "greedy", "rerank3", "rerank3_per_token"]
    assert {k: lines[0][k] for k in truth} == truth and all(line["captions"] == 8 for line in lines)
    resolved = sum(c["count"] for c in results["shape_confusion"])  # the matrix's mentions, binned by size
    assert sum(row["mentions"] for row in lines[0]["shape_right_by_size"]) == resolved


def _load_bench(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", Path(__file__).parents[1] / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_overrides_win_over_the_sizes(tmp_path):
    from capvis.demo.stages import DemoSizes, demo_config

    sizes = DemoSizes(iterations=300, overrides=("train.warmup=20",))
    cfg = demo_config("demo", tmp_path, tmp_path / "vocab.model", sizes, 0)
    assert (cfg.train.iterations, cfg.train.warmup) == (300, 20)
    cfg = demo_config("demo", tmp_path, tmp_path / "vocab.model", sizes, 0, ("train.iterations=2400", "train.warmup=5"))
    assert (cfg.train.iterations, cfg.train.warmup, cfg.train.seed) == (2400, 5, 0)
