"""Checkpoint faults: a corrupt newest checkpoint falls back to the previous one end to end; a full,
size-limited or read-only disk leaves earlier checkpoints intact and says so; the loop keeps
training past a failed periodic save but fails on a failed final one."""

from __future__ import annotations

import errno
import logging
import os
import resource
import shutil
import signal
import subprocess

import pytest
import torch
from conftest import write_coco

from capvis.cli import main
from capvis.config import load_config
from capvis.errors import CheckpointError
from capvis import storage as ckpt  # atomic writes and checked loads (capvis.train.checkpoint re-exports them)
from capvis.train import checkpoint as train_checkpoint  # what the training loop calls
from capvis.train.loop import Trainer, read_metrics

TINY = ["model.backbone=resnet18", "model.small_stem=true", "data.image_size=16", "model.textual.hidden=64",
        "train.batch_size=2", "data.num_workers=0", "train.log_every=1", "train.warmup=0",
        "train.channels_last=false", "data.val="]


def _overrides(coco, vocab, *extra):
    return [f"data.train={coco}", f"data.vocab={vocab}", *TINY, *extra]


def _state(value: float, numel: int = 4) -> dict:
    return {"model": {"w": torch.full((numel,), value)}, "iteration": int(value)}


@pytest.fixture(scope="module")
def two_iterations(tmp_path_factory, coco_tokenizer_path):
    """A run stopped after iteration 2 (checkpoint_00000002.pt), copied by each test that damages it."""
    root = tmp_path_factory.mktemp("two")
    overrides = _overrides(write_coco(root / "coco"), coco_tokenizer_path, "train.iterations=3",
                           "train.checkpoint_every=2")
    Trainer(load_config("bicaptioning_R_50_L1_H2048", overrides), root / "run", progress=False).run(until=2)
    return root / "run", overrides


@pytest.mark.parametrize("damage", ["flip_byte", "truncate_no_sidecar"])  # truncation + sidecar: test_checkpoint
def test_cli_resume_auto_skips_corrupt_newest(tmp_path, two_iterations, capsys, caplog, damage):
    out, overrides = tmp_path / "run", two_iterations[1]
    shutil.copytree(two_iterations[0], out)
    newest = ckpt.atomic_save(ckpt.load_checkpoint(out / "checkpoints" / "checkpoint_00000002.pt") | {"iteration": 3},
                              ckpt.checkpoint_path(out / "checkpoints", 3))
    data = bytearray(newest.read_bytes())
    if damage == "flip_byte":
        data[len(data) // 2] ^= 0xFF
        newest.write_bytes(bytes(data))
    else:
        newest.write_bytes(bytes(data[: len(data) // 2]))
        if damage == "truncate_no_sidecar":
            newest.with_name(newest.name + ".sha256").unlink()
    with caplog.at_level(logging.INFO):
        code = main(["pretrain", "--config", "bicaptioning_R_50_L1_H2048", "--output", str(out), "--no-progress",
                     "--resume", "auto", *overrides])
    assert code == 0, capsys.readouterr().err
    reason = "cannot be read" if damage == "truncate_no_sidecar" else "corrupt (checksum mismatch)"
    assert f"checkpoint_00000003.pt is {reason}" in caplog.text or f"checkpoint_00000003.pt {reason}" in caplog.text
    assert "falling back to the previous checkpoint" in caplog.text
    assert "resumed from " in caplog.text and "checkpoint_00000002.pt at iteration 2" in caplog.text
    assert [r["iteration"] for r in read_metrics(out) if "loss" in r] == [1, 2, 3]  # iteration 3 redone
    assert ckpt.load_checkpoint(newest)["iteration"] == 3  # and rewritten, valid this time


def test_enospc_during_write_keeps_previous_checkpoint(tmp_path, monkeypatch):
    first = ckpt.atomic_save(_state(1.0), ckpt.checkpoint_path(tmp_path, 1))

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(ckpt.os, "fsync", full)
    with pytest.raises(CheckpointError) as info:
        ckpt.atomic_save(_state(2.0), ckpt.checkpoint_path(tmp_path, 2))
    monkeypatch.undo()
    assert "No space left on device" in str(info.value)
    assert "checkpoint_00000001.pt is intact" in str(info.value)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == [first.name]
    assert ckpt.latest_valid_checkpoint(tmp_path)[1]["iteration"] == 1
    assert not list(tmp_path.glob(".*.tmp"))


def test_sidecar_failure_removes_the_unverifiable_checkpoint(tmp_path, monkeypatch):
    ckpt.atomic_save(_state(1.0), ckpt.checkpoint_path(tmp_path, 1))
    real = ckpt.atomic_write_bytes

    def sidecar_fails(data, path):
        if path.name.endswith(".sha256"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(data, path)

    monkeypatch.setattr(ckpt, "atomic_write_bytes", sidecar_fails)
    with pytest.raises(CheckpointError, match="checkpoint_00000001.pt is intact"):
        ckpt.atomic_save(_state(2.0), ckpt.checkpoint_path(tmp_path, 2))
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["checkpoint_00000001.pt"]


def test_real_file_size_limit_keeps_previous_checkpoint(tmp_path):
    """RLIMIT_FSIZE makes the kernel refuse writes past a size (EFBIG): a real, unprivileged full disk."""
    ckpt.atomic_save(_state(1.0), ckpt.checkpoint_path(tmp_path, 1))
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, hard))
    try:
        with pytest.raises(CheckpointError) as info:
            ckpt.atomic_save(_state(2.0, numel=100_000), ckpt.checkpoint_path(tmp_path, 2))
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old_handler)
    assert "File too large" in str(info.value) and "checkpoint_00000001.pt is intact" in str(info.value)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["checkpoint_00000001.pt"]
    assert ckpt.load_checkpoint(tmp_path / "checkpoint_00000001.pt")["iteration"] == 1
    assert not list(tmp_path.glob(".*.tmp"))


def test_small_tmpfs_keeps_previous_checkpoint(tmp_path):
    """A real 1 MiB filesystem (needs root and mount permission; skipped elsewhere)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)],
                                           capture_output=True).returncode != 0:
        pytest.skip("cannot mount a size-limited tmpfs here")
    try:
        ckpt.atomic_save(_state(1.0, numel=100_000), ckpt.checkpoint_path(mnt, 1))  # 400 KB
        with pytest.raises(CheckpointError, match="No space left on device.*checkpoint_00000001.pt is intact"):
            ckpt.atomic_save(_state(2.0, numel=200_000), ckpt.checkpoint_path(mnt, 2))  # 800 KB: does not fit
        assert [p.name for p in ckpt.list_checkpoints(mnt)] == ["checkpoint_00000001.pt"]
        assert ckpt.load_checkpoint(mnt / "checkpoint_00000001.pt")["iteration"] == 1
        assert not list(mnt.glob(".*.tmp"))
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_read_only_directory(tmp_path):
    ckpt.atomic_save(_state(1.0), ckpt.checkpoint_path(tmp_path, 1))
    tmp_path.chmod(0o500)
    try:
        with pytest.raises(CheckpointError, match="Permission denied.*checkpoint_00000001.pt is intact"):
            ckpt.atomic_save(_state(2.0), ckpt.checkpoint_path(tmp_path, 2))
    finally:
        tmp_path.chmod(0o700)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["checkpoint_00000001.pt"]


def test_loop_survives_failed_periodic_save_but_not_final(tmp_path, coco_fixture, coco_tokenizer_path, monkeypatch,
                                                          caplog):
    cfg = load_config("bicaptioning_R_50_L1_H2048", _overrides(coco_fixture, coco_tokenizer_path, "train.iterations=4",
                                                               "train.checkpoint_every=1", "train.keep_checkpoints=1"))
    real, failing = ckpt.atomic_save, {3, 4}

    def flaky(state, path):
        if state["iteration"] in failing:
            failing.discard(state["iteration"])
            raise ckpt._write_error(path, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
        return real(state, path)

    monkeypatch.setattr(train_checkpoint, "atomic_save", flaky)
    out = tmp_path / "run"
    with caplog.at_level(logging.WARNING), pytest.raises(CheckpointError) as info:
        Trainer(cfg, out, progress=False).run()
    # iteration 3: warned, training went on; iteration 4 (the end): an error
    assert "checkpoint_00000003.pt: No space left on device" in caplog.text
    assert "training continues and retries at the next checkpoint" in caplog.text
    assert "checkpoint_00000004.pt" in str(info.value) and "checkpoint_00000002.pt is intact" in str(info.value)
    assert max(r["iteration"] for r in read_metrics(out)) == 4
    assert [p.name for p in ckpt.list_checkpoints(out / "checkpoints")] == ["checkpoint_00000002.pt"]
    # the disk has room again: resuming redoes 3 and 4 and writes the final checkpoint (keeping only 1)
    Trainer(cfg, out, resume="auto", progress=False).run()
    assert [p.name for p in ckpt.list_checkpoints(out / "checkpoints")] == ["checkpoint_00000004.pt"]
