"""Contrastive losses under DDP: two gloo processes with 4 rows each give the loss and the (DDP-averaged)
gradients of one process on the 8 concatenated rows, because features are all-gathered with gradients.
Checked for InfoNCE and SigLIP (``contrastive``) and for ``coca`` (captioning + SigLIP; its captioning
loss is a per-process token mean, equal to the global one here because both halves hold 14 targets).

The backbone uses GroupNorm (BatchNorm statistics would be per process) and dropout is off. Run as a
script under ``torch.distributed.run``, this file is the worker: one launch computes every case.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
import torch

ROWS, SIZE = 8, 16
CASES = {
    "infonce": ("model.task=contrastive",),
    "siglip": ("model.task=contrastive", "model.contrastive.loss=siglip"),
    "coca_siglip": ("model.task=coca", "model.contrastive.loss=siglip", "model.coca.bidirectional=true"),
}


def build(case: str = "infonce"):
    from capvis.config import load_config
    from capvis.tasks import build_task

    cfg = load_config(None, [*CASES[case], "model.backbone=resnet18", "model.visual_norm=group",
                             "model.textual.hidden=64", "model.textual.dropout=0", "data.max_caption_length=10",
                             "model.contrastive.embed_dim=16"])
    torch.manual_seed(0)
    task = build_task(cfg, 40)
    g = torch.Generator().manual_seed(1)
    lengths = torch.tensor([3, 6, 4, 5, 6, 3, 5, 4])
    tokens = torch.randint(4, 40, (ROWS, 6), generator=g)
    tokens[:, 0] = 1
    for i, n in enumerate(lengths.tolist()):
        tokens[i, n - 1] = 2
        tokens[i, n:] = 0
    batch = {"image": torch.randn(ROWS, 3, SIZE, SIZE, generator=g), "caption_tokens": tokens,
             "caption_lengths": lengths, "image_id": torch.arange(ROWS)}
    return task.train(), batch


def loss_and_grads(model, task, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    loss = model(batch).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in task.named_parameters()}


def worker(out: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    results = {}
    for case in CASES:
        task, batch = build(case)
        share = ROWS // world
        local = {k: v[rank * share: (rank + 1) * share] for k, v in batch.items()}
        loss, grads = loss_and_grads(DistributedDataParallel(task), task, local)  # DDP averages the gradients
        dist.all_reduce(loss)
        results[case] = {"loss": loss / world, "grads": grads}
    if rank == 0:
        torch.save(results, out)
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("ddp") / "ddp.pt"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.getcwd()}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                           "--master-port", str(free_port()), __file__, str(out)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(out)


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_all_gather_loss_and_gradients_match_one_process(ddp_results: dict, case: str) -> None:
    torch.set_num_threads(1)
    ddp = ddp_results[case]
    task, batch = build(case)
    loss, grads = loss_and_grads(task, task, batch)
    torch.testing.assert_close(ddp["loss"], loss, rtol=1e-5, atol=1e-6)
    assert grads.keys() == ddp["grads"].keys()
    for name, grad in grads.items():
        torch.testing.assert_close(ddp["grads"][name], grad, rtol=1e-4, atol=1e-6, msg=name)
    # without the gather, each process would only see its own 4 rows: a different loss
    local, _ = loss_and_grads(task, task, {k: v[:4] for k, v in batch.items()})
    assert abs(local.item() - loss.item()) > 1e-3


if __name__ == "__main__":
    worker(sys.argv[1])
