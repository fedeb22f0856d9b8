"""Distributed set-up from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT).

gloo on CPU (so tests can run two processes on one machine), NCCL on GPUs; multi-node works
through torchrun's usual ``--nnodes`` / ``--rdzv-endpoint`` flags, which only set these variables.
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator

import torch
import torch.distributed as dist
from torch import nn

from capvis.distinfo import DistInfo
from capvis.errors import ConfigError


def resolve_device(name: str, local_rank: int = 0, *, option: str = "--device") -> torch.device:
    """The one device rule of training and every command: ``auto`` -> this process's GPU
    (``cuda:<local_rank>``) when CUDA is available, else ``cpu``; ``cuda`` -> ``cuda:<local_rank>``;
    any other name as torch reads it (``cpu``, ``cuda:1``). An unknown name, or CUDA without CUDA, is a
    one-line ConfigError naming ``option`` (``train.device`` or a command's ``--device``)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device("cuda", local_rank) if name == "cuda" else torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown {option} {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{option}={name} but no CUDA device is available")
    return device


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the process group torchrun describes, or run as a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank, option="train.device")
    if world > 1 and not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return DistInfo(rank, world, local_rank, dev)


def all_reduce_mean(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.enabled:
        value = value.clone()
        dist.all_reduce(value)
        value /= info.world_size
    return value


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def cleanup(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def skip_grad_sync(model: nn.Module, skip: bool) -> Iterator[None]:
    """While ``skip``, backward passes accumulate local gradients without the all-reduce (DDP's
    ``no_sync``) or reduce-scatter (FSDP2's ``set_requires_gradient_sync(False)``); a single-process
    model has nothing to skip. Works through a ``torch.compile`` wrapper (it forwards attributes)."""
    if not skip:
        yield
    elif hasattr(model, "no_sync"):
        with model.no_sync():
            yield
    elif hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield
