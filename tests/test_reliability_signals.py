"""Pre-emption with real processes: SIGTERM checkpoints and exits 0, SIGKILL loses at most the
iterations since the last periodic checkpoint, and ``--resume auto`` reproduces the uninterrupted
loss curve bit for bit."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from capvis.config import load_config
from capvis.train import checkpoint as ckpt
from capvis.train.loop import Trainer, read_metrics
from capvis.train.distributed import DistInfo
from capvis.train.signals import StopRequest

CAPVIS = Path(sys.executable).with_name("capvis")
ITERATIONS, EVERY = 10, 3
TINY = ["model.backbone=resnet18", "model.small_stem=true", "data.image_size=16", "model.textual.hidden=64",
        "train.batch_size=2", "data.num_workers=0", "train.log_every=1", "train.warmup=2",
        "train.channels_last=false", "data.val=", f"train.iterations={ITERATIONS}",
        f"train.checkpoint_every={EVERY}", "train.optimizer=adamw", "train.lr_backbone=0.002",
        "train.lr_textual=0.002"]


def _overrides(coco: Path, vocab: Path) -> list[str]:
    return [f"data.train={coco}", f"data.vocab={vocab}", *TINY]


def _start(output: Path, overrides: list[str], *, resume: bool = False) -> subprocess.Popen:
    cmd = [str(CAPVIS), "pretrain", "--config", "bicaptioning_R_50_L1_H2048", "--output", str(output),
           "--no-progress", *(["--resume", "auto"] if resume else []), *overrides]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _logged(output: Path) -> int:
    """The last iteration in metrics.jsonl (0 if none yet)."""
    path = output / "metrics.jsonl"
    if not path.is_file():
        return 0
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]
    return max((r["iteration"] for r in rows), default=0)


def _wait_for(proc: subprocess.Popen, output: Path, iteration: int, timeout: float = 90.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"run ended (rc {proc.returncode}) before iteration {iteration}:\n"
                                 f"{proc.stderr.read()}")
        done = _logged(output)
        if done >= iteration:
            return done
        time.sleep(0.02)
    proc.kill()
    raise AssertionError(f"no iteration {iteration} within {timeout} s")


def _losses(output: Path) -> dict[int, float]:
    """iteration -> loss; an iteration logged twice (recomputed after a resume) must agree with itself."""
    losses: dict[int, float] = {}
    for row in read_metrics(output):
        if "loss" in row:
            it = row["iteration"]
            assert losses.get(it, row["loss"]) == row["loss"], f"iteration {it} differs after resume"
            losses[it] = row["loss"]
    return losses


@pytest.mark.skipif(not CAPVIS.is_file(), reason="console script not installed")
def test_sigterm_then_sigkill_then_resume_match_uninterrupted(tmp_path, coco_fixture, coco_tokenizer_path):
    overrides = _overrides(coco_fixture, coco_tokenizer_path)
    out = tmp_path / "preempted"

    # 1. SIGTERM mid-run: checkpoint at the current iteration, exit 0, say so.
    proc = _start(out, overrides)
    _wait_for(proc, out, 2)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr
    assert "SIGTERM received: stopped early at iteration" in stderr
    stopped = int(ckpt.CHECKPOINT_RE.search(ckpt.list_checkpoints(out / "checkpoints")[-1].name).group(1))
    assert 2 <= stopped < ITERATIONS and _logged(out) == stopped  # nothing ran past the checkpoint
    assert f"stopped early (resume with --resume) at iteration {stopped}" in stdout

    # 2. Resume, then SIGKILL past the next periodic checkpoint: only the iterations after it are lost.
    proc = _start(out, overrides, resume=True)
    killed_at = _wait_for(proc, out, (stopped // EVERY + 1) * EVERY + 1)
    proc.kill()
    proc.communicate(timeout=30)
    if killed_at >= ITERATIONS:
        pytest.skip("machine too slow to kill the run before its end")
    latest = ckpt.latest_valid_checkpoint(out / "checkpoints")[1]["iteration"]
    assert latest == killed_at // EVERY * EVERY or latest == killed_at  # killed right after a save

    # 3. Resume to the end.
    proc = _start(out, overrides, resume=True)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    assert f"resumed from {ckpt.checkpoint_path(out / 'checkpoints', latest)}" in stderr

    # The uninterrupted reference, through the same command in a process of its own: what is compared is
    # the run, not whatever torch settings (thread count: reduction order) this pytest process has
    straight = tmp_path / "straight"
    proc = _start(straight, overrides)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    expected, got = _losses(straight), _losses(out)
    assert list(got) == list(range(1, ITERATIONS + 1))
    assert got == expected  # identical data order and loss curve
    assert ckpt.load_checkpoint(ckpt.checkpoint_path(out / "checkpoints", ITERATIONS))["iteration"] == ITERATIONS


def test_stop_request_flag_second_signal_and_restore():
    # a shell may start the test run with SIGINT ignored (background jobs): make it Python's default here
    original = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        previous = signal.getsignal(signal.SIGTERM)
        with StopRequest(DistInfo()) as stop:
            assert not stop.requested() and stop.signal_name == "stop request"
            os.kill(os.getpid(), signal.SIGINT)  # first signal: only a flag, no KeyboardInterrupt
            assert stop.requested() and stop.signal_name == "SIGINT"
            with pytest.raises(KeyboardInterrupt):  # second: stop now
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.1)
        assert signal.getsignal(signal.SIGTERM) is previous
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, original)


def test_stop_request_in_process_checkpoints_and_reports(tmp_path, coco_fixture, coco_tokenizer_path, monkeypatch):
    """A stop request between checkpoints writes one at that iteration and returns ``stopped_early``."""
    cfg = load_config("bicaptioning_R_50_L1_H2048", _overrides(coco_fixture, coco_tokenizer_path))
    trainer = Trainer(cfg, tmp_path / "run", progress=False)
    monkeypatch.setattr(StopRequest, "requested", lambda self: _logged(tmp_path / "run") >= 2)
    summary = trainer.run()
    assert summary["stopped_early"] and summary["iteration"] == 2
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "run" / "checkpoints")] == ["checkpoint_00000002.pt"]


@pytest.mark.skipif(not CAPVIS.is_file(), reason="console script not installed")
def test_sigterm_to_the_process_group_with_loader_workers(tmp_path, coco_fixture, coco_tokenizer_path):
    """A scheduler signals the whole process group: loader workers must not die before the main
    process has written its checkpoint."""
    out = tmp_path / "group"
    overrides = [*_overrides(coco_fixture, coco_tokenizer_path), "data.num_workers=2"]
    cmd = [str(CAPVIS), "pretrain", "--config", "bicaptioning_R_50_L1_H2048", "--output", str(out),
           "--no-progress", *overrides]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    _wait_for(proc, out, 2)
    os.killpg(proc.pid, signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr[-2000:]
    assert "stopped early" in stdout
    stopped = int(ckpt.CHECKPOINT_RE.search(ckpt.list_checkpoints(out / "checkpoints")[-1].name).group(1))
    assert stopped == _logged(out) >= 2
