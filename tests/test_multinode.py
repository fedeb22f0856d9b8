"""Two "nodes" on one machine: two torchrun launchers (``--nnodes 2``, c10d rendezvous, gloo) train a few
steps and agree with one process on the same global batch.

As in test_distributed.py, the backbone uses GroupNorm (per-process BatchNorm statistics would differ
from the whole batch's), dropout is off and every caption has the same length, so the two processes'
mean loss and averaged gradients equal the single process's: losses and final weights are compared.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from capvis.train import checkpoint as ckpt
from capvis.train.loop import read_metrics

from conftest import write_coco
from test_distributed import SAME_LENGTH, free_port, pretrain_args

@pytest.mark.slow
def test_two_nodes_on_one_machine_match_one_process(tmp_path, coco_tokenizer_path):
    coco = write_coco(tmp_path / "coco", captions=SAME_LENGTH)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.getcwd(), "GLOO_SOCKET_IFNAME": "lo"}
    single, double = tmp_path / "single", tmp_path / "double"
    port = free_port()
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(k),
                               "--nproc-per-node", "1", "--rdzv-backend", "c10d", "--rdzv-id", "capvis-test",
                               "--rdzv-endpoint", f"127.0.0.1:{port}", "-m", "capvis.cli",
                               *pretrain_args(coco, coco_tokenizer_path, double)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for k in range(2)]
    subprocess.run([sys.executable, "-m", "capvis.cli", *pretrain_args(coco, coco_tokenizer_path, single)],
                   check=True, env=env, capture_output=True, timeout=300)
    for node in nodes:
        try:
            output, _ = node.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            node.kill()
            output, _ = node.communicate()
        assert node.returncode == 0, output[-3000:]
    a = [r["loss"] for r in read_metrics(single)]
    b = [r["loss"] for r in read_metrics(double)]
    assert len(a) == len(b) == 3
    assert b == pytest.approx(a, rel=1e-4, abs=1e-5)  # the logged loss is the mean over the two nodes
    wa = ckpt.load_checkpoint(single / "checkpoints" / "checkpoint_00000003.pt")["model"]
    wb = ckpt.load_checkpoint(double / "checkpoints" / "checkpoint_00000003.pt")["model"]
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], rtol=1e-4, atol=1e-5, msg=key)
