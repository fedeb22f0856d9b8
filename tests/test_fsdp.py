"""``train.strategy=fsdp`` (FSDP2 ``fully_shard``) over two gloo processes: the same losses and weights as
DDP and as one process (with ``train.accumulate=2``), sharded checkpoints that resume exactly on the
same number of processes, and a consolidated checkpoint that ``capvis release`` takes as any other."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import write_coco
from test_distributed import SAME_LENGTH, free_port, pretrain_args

from capvis.config import load_config
from capvis.errors import CheckpointError
from capvis.loading import release_from_checkpoint
from capvis.release import read_release
from capvis.train import checkpoint as ckpt
from capvis.train.fsdp import shard_path
from capvis.train.loop import Trainer, read_metrics

ITERATIONS = ["train.iterations=4", "train.checkpoint_every=2", "train.keep_checkpoints=0"]


def _torchrun(coco, vocab, out, *extra, resume=False):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.getcwd()}
    args = pretrain_args(coco, vocab, out)
    if resume:  # options before the key=value overrides
        args[args.index("--no-progress"):args.index("--no-progress")] = ["--resume", "auto"]
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                           "--master-port", str(free_port()), "-m", "capvis.cli", *args, *ITERATIONS, *extra],
                          env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _losses(run):
    return {r["iteration"]: r["loss"] for r in read_metrics(run) if "loss" in r}


def _weights(run, iteration=4):
    return ckpt.load_checkpoint(ckpt.checkpoint_path(run / "checkpoints", iteration))["model"]


def _close(wa, wb, tol):
    assert wa.keys() == wb.keys()
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], rtol=tol, atol=tol, msg=key)


@pytest.mark.slow
def test_fsdp_matches_ddp_and_one_process_and_resumes(tmp_path, coco_tokenizer_path):
    coco = write_coco(tmp_path / "coco", captions=SAME_LENGTH)
    vocab = coco_tokenizer_path
    single = tmp_path / "single"
    args = pretrain_args(coco, vocab, single)
    overrides = [a for a in args[args.index("--no-progress") + 1:]] + ITERATIONS
    Trainer(load_config("bicaptioning_R_50_L1_H2048", overrides), single, progress=False).run()
    ddp, fsdp = tmp_path / "ddp", tmp_path / "fsdp"
    _torchrun(coco, vocab, ddp, "train.accumulate=2")
    _torchrun(coco, vocab, fsdp, "train.accumulate=2", "train.strategy=fsdp")

    one, replicated, sharded = _losses(single), _losses(ddp), _losses(fsdp)
    assert list(sharded) == [1, 2, 3, 4]
    assert [replicated[i] for i in one] == pytest.approx([one[i] for i in one], rel=1e-4, abs=1e-5)
    assert [sharded[i] for i in one] == pytest.approx([replicated[i] for i in one], rel=1e-4, abs=1e-5)
    _close(_weights(ddp), _weights(single), 1e-4)
    _close(_weights(fsdp), _weights(ddp), 1e-4)  # the consolidated FSDP model is the whole model

    directory = fsdp / "checkpoints"
    for rank in (0, 1):  # each rank's shards: plain local tensors, checksummed, weights_only
        shard = ckpt.load_checkpoint(shard_path(ckpt.checkpoint_path(directory, 2), rank, 2))
        assert shard["rank"] == rank and shard["world_size"] == 2
        assert all(isinstance(v, torch.Tensor) and type(v) is torch.Tensor for v in shard["model"].values())
    main = ckpt.load_checkpoint(ckpt.checkpoint_path(directory, 4))
    assert main["sharded"] == {"strategy": "fsdp", "world_size": 2} and main["optimizer"] is None

    release = release_from_checkpoint(ckpt.checkpoint_path(directory, 4), tmp_path / "release")
    assert read_release(release) is not None

    resumed = tmp_path / "resumed"
    shutil.copytree(fsdp, resumed)
    for path in (resumed / "checkpoints").glob("checkpoint_00000004*"):
        path.unlink()  # as if the run had been stopped after iteration 2
    _torchrun(coco, vocab, resumed, "train.accumulate=2", "train.strategy=fsdp", resume=True)
    assert _losses(resumed) == sharded  # bit-identical after the resume
    wa, wb = _weights(fsdp), _weights(resumed)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)

    # one process cannot continue a two-process sharded run: one line that says what to do
    with pytest.raises(CheckpointError, match="train.strategy=fsdp on 2 processes") as info:
        Trainer(load_config("bicaptioning_R_50_L1_H2048", [*overrides, "train.strategy=fsdp"]), resumed,
                resume="auto", progress=False)
    assert "\n" not in str(info.value)
