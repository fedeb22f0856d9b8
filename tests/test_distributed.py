"""Two gloo processes with per-process batch b make the same update as one process with batch 2b.

Batch norm would differ (statistics per process, as in the paper), so the backbone uses GroupNorm
here; dropout is off and every caption has the same length, so the mean of the two per-process
losses equals the loss of the whole batch.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
import torch

from capvis.train import checkpoint as ckpt
from capvis.train.loop import read_metrics

from conftest import write_coco

SAME_LENGTH = [["a dog runs on the grass."]] * 4  # four different images, one caption length


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pretrain_args(coco, vocab, out):
    return ["pretrain", "--config", "bicaptioning_R_50_L1_H2048", "--output", str(out), "--no-progress",
            f"data.train={coco}", "data.val=", f"data.vocab={vocab}", "model.backbone=resnet18",
            "model.small_stem=true", "model.visual_norm=group", "data.image_size=32", "model.textual.hidden=64",
            "model.textual.dropout=0", "train.batch_size=4", "data.num_workers=0", "train.iterations=3",
            "train.warmup=1", "train.log_every=1", "train.checkpoint_every=3", "train.channels_last=false",
            "train.device=cpu"]


@pytest.mark.slow
def test_two_gloo_processes_match_one_process(tmp_path, coco_tokenizer_path):
    coco = write_coco(tmp_path / "coco", captions=SAME_LENGTH)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.getcwd()}
    single, double = tmp_path / "single", tmp_path / "double"
    subprocess.run([sys.executable, "-m", "capvis.cli", *pretrain_args(coco, coco_tokenizer_path, single)],
                   check=True, env=env, capture_output=True, timeout=300)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                           "--master-port", str(free_port()), "-m", "capvis.cli",
                           *pretrain_args(coco, coco_tokenizer_path, double)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a = [r["loss"] for r in read_metrics(single)]
    b = [r["loss"] for r in read_metrics(double)]
    assert len(a) == len(b) == 3
    assert b == pytest.approx(a, rel=1e-4, abs=1e-5)
    wa = ckpt.load_checkpoint(single / "checkpoints" / "checkpoint_00000003.pt")["model"]
    wb = ckpt.load_checkpoint(double / "checkpoints" / "checkpoint_00000003.pt")["model"]
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], rtol=1e-4, atol=1e-5, msg=key)


def test_stop_flag_is_agreed_every_n_steps_not_every_step(monkeypatch):
    """Under DDP the stop flag's all-reduce (a host sync) runs every ``every`` steps only."""
    import torch.distributed as dist

    from capvis.train.distributed import DistInfo
    from capvis.train.signals import StopRequest

    reduced = []
    monkeypatch.setattr(dist, "all_reduce", lambda t, op=None: reduced.append(float(t)))
    stop = StopRequest(DistInfo(rank=0, world_size=2), every=3)
    stop.request()
    assert [stop.requested() for _ in range(6)] == [False, False, True, False, False, True]
    assert reduced == [1.0, 1.0]


def test_one_device_rule_for_training_and_commands() -> None:
    """train.device and every command's --device resolve by one function; errors name the option."""
    from capvis.errors import ConfigError
    from capvis.eval.common import resolve_device as command_device
    from capvis.train.distributed import resolve_device

    cuda = torch.cuda.is_available()
    assert resolve_device("auto") == command_device("auto") == (torch.device("cuda", 0) if cuda else torch.device("cpu"))
    assert resolve_device("cpu") == command_device("cpu") == torch.device("cpu")
    with pytest.raises(ConfigError, match=r"unknown --device 'gpu'"):
        command_device("gpu")
    with pytest.raises(ConfigError, match=r"unknown train.device 'tpu0'"):
        resolve_device("tpu0", option="train.device")
    if not cuda:
        with pytest.raises(ConfigError, match=r"train.device=cuda but no CUDA device"):
            resolve_device("cuda", 1, option="train.device")
        with pytest.raises(ConfigError, match=r"--device=cuda:1 but no CUDA device"):
            command_device("cuda:1")
    else:
        assert resolve_device("cuda", 1) == torch.device("cuda", 1)
