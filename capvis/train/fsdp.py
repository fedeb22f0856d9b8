"""How the task is spread over processes (``train.strategy``): ``ddp`` replicates it, ``fsdp`` shards it.

``ddp`` (and a single process): every rank holds the whole model and optimizer; rank 0 writes the
checkpoint. ``fsdp`` (FSDP2, ``torch.distributed.fsdp.fully_shard``): each backbone stage, each
Transformer layer and then the task itself are sharded over the ranks (parameters, gradients and
optimizer state: the wide output projection and large heads no longer sit whole on every GPU).

FSDP checkpoints: each rank writes its shards (``checkpoint_<it>.rank<r>-of-<W>.pt``: model and
optimizer state as plain local tensors, the same atomic write and checksum sidecar as every capvis
checkpoint, read back with ``weights_only=True``), then rank 0 writes ``checkpoint_<it>.pt`` as usual,
except that its ``model`` is the consolidated full state dict (gathered on rank 0, on the CPU) and
its ``optimizer`` lives in the shards. So every checkpoint loads for evaluation, ``capvis release``
and ``capvis.load`` as any other, and ``--resume`` continues exactly on the same number of processes
(another number is refused in one line). Shard files assume a file system all ranks share.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from capvis.errors import CheckpointError
from capvis.train import checkpoint as ckpt
from capvis.train.distributed import DistInfo

log = logging.getLogger(__name__)
Writer = Callable[[dict[str, Any]], Path]  # rank 0's main checkpoint: {"model", "optimizer", extra...} -> path


def agree(ok: bool, info: DistInfo) -> bool:
    """True when ``ok`` on every rank (so a failed write on one rank is an error on all, not a hang)."""
    if not info.enabled:
        return ok
    flag = torch.tensor([1 if ok else 0], dtype=torch.int32, device=info.device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


class DataParallel:
    """``train.strategy=ddp``: replicas (DDP when distributed); rank 0 writes the checkpoint."""

    name = "ddp"

    def __init__(self, info: DistInfo) -> None:
        self.info = info

    def prepare(self, task: nn.Module) -> None:
        """Before the optimizer is built (FSDP replaces the parameters here)."""

    def wrap(self, task: nn.Module) -> nn.Module:
        if not self.info.enabled:
            return task
        return DistributedDataParallel(task, device_ids=[self.info.device] if self.info.device.type == "cuda" else None)

    def save(self, *, task: nn.Module, optimizer: Any, path: Path, keep: int, write: Writer) -> Path | None:
        out, error = None, None
        if self.info.is_main:
            try:
                out = write({"model": task.state_dict(), "optimizer": optimizer.state_dict()})
            except CheckpointError as exc:
                error = exc
        if not agree(error is None, self.info):
            raise error or CheckpointError(f"rank 0 could not write checkpoint {path}")
        return out

    def restore(self, *, task: nn.Module, optimizer: Any, path: Path, state: dict[str, Any]) -> None:
        sharded = state.get("sharded")
        if sharded:
            raise CheckpointError(f"checkpoint {path} was written by train.strategy=fsdp on {sharded['world_size']} "
                                  "processes: resume it with train.strategy=fsdp on as many (its weights alone load "
                                  "anywhere: evaluation, capvis release)")
        task.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])


def shard_path(path: Path, rank: int, world_size: int) -> Path:
    """``checkpoint_<it>.rank<r>-of-<W>.pt`` beside ``checkpoint_<it>.pt`` (not matched as a checkpoint)."""
    return path.with_name(f"{path.stem}.rank{rank}-of-{world_size}.pt")


def _shard_blocks(task: nn.Module) -> list[nn.Module]:
    """The units FSDP gathers one at a time: backbone stages and Transformer layers (never a module
    whose parameters another module shares: those stay in the root group)."""
    from capvis.models.attention import TransformerDecoderLayer
    from capvis.models.backbones import Backbone

    blocks: list[nn.Module] = []
    for module in task.modules():
        if isinstance(module, Backbone):
            blocks += module.blocks()
        elif isinstance(module, (TransformerDecoderLayer, nn.TransformerEncoderLayer)):
            blocks.append(module)
    return blocks


def _to_local(obj: Any) -> Any:
    """A state tree with every DTensor replaced by this rank's local shard (plain tensors: no pickled
    classes, so the file loads with ``weights_only=True``)."""
    from torch.distributed.tensor import DTensor

    if isinstance(obj, DTensor):
        return obj.to_local()
    if isinstance(obj, dict):
        return {k: _to_local(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_local(v) for v in obj)
    return obj


def _like(local: torch.Tensor, ref: Any) -> Any:
    """``local`` as a DTensor laid out as ``ref`` (a DTensor parameter or state entry); else as is."""
    from torch.distributed.tensor import DTensor

    if not isinstance(ref, DTensor):
        return local
    return DTensor.from_local(local.to(ref.device), ref.device_mesh, ref.placements, run_check=False,
                              shape=ref.shape, stride=ref.stride())


def _optimizer_from_local(state: dict[str, Any], params: list[torch.Tensor]) -> dict[str, Any]:
    """Inverse of :func:`_to_local` for an optimizer (Lookahead or torch) state dict: entries that
    have the shape of their parameter's shard become DTensors laid out as that parameter."""
    if "slow" in state:  # Lookahead around an inner optimizer
        return {**state, "optimizer": _optimizer_from_local(state["optimizer"], params),
                "slow": [_like(s, p) for s, p in zip(state["slow"], params)]}
    per_param = {}
    for index, entries in state["state"].items():
        p = params[int(index)]
        shard = p.to_local().shape if hasattr(p, "to_local") else p.shape
        per_param[index] = {k: _like(v, p) if isinstance(v, torch.Tensor) and v.shape == shard and v.ndim else v
                            for k, v in entries.items()}
    return {**state, "state": per_param}


