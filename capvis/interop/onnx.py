"""Export a capvis backbone to ONNX: images (B, 3, H, W) -> layer4 grid (B, C, H/32, W/32).

Batch, height and width are dynamic axes. Uses PyTorch's ``torch.export``-based exporter (opset 18),
with the weights inside the one ``.onnx`` file; the backbone is exported in eval mode, so BatchNorm
uses its running statistics. Inputs are RGB, ImageNet-normalised, as for the PyTorch backbone.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import warnings
from pathlib import Path

import torch
from torch import nn

OPSET = 18
INPUT_NAME, OUTPUT_NAME = "images", "grid"


def export_onnx(backbone: nn.Module, path: str | Path, *, image_size: int = 224, opset: int = OPSET) -> Path:
    """Write ``path``; the example input is (2, 3, image_size, image_size)."""
    path = Path(path)
    model = copy.deepcopy(backbone).float().eval().to(memory_format=torch.contiguous_format)
    example = torch.zeros(2, 3, image_size, image_size)
    dim = torch.export.Dim
    with warnings.catch_warnings(), _quiet("onnxscript", "onnx_ir", "torch.onnx", "torch.export"):
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (example,), str(path), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                          opset_version=opset, dynamo=True, external_data=False, verbose=False,
                          dynamic_shapes={"images": {0: dim("batch", min=1, max=65536), 2: dim.AUTO, 3: dim.AUTO}})
    return path


@contextlib.contextmanager
def _quiet(*names: str):
    """The exporter's passes log every step at INFO; keep them to warnings while exporting."""
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def check_onnx(path: str | Path) -> None:
    """Run the ONNX checker on ``path`` (raises ``onnx.checker.ValidationError``)."""
    import onnx

    onnx.checker.check_model(str(path), full_check=True)
