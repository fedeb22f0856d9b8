"""Export a capvis backbone as a plain torchvision ResNet state dict.

A capvis ``ResNetBackbone`` holds a torchvision ResNet with ``fc = Identity``, so the export is its
``cnn.*`` state dict plus a fresh ``fc`` (1000 classes, weight N(0, 0.01), bias 0: the paper's linear
probe init) so that ``torchvision.models.resnet50().load_state_dict(sd)`` works strictly. The ``fc``
carries no learned information: replace it or drop it downstream.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from capvis.models.backbones.resnet import check_standard_resnet, torchvision_reference  # noqa: F401

FC_CLASSES = 1000


def torchvision_state_dict(backbone: nn.Module, *, fc_classes: int = FC_CLASSES,
                           seed: int = 0) -> dict[str, Tensor]:
    """The backbone's torchvision ResNet weights (``export_state_dict``), plus ``fc.weight``/``fc.bias``.

    FrozenBatchNorm layers get a zero ``num_batches_tracked`` so the dict still loads strictly.
    """
    state = backbone.export_state_dict()
    for name, module in backbone.torchvision_resnet().named_modules():
        if hasattr(module, "running_var") and f"{name}.num_batches_tracked" not in state:
            state[f"{name}.num_batches_tracked"] = torch.tensor(0, dtype=torch.long)
    features = int(backbone.num_features)
    generator = torch.Generator().manual_seed(seed)
    state["fc.weight"] = torch.randn(fc_classes, features, generator=generator) * 0.01  # (classes, C)
    state["fc.bias"] = torch.zeros(fc_classes)
    return state