class FullyShard(DataParallel):
    """``train.strategy=fsdp``: FSDP2 over all ranks, sharded checkpoints plus a consolidated model."""

    name = "fsdp"

    def prepare(self, task: nn.Module) -> None:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(self.info.device.type, (self.info.world_size,))
        for block in _shard_blocks(task):
            fully_shard(block, mesh=mesh)
        fully_shard(task, mesh=mesh)

    def wrap(self, task: nn.Module) -> nn.Module:
        return task  # fully_shard works in place

    def save(self, *, task: nn.Module, optimizer: Any, path: Path, keep: int, write: Writer) -> Path | None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        w, r = self.info.world_size, self.info.rank
        full = get_model_state_dict(task, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        mine = shard_path(path, r, w)
        error = None
        try:
            ckpt.atomic_save({"model": _to_local(task.state_dict()), "optimizer": _to_local(optimizer.state_dict()),
                              "rank": r, "world_size": w}, mine)
        except CheckpointError as exc:
            error = exc
        if not agree(error is None, self.info):
            mine.unlink(missing_ok=True)
            raise error or CheckpointError(f"another rank could not write its shard of {path}")
        out = None
        if self.info.is_main:
            try:
                out = write({"model": full, "optimizer": None, "sharded": {"strategy": self.name, "world_size": w}})
            except CheckpointError as exc:
                error = exc
        if not agree(error is None, self.info):
            raise error or CheckpointError(f"rank 0 could not write checkpoint {path}")
        prune_shards(path.parent, r, w, keep)
        return out

    def restore(self, *, task: nn.Module, optimizer: Any, path: Path, state: dict[str, Any]) -> None:
        sharded, w = state.get("sharded"), self.info.world_size
        if not sharded:
            raise CheckpointError(f"checkpoint {path} is not sharded (written by train.strategy=ddp): resume it "
                                  "with train.strategy=ddp, or start an FSDP run from scratch")
        if int(sharded["world_size"]) != w:
            raise CheckpointError(f"checkpoint {path} holds {sharded['world_size']} FSDP shards but this run has "
                                  f"{w} processes: resume on {sharded['world_size']} (torchrun --nproc-per-node)")
        local = ckpt.load_checkpoint(shard_path(path, self.info.rank, w))
        template = task.state_dict()
        task.load_state_dict({k: _like(v, template[k]) if k in template else v for k, v in local["model"].items()})
        params = [p for group in optimizer.param_groups for p in group["params"]]
        optimizer.load_state_dict(_optimizer_from_local(local["optimizer"], params))


def prune_shards(directory: Path, rank: int, world_size: int, keep: int) -> None:
    """Each rank deletes its own shard files beyond the newest ``keep`` iterations (0: keep all)."""
    if keep <= 0:
        return
    suffix = f".rank{rank}-of-{world_size}.pt"
    mine = sorted(p for p in directory.glob(f"checkpoint_*{suffix}"))  # zero-padded iterations sort
    for old in mine[:-keep]:
        old.unlink(missing_ok=True)
        old.with_name(old.name + ".sha256").unlink(missing_ok=True)


STRATEGIES: dict[str, type[DataParallel]] = {DataParallel.name: DataParallel, FullyShard.name: FullyShard}


def build_strategy(name: str, info: DistInfo) -> DataParallel:
    """``fsdp`` on one process has nothing to shard: it runs as ``ddp`` (a single process), saying so."""
    if name == FullyShard.name and not info.enabled:
        log.info("train.strategy=fsdp on one process: nothing to shard, running unsharded")
        name = DataParallel.name
    return STRATEGIES[name](info)
