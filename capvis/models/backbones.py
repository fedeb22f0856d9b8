"""Visual backbones: torchvision ResNets trained from scratch, returning the last-stage grid.

Key names stay ``cnn.*`` (a plain torchvision ResNet with ``fc = Identity``), so a capvis task's
``visual.cnn.*`` keys match the original VirTex checkpoints and export straight to torchvision.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from torch import Tensor, nn
from torchvision import models as tvm
from torchvision.ops import FrozenBatchNorm2d

from capvis.errors import ConfigError
from capvis.registry import Registry

if TYPE_CHECKING:
    from capvis.config import ModelConfig

BACKBONES: Registry[Callable[..., tvm.ResNet]] = Registry("backbone")

for _name in ("resnet18", "resnet34", "resnet50", "resnet101", "wide_resnet50_2"):
    BACKBONES.register(_name)(getattr(tvm, _name))


class VisualBackbone(nn.Module):
    """A torchvision ResNet whose forward stops after ``layer4`` (avgpool and fc unused)."""

    def __init__(self, cnn: tvm.ResNet, *, name: str = "") -> None:
        super().__init__()
        self.name = name
        self.num_features: int = cnn.fc.in_features
        cnn.fc = nn.Identity()
        self.cnn = cnn

    def forward(self, images: Tensor) -> Tensor:
        """``images`` (B, 3, S, S) -> grid (B, C, S/32, S/32); (B, 2048, 7, 7) for R-50 at 224."""
        c = self.cnn
        x = c.maxpool(c.relu(c.bn1(c.conv1(images))))
        return c.layer4(c.layer3(c.layer2(c.layer1(x))))

    def pooled(self, images: Tensor) -> Tensor:
        """Global-average-pooled features (B, C)."""
        return self.forward(images).mean(dim=(2, 3))


def _group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(32, channels), channels)


NORM_LAYERS: dict[str, Callable[[int], nn.Module] | None] = {
    "batch": None,  # torchvision's BatchNorm2d, statistics per GPU as in the paper
    "group": _group_norm,  # batch-independent: small per-GPU batches, exact DDP equivalence
    "frozen": FrozenBatchNorm2d,  # fixed affine + statistics
}


def build_backbone(name: str, *, small_stem: bool = False, zero_init_residual: bool = True,
                   norm: str = "batch") -> VisualBackbone:
    """A randomly initialised backbone by registry name.

    ``small_stem`` swaps the 7x7/2 conv and the max-pool for a 3x3/1 conv, so 32-64 px images still
    leave a few cells in the last-stage grid (demo and tests only; the paper uses the standard stem).
    """
    if norm not in NORM_LAYERS:
        raise ConfigError(f"unknown model.visual_norm {norm!r}; known: {', '.join(NORM_LAYERS)}")
    kwargs = {"norm_layer": NORM_LAYERS[norm]} if NORM_LAYERS[norm] is not None else {}
    cnn = BACKBONES.get(name)(weights=None, zero_init_residual=zero_init_residual and norm != "frozen", **kwargs)
    if small_stem:
        cnn.conv1 = nn.Conv2d(3, cnn.conv1.out_channels, kernel_size=3, stride=1, padding=1, bias=False)
        nn.init.kaiming_normal_(cnn.conv1.weight, mode="fan_out", nonlinearity="relu")
        cnn.maxpool = nn.Identity()
    return VisualBackbone(cnn, name=name)


def build_visual(model_cfg: ModelConfig) -> VisualBackbone:
    """The backbone every task builds from ``cfg.model`` (one place, so all tasks agree)."""
    return build_backbone(model_cfg.backbone, small_stem=model_cfg.small_stem,
                          zero_init_residual=model_cfg.zero_init_residual, norm=model_cfg.visual_norm)


def list_backbones() -> list[str]:
    return BACKBONES.names()


__all__ = ["BACKBONES", "VisualBackbone", "build_backbone", "build_visual", "list_backbones"]
