"""Frozen-backbone features: global-average-pooled (or other stages), batched and cached.

Evaluations (SVMs, linear probes, zero-shot) run many times on the same features, so features
are computed once and written to a ``.npy`` file whose name is a key over everything that decides
them (:func:`feature_key`): the backbone's weights themselves (not the checkpoint's path, which a
newer checkpoint or a ``model.*`` override can reuse), the image files (path, size, modification
time, in order), the transform, the stage and the precision. Preprocessing follows the paper's
downstream protocol: resize the shorter side, center crop, ImageNet normalisation (256/224 at full
size; ``resize = image_size * 8/7`` in general).

The forward runs on the backbone's inference copy (:meth:`Backbone.for_inference`: a ResNet's
BatchNorms folded into its convolutions) with channels-last inputs, 1.4-1.6x faster on CPU (bench:
``bench/features.py``); under bf16 autocast where the device multiplies bf16 in hardware (CUDA, AMX
CPUs; features are returned in float32), in float32 elsewhere (emulated bf16 is slower). Batches are
loaded by a DataLoader (``num_workers`` processes, pinned memory on CUDA) and their uint8 crops kept
for the next backbone evaluated on the same images (:mod:`capvis.data.eval_images`).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import Tensor, nn
from tqdm import tqdm

from capvis.data.eval_images import eval_batches
from capvis.data.transforms import build_eval_transform
from capvis.models.backbones.base import Backbone
from capvis.train.precision import Precision, compile_model, resolve_precision

log = logging.getLogger(__name__)
KEY_VERSION = 4  # bump when extraction changes in a way the key does not see


def default_resize(image_size: int) -> int:
    """256 for 224 (the paper's protocol), the same ratio for other sizes."""
    return round(image_size * 256 / 224)


def stage_features(backbone: nn.Module, images: Tensor, stage: str | None = None) -> Tensor:
    """(B, C) pooled features of a backbone (the contract's ``pooled``): the final ones, or ``stage``'s."""
    return backbone.pooled(images, stage)


def precision(device: str | torch.device) -> Precision:
    """bf16 autocast where the device multiplies bf16 in hardware (CUDA, AMX CPUs: ``train.precision=auto``'s
    rule), fp32 elsewhere; its name is part of the cache key."""
    return resolve_precision("auto", torch.device(device))


@torch.no_grad()
def extract_features(backbone: Backbone, paths: Sequence[str | Path], *, image_size: int,
                     resize: int | None = None, batch_size: int = 64, num_workers: int = 0,
                     device: str | torch.device = "cpu", stage: str | None = None, compile: str | None = None,
                     progress: bool = False) -> np.ndarray:
    """(N, C) float32 features of ``paths`` in order; ``compile`` (a backend name) runs the forward through
    ``torch.compile`` (the same features to float rounding; eager with one warning where it cannot run)."""
    device = torch.device(device)
    backbone = backbone.for_inference().to(device, memory_format=torch.channels_last)
    forward = functools.partial(stage_features, backbone, stage=stage)
    if compile:
        forward = compile_model(forward, backend=compile, device=device, option="--compile")
    batches = eval_batches(paths, image_size=image_size, resize=resize or default_resize(image_size),
                           batch_size=batch_size, num_workers=num_workers, device=device,
                           memory_format=torch.channels_last)
    autocast = precision(device).autocast()
    out = []
    backbone.check_stage(stage)
    for images in tqdm(batches, desc=f"features {stage or 'final'}", disable=not progress,
                       total=-(-len(paths) // batch_size)):
        with autocast:
            out.append(forward(images).float().cpu())
    return torch.cat(out).numpy() if out else np.zeros((0, 0), np.float32)


def weights_digest(module: nn.Module) -> str:
    """sha256 over a module's state dict (names, dtypes, shapes and values), independent of device."""
    h = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def feature_key(backbone: nn.Module, paths: Sequence[str | Path], *, image_size: int,
                resize: int | None = None, stage: str | None = None, device: str | torch.device = "cpu"
                ) -> tuple[str, dict]:
    """``(key, settings)``: a hex key over the weights, the files (path, size, mtime; in order), the
    transform, the stage and the precision, and the readable settings it covers (for the sidecar)."""
    resize = resize or default_resize(image_size)
    settings = {"version": KEY_VERSION, "weights": weights_digest(backbone), "stage": stage,
                "image_size": image_size, "resize": resize, "precision": precision(device).name,
                "transform": repr(build_eval_transform(image_size, resize)), "images": len(paths)}
    h = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for p in paths:
        try:
            st = Path(p).stat()
            h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        except OSError:  # extraction will name the missing file
            h.update(f"{p}\0missing\n".encode())
    return h.hexdigest()[:24], settings


def cached_features(backbone: nn.Module, paths: Sequence[str | Path], *, cache_dir: str | Path | None,
                    source: str = "", **kwargs: object) -> np.ndarray:
    """``extract_features`` with an on-disk cache (``cache_dir=None`` disables it).

    ``source`` (the checkpoint's name) is recorded in the sidecar only: the key covers the weights.
    """
    if cache_dir is None:
        return extract_features(backbone, paths, **kwargs)
    key_args = {k: kwargs[k] for k in ("image_size", "resize", "stage", "device") if k in kwargs}
    key, settings = feature_key(backbone, paths, **key_args)
    path = Path(cache_dir) / f"features_{key}.npy"
    if path.is_file():
        try:
            feats = np.load(path)
            if feats.ndim == 2 and len(feats) == len(paths):
                log.info("features from cache %s", path)
                return feats
        except (OSError, ValueError) as exc:
            log.warning("feature cache %s unreadable (%s); extracting again", path, exc)
    feats = extract_features(backbone, paths, **kwargs)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npy")
    np.save(tmp, feats)
    tmp.replace(path)
    sidecar = {**settings, "source": source, "shape": list(feats.shape)}
    path.with_suffix(".json").write_text(json.dumps(sidecar, indent=1))
    return feats
