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
from capvis.models.checkpointing import checkpointed, wants_checkpoint
from capvis.registry import Registry

if TYPE_CHECKING:
    from capvis.config import ModelConfig

BACKBONES: Registry[Callable[..., tvm.ResNet]] = Registry("backbone")

for _name in ("resnet18", "resnet34", "resnet50", "resnet101", "wide_resnet50_2"):
    BACKBONES.register(_name)(getattr(tvm, _name))


class VisualBackbone(nn.Module):
    """A torchvision ResNet whose forward stops after ``layer4`` (avgpool and fc unused)."""

    activation_checkpointing: bool = False  # recompute each stage in backward (model.activation_checkpointing)

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
        if wants_checkpoint(self):
            for stage in (c.layer1, c.layer2, c.layer3, c.layer4):
                x = checkpointed(stage, x)
            return x
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


# (block, stage depths, extra kwargs) of each registered torchvision ResNet, for width scaling
_SHAPES: dict[str, tuple[type[nn.Module], list[int], dict[str, int]]] = {
    "resnet18": (tvm.resnet.BasicBlock, [2, 2, 2, 2], {}),
    "resnet34": (tvm.resnet.BasicBlock, [3, 4, 6, 3], {}),
    "resnet50": (tvm.resnet.Bottleneck, [3, 4, 6, 3], {}),
    "resnet101": (tvm.resnet.Bottleneck, [3, 4, 23, 3], {}),
    "wide_resnet50_2": (tvm.resnet.Bottleneck, [3, 4, 6, 3], {"width_per_group": 128}),
}


class ScaledResNet(tvm.ResNet):
    """torchvision's ResNet with every stage (and the stem) ``width / 64`` times as wide.

    Module names stay torchvision's, so features, export and checkpoints work unchanged; only a
    width of 64 has the shapes of torchvision's own models. Narrow ResNets make CPU demos fast.
    """

    def __init__(self, block: type[nn.Module], layers: list[int], *, width: int = 64, **kwargs: object) -> None:
        self._width = width
        super().__init__(block, layers, **kwargs)  # type: ignore[arg-type]
        self.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = self._norm_layer(width)
        nn.init.kaiming_normal_(self.conv1.weight, mode="fan_out", nonlinearity="relu")
        self.fc = nn.Linear(self.fc.in_features * width // 64, self.fc.out_features)

    def _make_layer(self, block, planes, blocks, stride=1, dilate=False):  # type: ignore[no-untyped-def]
        if planes == 64 and self.inplanes == 64:  # first stage: the stem's output width
            self.inplanes = self._width
        return super()._make_layer(block, planes * self._width // 64, blocks, stride, dilate)


def build_backbone(name: str, *, small_stem: bool = False, stem_stride: int = 1, width: int = 64,
                   zero_init_residual: bool = True, norm: str = "batch") -> VisualBackbone:
    """A randomly initialised backbone by registry name.

    ``small_stem`` swaps the 7x7/2 conv and the max-pool for a 3x3 conv of stride ``stem_stride``,
    so 32-96 px images still leave a grid of a few cells after the last stage (demo and tests; the
    paper uses the standard stem at 224 px). ``width`` scales every stage (64: torchvision's).
    """
    if norm not in NORM_LAYERS:
        raise ConfigError(f"unknown model.visual_norm {norm!r}; known: {', '.join(NORM_LAYERS)}")
    if width <= 0 or width % 8:
        raise ConfigError(f"model.visual_width must be a positive multiple of 8, got {width}")
    kwargs: dict[str, object] = {"norm_layer": NORM_LAYERS[norm]} if NORM_LAYERS[norm] is not None else {}
    zero_init = zero_init_residual and norm != "frozen"
    builder = BACKBONES.get(name)
    if width == 64:
        cnn = builder(weights=None, zero_init_residual=zero_init, **kwargs)
    else:
        if name not in _SHAPES:
            raise ConfigError(f"model.visual_width is not supported for backbone {name!r}")
        block, layers, extra = _SHAPES[name]
        cnn = ScaledResNet(block, layers, width=width, zero_init_residual=zero_init, **extra, **kwargs)
    if small_stem:
        cnn.conv1 = nn.Conv2d(3, cnn.conv1.out_channels, kernel_size=3, stride=stem_stride, padding=1, bias=False)
        nn.init.kaiming_normal_(cnn.conv1.weight, mode="fan_out", nonlinearity="relu")
        cnn.maxpool = nn.Identity()
    return VisualBackbone(cnn, name=name)


def build_visual(model_cfg: ModelConfig) -> VisualBackbone:
    """The backbone every task builds from ``cfg.model`` (one place, so all tasks agree)."""
    return build_backbone(model_cfg.backbone, small_stem=model_cfg.small_stem, stem_stride=model_cfg.stem_stride,
                          width=model_cfg.visual_width, zero_init_residual=model_cfg.zero_init_residual,
                          norm=model_cfg.visual_norm)


def list_backbones() -> list[str]:
    return BACKBONES.names()


__all__ = ["BACKBONES", "VisualBackbone", "build_backbone", "build_visual", "list_backbones"]
