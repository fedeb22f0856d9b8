"""The torchvision ResNet family (the paper's backbones), trained from scratch.

Key names stay ``cnn.*`` (a plain torchvision ResNet with ``fc = Identity``), so a capvis task's
``visual.cnn.*`` keys match the original VirTex checkpoints and export straight to torchvision.
The ResNet-only config keys (``model.small_stem``, ``stem_stride``, ``visual_width``,
``zero_init_residual``, ``visual_norm``) are read here and nowhere else.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Sequence

import torch
from torch import Tensor, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval
from torchvision import models as tvm
from torchvision.ops import FrozenBatchNorm2d

from capvis.errors import ConfigError
from capvis.models.checkpointing import checkpointed, wants_checkpoint
from capvis.models.backbones.base import BACKBONES, Backbone

if TYPE_CHECKING:
    from capvis.config import ModelConfig

RESNETS: dict[str, Callable[..., tvm.ResNet]] = {
    name: getattr(tvm, name) for name in ("resnet18", "resnet34", "resnet50", "resnet101", "wide_resnet50_2")}
STAGES = ("layer1", "layer2", "layer3", "layer4")


class ResNetBackbone(Backbone):
    """A torchvision ResNet whose forward stops after ``layer4`` (avgpool and fc unused)."""

    stages = STAGES
    export_format = "torchvision"

    def __init__(self, cnn: tvm.ResNet, *, name: str = "") -> None:
        super().__init__()
        self.name = name
        self.num_features = cnn.fc.in_features
        cnn.fc = nn.Identity()
        self.cnn = cnn

    def _stem(self, images: Tensor) -> Tensor:
        c = self.cnn
        return c.maxpool(c.relu(c.bn1(c.conv1(images))))

    def forward(self, images: Tensor) -> Tensor:
        """``images`` (B, 3, S, S) -> grid (B, C, S/32, S/32); (B, 2048, 7, 7) for R-50 at 224."""
        c = self.cnn
        x = self._stem(images)
        if wants_checkpoint(self):
            for stage in self.blocks():
                x = checkpointed(stage, x)
            return x
        return c.layer4(c.layer3(c.layer2(c.layer1(x))))

    def intermediates(self, images: Tensor, stages: Sequence[str]) -> list[Tensor]:
        for stage in stages:
            self.check_stage(stage)
        x, grids = self._stem(images), {}
        for name, block in zip(STAGES, self.blocks()):
            x = grids[name] = block(x)
            if all(s in grids for s in stages):
                break
        return [grids[s] for s in stages]

    def blocks(self) -> list[nn.Module]:
        return [self.cnn.layer1, self.cnn.layer2, self.cnn.layer3, self.cnn.layer4]

    classifier_name = "fc"

    def export_state_dict(self, *, standard_only: bool = True) -> dict[str, Tensor]:
        if standard_only:
            check_standard_resnet(self)
        return {k: v.detach().clone() for k, v in self.cnn.state_dict().items() if not k.startswith("fc.")}

    def torchvision_resnet(self) -> tvm.ResNet:
        return self.cnn

    def for_inference(self) -> "ResNetBackbone":
        """BatchNorms folded into the convolutions, weights channels-last (1.45x on the demo's backbone at
        batch 50 on CPU, NCHW inputs included: the convolutions then run channels-last)."""
        frozen = super().for_inference()
        fold_batch_norms(frozen.cnn)
        return frozen.to(memory_format=torch.channels_last)


_NORMS = (nn.BatchNorm2d, FrozenBatchNorm2d)


def _conv_bn_pairs(module: nn.Module) -> list[tuple[str, str]]:
    """(conv, norm) child names where the norm directly follows the conv in torchvision's ResNets:
    ``convK``/``bnK`` in the stem and every block, ``0``/``1`` in a ``downsample`` Sequential."""
    children = dict(module.named_children())
    pairs = [(f"conv{name[2:]}", name) for name in children
             if name.startswith("bn") and f"conv{name[2:]}" in children]
    if isinstance(module, nn.Sequential) and len(module) == 2:
        pairs.append(("0", "1"))
    return [(c, n) for c, n in pairs if isinstance(children[c], nn.Conv2d) and isinstance(children[n], _NORMS)]


def fold_batch_norms(cnn: nn.Module) -> int:
    """Fold every eval-mode BatchNorm of a torchvision ResNet into the convolution before it (the
    norm becomes Identity): the same function with a third fewer memory passes. GroupNorm, which
    depends on its input, stays. Returns how many norms were folded."""
    folded = 0
    for module in list(cnn.modules()):
        for conv, norm in _conv_bn_pairs(module):
            bn = getattr(module, norm)
            if isinstance(bn, FrozenBatchNorm2d):  # same statistics, no training mode
                bn = _as_batch_norm(bn)
            setattr(module, conv, fuse_conv_bn_eval(getattr(module, conv).eval(), bn.eval()))
            setattr(module, norm, nn.Identity())
            folded += 1
    return folded


def _as_batch_norm(frozen: FrozenBatchNorm2d) -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(frozen.weight.numel(), eps=frozen.eps)
    for name in ("weight", "bias", "running_mean", "running_var"):
        getattr(bn, name).data.copy_(getattr(frozen, name))
    return bn


VisualBackbone = ResNetBackbone  # the name of this class before the contract; kept for imports


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
    if name not in RESNETS:
        BACKBONES.get(name)  # the registry's one-line error, with a suggestion
        raise ConfigError(f"backbone {name!r} is not a torchvision ResNet")
    builder = RESNETS[name]
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
    return ResNetBackbone(cnn, name=name)


def torchvision_reference(backbone: nn.Module) -> dict[str, tuple[int, ...]]:
    """Key -> shape of torchvision's own model of ``backbone.name`` (fc excluded), built on meta."""
    builder = getattr(tvm, getattr(backbone, "name", ""), None)
    if builder is None:
        raise ConfigError(f"backbone {getattr(backbone, 'name', '?')!r} is not a torchvision model")
    with torch.device("meta"):
        reference = builder(weights=None).state_dict()
    return {k: tuple(v.shape) for k, v in reference.items() if not k.startswith("fc.")}


