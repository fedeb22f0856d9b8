"""Nothing loaded from a checkpoint runs code: every way capvis reads a training checkpoint
(``capvis.load``, ``--checkpoint`` of every command, ``--resume PATH``, torch.hub) refuses a pickle
that carries a call, in one line that names the file, before the call can run; and every
checkpoint capvis writes, and those of the previous version, load with ``weights_only=True``."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import capvis
from capvis.cli import main
from capvis.config import load_config
from capvis.data.labels import write_label_file
from capvis.errors import CheckpointError
from capvis.train import checkpoint as ckpt
from capvis.train.loop import Trainer

REPO = Path(__file__).resolve().parents[1]
TINY = ["model.backbone=resnet18", "model.small_stem=true", "data.image_size=16", "model.textual.hidden=64",
        "train.batch_size=2", "data.num_workers=0", "train.warmup=1", "train.channels_last=false", "data.val="]


def _run_overrides(coco: Path, vocab: Path, iterations: int = 2) -> list[str]:
    return [f"data.train={coco}", f"data.vocab={vocab}", *TINY, f"train.iterations={iterations}",
            f"train.checkpoint_every={iterations}"]


class _Payload:
    """Unpickling this calls ``os.system`` (what a malicious checkpoint does)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture
def evil(tmp_path: Path) -> tuple[Path, Path]:
    """A checkpoint-shaped file whose pickle would create ``marker`` when loaded unsafely."""
    marker = tmp_path / "payload_ran"
    path = tmp_path / "evil" / "checkpoint_00000002.pt"
    path.parent.mkdir()
    torch.save({"model": {}, "iteration": 2, "config": _Payload(marker)}, path)
    return path, marker


def _refused(capsys, code: int, path: Path, marker: Path) -> None:
    err = capsys.readouterr().err.strip()
    assert not marker.exists(), "the payload ran"
    assert code == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert f"checkpoint {path} refused" in err and "system" in err, err


def test_capvis_load_refuses_a_pickle_payload(evil):
    path, marker = evil
    with pytest.raises(CheckpointError, match="refused") as info:
        capvis.load(path)
    assert not marker.exists() and "\n" not in str(info.value)
    with pytest.raises(CheckpointError, match="no valid checkpoint"):  # a run directory: skipped, with a warning
        capvis.load(path.parent)
    assert not marker.exists()


def _inputs(tmp_path: Path) -> dict[str, str]:
    """Small but valid inputs, so each command gets as far as reading the checkpoint."""
    images = tmp_path / "images"
    for klass in ("a", "b"):
        (images / klass).mkdir(parents=True)
        for k in range(2):
            Image.fromarray(np.full((20, 20, 3), 40 * k, np.uint8)).save(images / klass / f"{k}.jpg")
    files = sorted(str(p.relative_to(images)) for p in images.rglob("*.jpg"))
    labels = write_label_file(tmp_path / "labels.json", {"shape": ["a", "b"]},
                              [{"image": f, "labels": {"shape": [i % 2]}} for i, f in enumerate(files)])
    caps = tmp_path / "caps.jsonl"
    caps.write_text("".join(json.dumps({"image": str(images / f), "caption": "a thing"}) + "\n" for f in files))
    return {"images": str(images), "labels": str(labels), "captions": str(caps)}


COMMANDS = {
    "caption": lambda c, i, o: ["caption", "--checkpoint", c, i["images"] + "/a"],
    "score": lambda c, i, o: ["score", "--checkpoint", c, "--annotations", i["captions"]],
    "export": lambda c, i, o: ["export", "--checkpoint", c, "--output", o],
    "release": lambda c, i, o: ["release", "--checkpoint", c, "--output", o],
    "features": lambda c, i, o: ["features", "--checkpoint", c, "--images", i["images"], "--output", o + ".npy"],
    "eval svm": lambda c, i, o: ["eval", "svm", "--checkpoint", c, "--train", i["labels"], "--test", i["labels"],
                                 "--images-train", i["images"]],
    "eval linear": lambda c, i, o: ["eval", "linear", "--checkpoint", c, "--train", i["images"], "--val", i["images"]],
    "eval captioning": lambda c, i, o: ["eval", "captioning", "--checkpoint", c, "--annotations", i["captions"]],
    "eval zeroshot": lambda c, i, o: ["eval", "zeroshot", "--checkpoint", c, "--labels", i["labels"], "--task",
                                      "shape", "--images", i["images"]],
    "finetune classify": lambda c, i, o: ["finetune", "classify", "--checkpoint", c, "--train", i["images"],
                                          "--val", i["images"], "--output", o + ".pt"],
    "finetune caption": lambda c, i, o: ["finetune", "caption", "--checkpoint", c, "--train", i["captions"],
                                         "--output", o],
}


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_checkpoint_command_refuses_a_pickle_payload(command, evil, tmp_path, capsys):
    path, marker = evil
    argv = COMMANDS[command](str(path), _inputs(tmp_path), str(tmp_path / "out"))
    _refused(capsys, main(argv), path, marker)


