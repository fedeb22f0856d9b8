"""Export a capvis backbone as a Detectron2 ResNet checkpoint (``.pkl``), as MoCo and VirTex do.

Names follow Detectron2's ``tools/convert-torchvision-to-d2.py``: ``conv1``/``bn1`` -> ``stem.conv1``/
``stem.conv1.norm``, ``layerN`` -> ``res{N+1}``, ``bnK`` -> ``convK.norm``, ``downsample.0/1`` ->
``shortcut``/``shortcut.norm``; ``fc`` and ``num_batches_tracked`` are dropped. Keys carry no
``backbone.`` / ``backbone.bottom_up.`` prefix: with ``matching_heuristics: True`` Detectron2 matches
them by suffix, so one file serves both the C4 (``backbone.res2...``) and FPN
(``backbone.bottom_up.res2...``) configs of the paper.

Channel order: capvis backbones see RGB images normalised with the ImageNet mean/std, so the weights
are written unchanged (no BGR flip of ``conv1``). Use them with ``INPUT.FORMAT: "RGB"``,
``MODEL.PIXEL_MEAN: [123.675, 116.280, 103.530]``, ``MODEL.PIXEL_STD: [58.395, 57.120, 57.375]`` and
``MODEL.RESNETS.STRIDE_IN_1X1: False`` (torchvision strides in the 3x3 conv), exactly as VirTex's
Detectron2 configs set them.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor, nn

from capvis.interop.torchvision import check_standard_resnet

AUTHOR = "capvis"
INPUT_FORMAT = {"INPUT.FORMAT": "RGB", "MODEL.PIXEL_MEAN": [123.675, 116.280, 103.530],
                "MODEL.PIXEL_STD": [58.395, 57.120, 57.375], "MODEL.RESNETS.STRIDE_IN_1X1": False}

_RULES = (
    (re.compile(r"^layer([1-4])\."), lambda m: f"res{int(m.group(1)) + 1}."),
    (re.compile(r"\.bn([1-3])\."), lambda m: f".conv{m.group(1)}.norm."),
    (re.compile(r"\.downsample\.0\."), lambda m: ".shortcut."),
    (re.compile(r"\.downsample\.1\."), lambda m: ".shortcut.norm."),
)


def detectron2_name(torchvision_key: str) -> str | None:
    """Detectron2's name for a torchvision ResNet key; None for keys Detectron2 has no use for."""
    if torchvision_key.startswith("fc.") or torchvision_key.endswith("num_batches_tracked"):
        return None
    if torchvision_key.startswith("conv1."):
        return "stem." + torchvision_key
    if torchvision_key.startswith("bn1."):
        return "stem.conv1.norm." + torchvision_key[len("bn1."):]
    key = torchvision_key
    for pattern, replace in _RULES:
        key = pattern.sub(replace, key)
    return key


def detectron2_state_dict(backbone: nn.Module) -> dict[str, np.ndarray]:
    """``{detectron2 name: float32 numpy array}`` of the backbone's torchvision ResNet."""
    check_standard_resnet(backbone)  # one line for anything else
    out: dict[str, np.ndarray] = {}
    for key, value in backbone.export_state_dict().items():
        name = detectron2_name(key)
        if name is not None:
            out[name] = _numpy(value)
    return out


def _numpy(t: Tensor) -> np.ndarray:
    return t.detach().float().cpu().numpy().copy()


def save_detectron2(backbone: nn.Module, path: str | Path) -> Path:
    """Write the Detectron2 model-zoo layout ``{"model", "__author__", "matching_heuristics"}``."""
    payload: dict[str, Any] = {"model": detectron2_state_dict(backbone), "__author__": AUTHOR,
                               "matching_heuristics": True, "capvis_input_format": dict(INPUT_FORMAT)}
    path = Path(path)
    with path.open("wb") as fh:
        pickle.dump(payload, fh)
    return path
