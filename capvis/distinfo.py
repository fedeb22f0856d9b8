"""Which process this is (rank, world size, device): read by data loading and training alike, so it
sits below both (set up by :func:`capvis.train.distributed.init_distributed`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


__all__ = ["DistInfo"]