def test_resume_path_refuses_a_pickle_payload(evil, tmp_path, capsys, coco_fixture, coco_tokenizer_path):
    path, marker = evil
    code = main(["pretrain", "--config", "bicaptioning_R_50_L1_H2048", "--output", str(tmp_path / "run"),
                 "--no-progress", "--resume", str(path), *_run_overrides(coco_fixture, coco_tokenizer_path)])
    _refused(capsys, code, path, marker)


def test_torch_hub_refuses_a_pickle_payload(evil):
    path, marker = evil
    with pytest.raises(CheckpointError, match="refused"):
        torch.hub.load(str(REPO), "bicaptioning_r50_l1_h2048", source="local", weights=str(path))
    assert not marker.exists()


def test_random_bytes_are_not_a_checkpoint(tmp_path):
    path = tmp_path / "noise.pt"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(CheckpointError, match="cannot be read") as info:
        ckpt.load_checkpoint(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def _trained(tmp_path: Path, coco: Path, vocab: Path) -> Path:
    cfg = load_config("bicaptioning_R_50_L1_H2048", _run_overrides(coco, vocab))
    Trainer(cfg, tmp_path / "run", progress=False).run()
    return ckpt.checkpoint_path(tmp_path / "run" / "checkpoints", 2)


def test_written_checkpoints_hold_only_safe_types(tmp_path, coco_fixture, coco_tokenizer_path):
    path = _trained(tmp_path, coco_fixture, coco_tokenizer_path)
    assert torch.serialization.get_unsafe_globals_in_checkpoint(str(path)) == []
    state = torch.load(path, weights_only=True)  # plain PyTorch, no allow-list
    assert state["iteration"] == 2 and isinstance(state["vocab"], bytes)


def test_rng_state_round_trips_through_its_tensor_form():
    np.random.seed(7)
    saved = ckpt.rng_state()
    buffer = io.BytesIO()
    torch.save(saved, buffer)
    expected = (np.random.random(3), torch.rand(3))
    np.random.seed(1), torch.manual_seed(1)
    ckpt.set_rng_state(torch.load(io.BytesIO(buffer.getvalue()), weights_only=True))
    assert np.array_equal(np.random.random(3), expected[0]) and torch.equal(torch.rand(3), expected[1])


def test_checkpoints_of_the_previous_version_still_load_and_resume(tmp_path, coco_fixture, coco_tokenizer_path):
    """capvis 0.1 saved numpy's RNG state as an ndarray tuple: it loads through a numpy-only allow-list."""
    path = _trained(tmp_path, coco_fixture, coco_tokenizer_path)
    state = torch.load(path, weights_only=True)
    np.random.seed(3)
    state["rng"]["numpy"] = np.random.get_state()  # the old layout
    old = tmp_path / "old" / "checkpoints" / "checkpoint_00000002.pt"
    old.parent.mkdir(parents=True)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    old.write_bytes(buffer.getvalue())
    assert torch.serialization.get_unsafe_globals_in_checkpoint(str(old))  # really the old, ndarray layout
    loaded = ckpt.load_checkpoint(old)
    ckpt.set_rng_state(loaded["rng"])
    after_old = np.random.random(4)
    np.random.seed(3)
    assert np.array_equal(after_old, np.random.random(4))
    cfg = load_config("bicaptioning_R_50_L1_H2048", _run_overrides(coco_fixture, coco_tokenizer_path, iterations=3))
    summary = Trainer(cfg, tmp_path / "old", resume="auto", progress=False).run()
    assert summary["iteration"] == 3
