"""Evaluation images: decoded and cropped once per process, normalised per batch on the device.

Evaluations score many backbones on the same image list (the demo: the pretrained network and its
random init; ``capvis ablate``: every task, seed and checkpoint; zero-shot over several checkpoints),
and at small image sizes decoding costs more than the forward. So the uint8 crops of a list (shorter
side resized, center crop: the geometric part of :func:`~capvis.data.transforms.build_eval_transform`)
are kept in memory, least recently used first out, within ``CAPVIS_IMAGE_CACHE_MB`` (default 1024; 0
turns it off; a list larger than the limit is never kept). The key covers every file's path, size and
modification time and the geometry, so a rewritten file is decoded again. Scaling and normalisation run
per batch after the cache, on the device (uint8 crosses to a GPU, 4x fewer bytes), with the same
arithmetic as the per-image transform: the batches are the same tensors either way.
"""

from __future__ import annotations

import math
import os
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from capvis.data.decode import load_image
from capvis.data.transforms import eval_geometry, normalize_batch
from capvis.errors import ConfigError

CACHE_ENV = "CAPVIS_IMAGE_CACHE_MB"
DEFAULT_CACHE_MB = 1024


class CroppedImages(Dataset):
    """uint8 (3, S, S) crops of ``paths``: shorter side to ``resize``, center crop ``image_size``."""

    def __init__(self, paths: Sequence[str | Path], image_size: int, resize: int | None = None) -> None:
        self.paths = [Path(p) for p in paths]
        self.geometry = eval_geometry(image_size, resize)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> Tensor:
        return self.geometry(load_image(self.paths[i]))


class _Store:
    """Least-recently-used uint8 image sets within a byte budget read from the environment per call."""

    def __init__(self) -> None:
        self.sets: OrderedDict[tuple, Tensor] = OrderedDict()

    @staticmethod
    def budget() -> int:
        raw = os.environ.get(CACHE_ENV, str(DEFAULT_CACHE_MB))
        try:
            megabytes = float(raw)
        except ValueError:
            megabytes = math.nan  # not a number: the same error as nan itself
        if not (math.isfinite(megabytes) and megabytes >= 0):
            raise ConfigError(f"{CACHE_ENV}={raw!r}: expected a number of megabytes >= 0 "
                              "(0 turns the cache off)")
        return int(megabytes * 2**20)

    def get(self, key: tuple) -> Tensor | None:
        images = self.sets.get(key)
        if images is not None:
            self.sets.move_to_end(key)
        return images

    def fits(self, nbytes: int) -> bool:
        return 0 < nbytes <= self.budget()

    def put(self, key: tuple, images: Tensor) -> None:
        budget = self.budget()
        self.sets[key] = images
        while sum(t.nbytes for t in self.sets.values()) > budget:
            self.sets.popitem(last=False)

    def clear(self) -> None:
        self.sets.clear()


STORE = _Store()


def _key(paths: Sequence[Path], image_size: int, resize: int | None) -> tuple:
    files = []
    for p in paths:
        try:
            st = p.stat()
            files.append((str(p), st.st_size, st.st_mtime_ns))
        except OSError:  # decoding names the missing file
            return ()
    return (image_size, resize, tuple(files))


def uint8_batches(paths: Sequence[str | Path], *, image_size: int, resize: int | None = None,
                  batch_size: int = 64, num_workers: int = 0, pin_memory: bool = False) -> Iterator[Tensor]:
    """uint8 (b, 3, S, S) crops of ``paths`` in order, from the process's store when it holds them."""
    paths = [Path(p) for p in paths]
    key = _key(paths, image_size, resize)
    kept = STORE.get(key) if key else None
    if kept is not None:
        yield from kept.split(batch_size)
        return
    keep = bool(key) and STORE.fits(len(paths) * 3 * image_size * image_size)
    batches = []
    for batch in DataLoader(CroppedImages(paths, image_size, resize), batch_size=batch_size,
                            num_workers=num_workers, pin_memory=pin_memory):
        if keep:
            batches.append(batch)
        yield batch
    if keep and batches:
        STORE.put(key, torch.cat(batches))


def eval_batches(paths: Sequence[str | Path], *, image_size: int, resize: int | None = None, batch_size: int = 64,
                 num_workers: int = 0, device: str | torch.device = "cpu",
                 memory_format: torch.memory_format = torch.contiguous_format) -> Iterator[Tensor]:
    """float32 (b, 3, S, S) normalised batches of ``paths`` in order on ``device``: what
    ``build_eval_transform(image_size, resize)`` gives image by image, stacked."""
    device = torch.device(device)
    for batch in uint8_batches(paths, image_size=image_size, resize=resize, batch_size=batch_size,
                               num_workers=num_workers, pin_memory=device.type == "cuda"):
        batch = batch.to(device, non_blocking=True)
        yield normalize_batch(batch).contiguous(memory_format=memory_format)
