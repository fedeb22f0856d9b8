"""Every labels task by the protocol of its kind: the task-type rule, the dispatch, `capvis eval labels`."""

from __future__ import annotations

import json
import math

import numpy as np
from helpers_eval import run_cli, tiny_config, tiny_run, world  # noqa: F401 (fixtures)

from capvis.data.labels import read_label_file, write_label_file
from capvis.eval.downstream import (MULTI_LABEL, SINGLE_LABEL, evaluate_feature_tasks, single_labels,
                                    task_kind)

N_TRAIN, N_TEST, DIM = 120, 60, 16


def _data(seed: int) -> tuple[np.ndarray, list[dict]]:
    """Features that encode a user's two tasks: ``parts`` (multi-label, 4 classes, bits of the features)
    and ``kind`` (single-label, 3 classes; every 7th image has no answer)."""
    rng = np.random.default_rng(seed)
    n = N_TRAIN if seed == 0 else N_TEST
    parts = rng.random((n, 4)) < 0.4
    kind = rng.integers(0, 3, size=n)
    x = rng.normal(scale=0.3, size=(n, DIM))
    x[:, :4] += 3 * parts
    x[np.arange(n), 4 + kind] += 3
    entries = [{"file_name": f"{i}.jpg", "labels": {"parts": np.flatnonzero(parts[i]).tolist(),
                                                   "kind": [] if i % 7 == 3 else [int(kind[i])]}}
               for i in range(n)]
    return x, entries


TASKS = {"parts": ["wheel", "door", "roof", "window"], "kind": ["car", "van", "bus"]}


def _files(tmp_path):
    out = {}
    for split, seed in (("train", 0), ("test", 1)):
        x, entries = _data(seed)
        out[split] = write_label_file(tmp_path / f"labels_{split}.json", TASKS, entries)
        np.save(tmp_path / f"{split}.npy", x.astype(np.float32))
    return out


def test_task_type_rule_reads_the_labels_not_the_names(tmp_path):
    files = _files(tmp_path)
    _, train = read_label_file(files["train"])
    _, test = read_label_file(files["test"])
    assert task_kind("parts", train, test) == MULTI_LABEL
    assert task_kind("kind", train, test) == SINGLE_LABEL  # one class or none per image
    assert single_labels(train, "kind")[3] == -1 and (single_labels(train, "kind") >= 0).sum() == N_TRAIN - 17
    one_double = [dict(e, labels={"kind": [0, 1] if i == 5 else e["labels"]["kind"]}) for i, e in enumerate(test)]
    assert task_kind("kind", train, one_double) == MULTI_LABEL  # a single image with two classes decides


def test_dispatch_scores_each_kind_by_its_protocol(tmp_path):
    files = _files(tmp_path)
    _, train = read_label_file(files["train"])
    _, test = read_label_file(files["test"])
    x_train, x_test = np.load(tmp_path / "train.npy"), np.load(tmp_path / "test.npy")
    rows = evaluate_feature_tasks(x_train, train, x_test, test, TASKS, workers=1)
    assert [(r["eval_task"], r["metric"]) for r in rows] == [("parts", "mAP"), ("kind", "top1")]
    parts, kind = rows
    assert parts["value"] > 95 and parts["protocol"] == "VOC07 SVM" and parts["scored_classes"] == 4
    assert kind["value"] > 95 and kind["protocol"] == "linear probe"
    assert kind["train_rows"] == N_TRAIN - 17 and kind["test_rows"] == N_TEST - 9  # unanswered images left out
    noise = np.random.default_rng(9).normal(size=x_test.shape)
    blind = evaluate_feature_tasks(x_train, train, noise, test, {"kind": TASKS["kind"]})
    assert blind[0]["value"] < 60  # features that carry nothing: near chance (33 %)


def test_eval_labels_cli_on_features_and_on_a_checkpoint(tmp_path, world, tiny_config, capsys):  # noqa: F811
    files = _files(tmp_path)
    res = run_cli(["eval", "labels", "--train", str(files["train"]), "--test", str(files["test"]),
                   "--features-train", str(tmp_path / "train.npy"), "--features-test", str(tmp_path / "test.npy"),
                   "--workers", "1", "--weight-decays", "1e-3,1e-1"], capsys)
    assert res["command"] == "eval labels" and [r["metric"] for r in res["results"]] == ["mAP", "top1"]
    assert res["results"][1]["weight_decay"] in (1e-3, 1e-1)
    labels = world / "annotations"
    res = run_cli(["eval", "labels", "--checkpoint", "random", "--config", str(tiny_config), "--train",
                   str(labels / "labels_train.json"), "--test", str(labels / "labels_test.json"), "--workers", "1",
                   "--loader-workers", "0"], capsys)
    kinds = {r["eval_task"]: r["metric"] for r in res["results"]}
    assert kinds == {"shape": "mAP", "color_shape": "mAP", "count": "top1", "leftmost_color": "top1",
                     "topmost_shape": "top1", "largest_color_shape": "top1"}
    count = next(r for r in res["results"] if r["eval_task"] == "count")
    assert 0 <= count["value"] <= 100 and count["test_rows"] == 16


def test_eval_labels_errors_are_one_line(tmp_path, capsys):
    from capvis.cli import main

    files = _files(tmp_path)
    argv = ["eval", "labels", "--train", str(files["train"]), "--test", str(files["test"])]
    assert main([*argv, "--features-train", str(tmp_path / "train.npy")]) == 2
    assert "--features-test" in capsys.readouterr().err
    assert main([*argv, "--features-train", str(tmp_path / "train.npy"), "--features-test",
                 str(tmp_path / "test.npy"), "--holdout", "1.5"]) == 2
    assert "--holdout" in capsys.readouterr().err
    assert main([*argv, "--features-train", str(tmp_path / "train.npy"), "--features-test",
                 str(tmp_path / "test.npy"), "--tasks", "colour"]) == 2
    assert "colour" in capsys.readouterr().err


def test_unscorable_single_label_task_is_nan_not_an_error(tmp_path):
    x, entries = _data(0)
    empty = [dict(e, labels={"kind": []}) for e in entries]
    rows = evaluate_feature_tasks(x, empty, x, empty, {"kind": TASKS["kind"]})
    assert rows[0]["metric"] == "top1" and math.isnan(rows[0]["value"])
    assert json.dumps(rows[0]["train_rows"]) == "0"