def check_standard_resnet(backbone: nn.Module) -> None:
    """Torchvision and Detectron2 know only torchvision's own shapes: the standard 7x7 stem, width 64,
    BatchNorm layers. Demo variants (``small_stem``, ``visual_width``, GroupNorm) cannot be exported."""
    cnn = backbone.torchvision_resnet()
    if cnn is None:
        raise ConfigError(f"backbone {backbone.name!r} is not a torchvision ResNet; torchvision and Detectron2 "
                          "exports take torchvision ResNets only")
    ours = {k: tuple(v.shape) for k, v in cnn.state_dict().items() if not k.endswith("num_batches_tracked")}
    reference = {k: s for k, s in torchvision_reference(backbone).items() if not k.endswith("num_batches_tracked")}
    if ours != reference:
        diff = sorted(set(ours.items()) ^ set(reference.items()))[:1]
        raise ConfigError(f"this {backbone.name} is not shaped like torchvision's (first difference: {diff}); "
                          "model.small_stem, model.visual_width or GroupNorm backbones cannot be exported "
                          "to torchvision or Detectron2")


def _from_config(name: str, model_cfg: ModelConfig, image_size: int) -> ResNetBackbone:
    if model_cfg.pool != "avg":
        raise ConfigError(f"model.pool={model_cfg.pool!r} needs a backbone with a class token; {name} has none "
                          "(ResNets pool by global average: model.pool=avg)")
    return build_backbone(name, small_stem=model_cfg.small_stem, stem_stride=model_cfg.stem_stride,
                          width=model_cfg.visual_width, zero_init_residual=model_cfg.zero_init_residual,
                          norm=model_cfg.visual_norm)


for _name in RESNETS:
    BACKBONES.register(_name)(_from_config)

__all__ = ["NORM_LAYERS", "RESNETS", "ResNetBackbone", "ScaledResNet", "VisualBackbone", "build_backbone",
           "fold_batch_norms"]
