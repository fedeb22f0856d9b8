"""Frozen-backbone features: global-average-pooled (or other stages), batched and cached.

Evaluations (SVMs, linear probes, zero-shot) run many times on the same features, so features
are written once to a ``.npy`` file keyed by the checkpoint, image list and preprocessing.
Preprocessing follows the paper's downstream protocol: resize the shorter side, center crop,
ImageNet normalisation (256/224 at full size; ``resize = image_size * 8/7`` in general).
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from capvis.data.datasets import load_image
from capvis.data.transforms import build_eval_transform

log = logging.getLogger(__name__)
STAGES = ("layer1", "layer2", "layer3", "layer4")


class ImageListDataset(Dataset):
    def __init__(self, paths: Sequence[str | Path], image_size: int, resize: int | None = None) -> None:
        self.paths = [Path(p) for p in paths]
        self.transform = build_eval_transform(image_size, resize)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> Tensor:
        return self.transform(load_image(self.paths[i]))


def default_resize(image_size: int) -> int:
    """256 for 224 (the paper's protocol), the same ratio for other sizes."""
    return round(image_size * 256 / 224)


def stage_features(backbone: nn.Module, images: Tensor, stage: str = "layer4") -> Tensor:
    """Global-average-pooled output of ``stage`` of a capvis VisualBackbone (B, C)."""
    c = backbone.cnn
    x = c.maxpool(c.relu(c.bn1(c.conv1(images))))
    for name in STAGES:
        x = getattr(c, name)(x)
        if name == stage:
            return x.mean(dim=(2, 3))
    raise ValueError(f"unknown stage {stage!r}; choose from {', '.join(STAGES)}")


@torch.no_grad()
def extract_features(backbone: nn.Module, paths: Sequence[str | Path], *, image_size: int,
                     resize: int | None = None, batch_size: int = 64, num_workers: int = 0,
                     device: str | torch.device = "cpu", stage: str = "layer4", progress: bool = False) -> np.ndarray:
    """(N, C) float32 features of ``paths`` in order."""
    backbone = backbone.eval().to(device)
    loader = DataLoader(ImageListDataset(paths, image_size, resize or default_resize(image_size)),
                        batch_size=batch_size, num_workers=num_workers)
    out = []
    for images in tqdm(loader, desc=f"features {stage}", disable=not progress):
        images = images.to(device)
        out.append(stage_features(backbone, images, stage).float().cpu())
    return torch.cat(out).numpy() if out else np.zeros((0, 0), np.float32)


def cache_key(source: str, paths: Sequence[str | Path], **settings: object) -> str:
    h = hashlib.sha256(json.dumps({"source": source, "settings": settings}, sort_keys=True, default=str).encode())
    for p in paths:
        h.update(str(p).encode())
    return h.hexdigest()[:16]


def cached_features(backbone: nn.Module, paths: Sequence[str | Path], *, cache_dir: str | Path | None,
                    source: str, **kwargs: object) -> np.ndarray:
    """``extract_features`` with an on-disk cache (``None`` disables it)."""
    if cache_dir is None or source == "random":
        return extract_features(backbone, paths, **kwargs)
    settings = {k: v for k, v in kwargs.items() if k in ("image_size", "resize", "stage")}
    path = Path(cache_dir) / f"features_{cache_key(source, paths, **settings)}.npy"
    if path.is_file():
        log.info("features from cache %s", path)
        return np.load(path)
    feats = extract_features(backbone, paths, **kwargs)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npy")
    np.save(tmp, feats)
    tmp.replace(path)
    return feats
