"""Atomic checkpoint writes, checksums, pruning and fallback to the previous good file."""

from __future__ import annotations

import pytest
import torch

from capvis.errors import CheckpointError
from capvis.train import checkpoint as ckpt


def _state(value: float) -> dict:
    return {"model": {"w": torch.full((4,), value)}, "iteration": int(value)}


def test_round_trip_and_sidecar(tmp_path):
    path = ckpt.atomic_save(_state(3.0), ckpt.checkpoint_path(tmp_path, 3))
    assert path.name == "checkpoint_00000003.pt"
    assert (tmp_path / "checkpoint_00000003.pt.sha256").is_file()
    assert torch.equal(ckpt.load_checkpoint(path)["model"]["w"], torch.full((4,), 3.0))
    assert not list(tmp_path.glob("*.tmp"))


def test_corrupt_newest_falls_back_to_previous(tmp_path, caplog):
    ckpt.atomic_save(_state(1.0), ckpt.checkpoint_path(tmp_path, 1))
    newest = ckpt.atomic_save(_state(2.0), ckpt.checkpoint_path(tmp_path, 2))
    data = newest.read_bytes()
    newest.write_bytes(data[: len(data) // 2])  # truncated by a crash outside capvis
    with pytest.raises(CheckpointError, match="corrupt"):
        ckpt.load_checkpoint(newest)
    path, state = ckpt.latest_valid_checkpoint(tmp_path)
    assert path.name == "checkpoint_00000001.pt" and state["iteration"] == 1
    assert "checkpoint_00000002.pt" in caplog.text


def test_prune_keeps_last_k(tmp_path):
    for i in range(1, 6):
        ckpt.atomic_save(_state(float(i)), ckpt.checkpoint_path(tmp_path, i))
    ckpt.prune_checkpoints(tmp_path, keep=2)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["checkpoint_00000004.pt", "checkpoint_00000005.pt"]
    assert len(list(tmp_path.glob("*.sha256"))) == 2


def test_missing_checkpoint_names_the_path(tmp_path):
    with pytest.raises(CheckpointError, match="nope.pt"):
        ckpt.load_checkpoint(tmp_path / "nope.pt")
