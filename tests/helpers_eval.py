"""Shared, tiny fixtures for the evaluation tests: a CaptionWorld, a 2-iteration pretraining run, fake
ImageFolder and VOCdevkit trees, and an in-process CLI runner that returns the final JSON line.

Fixtures are built once per test session (cached here, so every test module that imports them
shares one copy) and kept tiny: 64 px images, ResNet-18 (standard stem) at 32 px.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from capvis.cli import main

TINY = ["model.backbone=resnet18", "model.small_stem=false", "data.image_size=32", "model.textual.hidden=64",
        "model.textual.dropout=0", "train.batch_size=4", "data.num_workers=0", "train.log_every=1",
        "train.warmup=0", "train.channels_last=false", "train.lookahead=false"]
WORLD_SPLITS = {"train": 24, "val": 4, "test": 16}

_CACHE: dict[str, Path] = {}


def run_cli(argv: list[str], capsys: pytest.CaptureFixture) -> dict:
    """Run ``capvis ARGV`` in-process; assert success; return the parsed final JSON line of stdout."""
    capsys.readouterr()
    code = main(argv)
    out, err = capsys.readouterr()
    assert code == 0, err
    return json.loads(out.strip().splitlines()[-1])


def _world(factory: pytest.TempPathFactory) -> Path:
    if "world" not in _CACHE:
        from capvis.world import write_world

        root = factory.mktemp("world")
        write_world(root, WORLD_SPLITS, seed=0, image_size=64, workers=1)
        _CACHE["world"] = root
    return _CACHE["world"]


def _run(factory: pytest.TempPathFactory) -> Path:
    if "run" not in _CACHE:
        from capvis.config import load_config
        from capvis.data.annotations import read_caption_texts
        from capvis.data.tokenizer import train_tokenizer
        from capvis.train.loop import Trainer

        world = _world(factory)
        train = world / "annotations" / "captions_train.json"
        vocab = train_tokenizer(read_caption_texts([train]), factory.mktemp("vocab") / "world", vocab_size=64)
        cfg = load_config("bicaptioning_R_50_L1_H2048", [f"data.train={train}", "data.val=", f"data.vocab={vocab}",
                                                          *TINY, "train.iterations=2", "train.checkpoint_every=2"])
        out = factory.mktemp("run")
        Trainer(cfg, out, progress=False).run()
        _CACHE["run"] = out
    return _CACHE["run"]


@pytest.fixture(scope="session")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CaptionWorld folder (64 px; train 24, val 4, test 16 images)."""
    return _world(tmp_path_factory)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Run directory of a 2-iteration bicaptioning pretraining (ResNet-18, 32 px) on ``world``."""
    return _run(tmp_path_factory)


@pytest.fixture(scope="session")
def tiny_config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The config.yaml of ``tiny_run`` (defines the same model for ``--checkpoint random``)."""
    return _run(tmp_path_factory) / "config.yaml"


def _image_folder(factory: pytest.TempPathFactory) -> Path:
    """ImageFolder train/val trees: CaptionWorld images sorted into classes by their object count."""
    if "folder" not in _CACHE:
        from capvis.data.labels import read_label_file

        world = _world(factory)
        root = factory.mktemp("imagefolder")
        for split, target in (("train", "train"), ("test", "val")):
            tasks, entries = read_label_file(world / "annotations" / f"labels_{split}.json")
            for e in entries:
                cls = tasks["count"][e["labels"]["count"][0]]
                (root / target / f"n{cls}").mkdir(parents=True, exist_ok=True)
                shutil.copy(world / split / e["file_name"], root / target / f"n{cls}" / e["file_name"])
        _CACHE["folder"] = root
    return _CACHE["folder"]


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``ROOT/{train,val}/<class>/<image>`` (classes: object count of CaptionWorld images)."""
    return _image_folder(tmp_path_factory)
