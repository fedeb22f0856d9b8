"""Config and CLI faults fail before any work, with exit status 2 and one line on stderr naming the
culprit (key, value or path)."""

from __future__ import annotations

import json

import pytest

from capvis.cli import main

BASE = ["model.backbone=resnet18", "model.small_stem=true", "data.image_size=16", "model.textual.hidden=64",
        "train.batch_size=4", "data.num_workers=0", "data.val="]


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("capvis: error: ")
    return err


@pytest.mark.parametrize(("override", "expected"), [
    ("model.textual.hiden=64", "unknown config key 'model.textual.hiden' (did you mean 'model.textual.hidden'?)"),
    ("nonsense.key=1", "unknown config key 'nonsense'"),
    ("train.iterations=many", "config key 'train.iterations' must be int, got 'many'"),
    ("train.lookahead=maybe", "config key 'train.lookahead' must be bool"),
    ("data.crop_scale=[0.5]", "config key 'data.crop_scale' must be a list of 2 values"),
    ("train.optimizer=adam", "config key 'train.optimizer' must be one of sgd, adamw"),
    ("model.textual.hidden=100", "model.textual.hidden=100 must be a positive multiple of 64"),
    ("train.warmup=-1", "train.warmup=-1 must lie in [0, train.iterations="),
    ("train", "override 'train' is not of the form key=value"),
])
def test_bad_config_is_one_line_before_any_work(tmp_path, capsys, override, expected):
    out = tmp_path / "run"
    code = main(["pretrain", "--config", "bicaptioning_R_50_L1_H2048", "--output", str(out), *BASE, override])
    assert code == 2 and expected in _one_line_error(capsys)
    assert not out.exists()


def test_summary_and_vocab_fail_in_one_line(tmp_path, capsys):
    assert main(["summary", "--config", "bicaptioning_R_50_L1_H2048", "train.bach_size=4"]) == 2
    assert "unknown config key 'train.bach_size'" in _one_line_error(capsys)
    assert main(["summary", "--config", str(tmp_path / "nope.yaml")]) == 2
    assert "nope.yaml" in _one_line_error(capsys)
    assert main(["vocab", "--captions", str(tmp_path / "absent.jsonl"), "--output", str(tmp_path / "v")]) == 2
    assert "absent.jsonl" in _one_line_error(capsys)
    bad = tmp_path / "caps.json"
    bad.write_text('{"images": [],\n "annotations": [,]}')
    assert main(["vocab", "--captions", str(bad), "--output", str(tmp_path / "v")]) == 2
    assert "caps.json: line 2, column" in _one_line_error(capsys)


def test_malformed_yaml_names_line(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("train:\n  iterations: 5\n  batch_size: [4\n")
    assert main(["summary", "--config", str(config)]) == 2
    assert "c.yaml: line" in _one_line_error(capsys)


def test_batch_not_divisible_by_world_size_fails_before_process_group(tmp_path, capsys, monkeypatch,
                                                                       coco_fixture, coco_tokenizer_path):
    monkeypatch.setenv("WORLD_SIZE", "3")  # a process group would wait forever for ranks 1 and 2
    out = tmp_path / "run"
    code = main(["pretrain", "--config", "bicaptioning_R_50_L1_H2048", "--output", str(out), *BASE,
                 f"data.train={coco_fixture}", f"data.vocab={coco_tokenizer_path}"])
    assert code == 2 and "train.batch_size=4 is not divisible by the 3 processes" in _one_line_error(capsys)
    assert not out.exists()


@pytest.mark.parametrize("what", ["vocab", "annotations", "images_dir", "coco_images_dir", "checkpoint",
                                  "malformed_annotations"])
def test_missing_inputs_name_the_path(tmp_path, capsys, coco_fixture, coco_tokenizer_path, what):
    out = tmp_path / "run"
    args = {"train": f"data.train={coco_fixture}", "vocab": f"data.vocab={coco_tokenizer_path}"}
    extra, missing = [], tmp_path / "missing" / "thing"
    if what == "vocab":
        args["vocab"] = f"data.vocab={missing}"
    elif what == "annotations":
        args["train"] = f"data.train={missing}.json"
    elif what == "images_dir":
        extra = [f"data.train_images={missing}"]
    elif what == "coco_images_dir":  # COCO layout, but the train2017 folder is gone
        (coco_fixture.parent.parent / "train2017").rename(tmp_path / "elsewhere")
        missing = coco_fixture.parent.parent / "train2017"
    elif what == "checkpoint":
        extra = ["--resume", f"{missing}.pt"]
    else:
        broken = tmp_path / "captions_train2017.json"
        broken.write_text(json.dumps({"images": [], "annotations": []})[:-2] + ",,}")
        args["train"], missing = f"data.train={broken}", broken
    code = main(["pretrain", "--config", "bicaptioning_R_50_L1_H2048", "--output", str(out), *extra, *BASE,
                 *args.values()])
    err = _one_line_error(capsys)
    assert code == 2 and str(missing) in err, err
    if what == "malformed_annotations":
        assert "line 1, column" in err
