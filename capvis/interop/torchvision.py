"""Export a capvis backbone as a plain torchvision ResNet state dict.

A capvis ``VisualBackbone`` *is* a torchvision ResNet with ``fc = Identity``, so the export is the
``cnn.*`` state dict plus a fresh ``fc`` (1000 classes, weight N(0, 0.01), bias 0: the paper's linear
probe init) so that ``torchvision.models.resnet50().load_state_dict(sd)`` works strictly. The ``fc``
carries no learned information: replace it or drop it downstream.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from capvis.errors import ConfigError

FC_CLASSES = 1000


def torchvision_reference(backbone: nn.Module) -> dict[str, tuple[int, ...]]:
    """Key -> shape of torchvision's own model of ``backbone.name`` (fc excluded), built on meta."""
    from torchvision import models as tvm

    builder = getattr(tvm, getattr(backbone, "name", ""), None)
    if builder is None:
        raise ConfigError(f"backbone {getattr(backbone, 'name', '?')!r} is not a torchvision model")
    with torch.device("meta"):
        reference = builder(weights=None).state_dict()
    return {k: tuple(v.shape) for k, v in reference.items() if not k.startswith("fc.")}


def check_standard_resnet(backbone: nn.Module) -> None:
    """Torchvision and Detectron2 know only torchvision's own shapes: the standard 7x7 stem, width 64,
    BatchNorm layers. Demo variants (``small_stem``, ``visual_width``, GroupNorm) cannot be exported."""
    ours = {k: tuple(v.shape) for k, v in backbone.cnn.state_dict().items() if not k.endswith("num_batches_tracked")}
    reference = {k: s for k, s in torchvision_reference(backbone).items() if not k.endswith("num_batches_tracked")}
    if ours != reference:
        diff = sorted(set(ours.items()) ^ set(reference.items()))[:1]
        raise ConfigError(f"this {backbone.name} is not shaped like torchvision's (first difference: {diff}); "
                          "model.small_stem, model.visual_width or GroupNorm backbones cannot be exported "
                          "to torchvision or Detectron2")


def torchvision_state_dict(backbone: nn.Module, *, fc_classes: int = FC_CLASSES,
                           seed: int = 0) -> dict[str, Tensor]:
    """``backbone.cnn`` weights under torchvision's names, plus ``fc.weight``/``fc.bias``.

    FrozenBatchNorm layers get a zero ``num_batches_tracked`` so the dict still loads strictly.
    """
    check_standard_resnet(backbone)
    state = {k: v.detach().clone() for k, v in backbone.cnn.state_dict().items()}
    for name, module in backbone.cnn.named_modules():
        if hasattr(module, "running_var") and f"{name}.num_batches_tracked" not in state:
            state[f"{name}.num_batches_tracked"] = torch.tensor(0, dtype=torch.long)
    features = int(backbone.num_features)
    generator = torch.Generator().manual_seed(seed)
    state["fc.weight"] = torch.randn(fc_classes, features, generator=generator) * 0.01  # (classes, C)
    state["fc.bias"] = torch.zeros(fc_classes)
    return state
