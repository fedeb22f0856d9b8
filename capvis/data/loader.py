"""Data loaders for pretraining: an endless, resumable, rank-sharded sampler over a map dataset.

The sampler yields *keys* ``epoch * len(dataset) + index``; the dataset seeds every sample's
randomness from ``(seed, epoch, index)``. The stream of batches is therefore a pure function of
the seed and the position, independent of the number of workers, so resuming at iteration ``t``
only needs ``t``: the sampler starts at position ``t * local_batch`` of its own sequence.
Like DistributedSampler, each rank takes a disjoint slice of every epoch's permutation
(the tail that does not divide evenly is dropped).
"""

from __future__ import annotations

import signal
from typing import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler

from capvis.config import Config
from capvis.errors import ConfigError


class ResumableShardedSampler(Sampler[int]):
    def __init__(self, size: int, *, rank: int = 0, world_size: int = 1, seed: int = 0, shuffle: bool = True,
                 start: int = 0, infinite: bool = True) -> None:
        if size < world_size:
            raise ConfigError(f"dataset has {size} samples, fewer than the {world_size} processes")
        self.size, self.rank, self.world_size = size, rank, world_size
        self.seed, self.shuffle, self.start, self.infinite = seed, shuffle, start, infinite
        self.per_rank = size // world_size

    def epoch_indices(self, epoch: int) -> torch.Tensor:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            order = torch.randperm(self.size, generator=g)
        else:
            order = torch.arange(self.size)
        return order[: self.per_rank * self.world_size][self.rank :: self.world_size]

    def __iter__(self) -> Iterator[int]:
        epoch, offset = divmod(self.start, self.per_rank)
        while True:
            indices = self.epoch_indices(epoch)[offset:]
            yield from (epoch * self.size + indices).tolist()
            if not self.infinite:
                return
            epoch, offset = epoch + 1, 0

    def __len__(self) -> int:
        return self.per_rank - self.start % self.per_rank if not self.infinite else 2**62


def local_batch_size(cfg: Config, world_size: int) -> int:
    if cfg.train.batch_size % world_size:
        raise ConfigError(f"train.batch_size={cfg.train.batch_size} is not divisible by the "
                          f"{world_size} processes")
    return cfg.train.batch_size // world_size


def ignore_stop_signals(worker_id: int = 0) -> None:
    """Loader workers leave SIGTERM/SIGINT to the main process.

    A scheduler that pre-empts a job signals its whole process group (Slurm, Ctrl-C in a shell); a
    worker killed by that signal would make the main process fail before it can checkpoint. The main
    process handles the signal (capvis.train.signals) and shuts the workers down itself.
    """
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def make_loader(dataset: Dataset, *, batch_size: int, sampler: Sampler, num_workers: int, collate,
                pin_memory: bool = False) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                      collate_fn=collate, pin_memory=pin_memory, drop_last=False, worker_init_fn=ignore_stop_signals,
                      persistent_workers=num_workers > 0, prefetch_factor=4 if num_workers > 0 else None)


def make_stream_loader(dataset: IterableDataset, *, batch_size: int, num_workers: int, collate,
                       pin_memory: bool = False, persistent: bool = True) -> DataLoader:
    """A loader over a streaming dataset that splits itself over workers (no sampler). Batch ``j`` comes
    from worker ``j % num_workers``, which :class:`capvis.data.streaming.ShardStream` relies on to resume."""
    return DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=collate,
                      pin_memory=pin_memory, drop_last=False, persistent_workers=persistent and num_workers > 0,
                      worker_init_fn=ignore_stop_signals,
                      prefetch_factor=4 if num_workers > 0 else None)
