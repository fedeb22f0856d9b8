"""Visual backbones behind one contract (:mod:`.base`); each family registers itself on import, and every
module of this package is imported here, so a new family is one new file.

* :mod:`.resnet`: torchvision ResNets (the paper's), by plain name: ``resnet50``.
* :mod:`.timm_family`: any timm model with the features contract: ``timm/vit_small_patch16_224``.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import TYPE_CHECKING

for _module in pkgutil.iter_modules(__path__):  # registration: resnet, timm_family, and any new family
    importlib.import_module(f"{__name__}.{_module.name}")
from capvis.models.backbones.base import BACKBONES, FAMILIES, Backbone, build_visual_by_name, list_backbones
from capvis.models.backbones.resnet import NORM_LAYERS, ResNetBackbone, VisualBackbone, build_backbone
from capvis.models.backbones.timm_family import TimmBackbone

if TYPE_CHECKING:
    from capvis.config import Config, ModelConfig


def build_visual(model_cfg: "ModelConfig", image_size: int = 224) -> Backbone:
    """The backbone every task builds from ``cfg.model`` (one place, so all tasks agree)."""
    return build_visual_by_name(model_cfg.backbone, model_cfg, image_size)


def build_visual_for(cfg: "Config") -> Backbone:
    """:func:`build_visual` for a whole config: the image size comes from ``cfg.data``."""
    return build_visual(cfg.model, cfg.data.image_size)


__all__ = ["BACKBONES", "FAMILIES", "NORM_LAYERS", "Backbone", "ResNetBackbone", "TimmBackbone", "VisualBackbone",
           "build_backbone", "build_visual", "build_visual_for", "list_backbones"]
