"""The backbone contract: what every visual backbone gives the rest of capvis, whatever its family.

Every consumer (tasks, frozen features, fine-tuning, attention maps, export, FSDP, release) goes
through :class:`Backbone` only. The shapes, one convention for all families:

* ``forward(images)`` -> the visual tokens the textual heads attend to, as a grid ``(B, C, h, w)``
  (a ConvNet's last stage; a ViT's patch tokens laid out on their patch grid, prefix tokens
  dropped). Heads flatten it to ``(B, h*w, C)``; attention maps reshape to ``(h, w)``.
* ``pooled(images, stage=None)`` -> ``(B, C)`` for frozen-feature evaluations: the global average
  of the grid (the paper's protocol) or, for a ViT with ``model.pool=token``, its class token.
  ``stage`` names an intermediate output (:attr:`stages`), pooled by its spatial mean.
* ``intermediates(images, stages)`` -> the grids of those stages, for FPN-style heads.

Backbones come from two registries: :data:`BACKBONES` maps a plain name (``resnet50``) to a builder,
:data:`FAMILIES` maps a prefix (``timm`` in ``timm/vit_small_patch16_224``) to a builder that takes the
rest of the name. A builder receives the :class:`~capvis.config.ModelConfig` and the image size.
Adding a family is one file that registers into one of them.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Callable, Sequence

from torch import Tensor, nn

from capvis.errors import ConfigError
from capvis.registry import Registry

if TYPE_CHECKING:
    from capvis.config import ModelConfig
    from torchvision.models import ResNet

Builder = Callable[[str, "ModelConfig", int], "Backbone"]  # (name, model config, image size)
BACKBONES: Registry[Builder] = Registry("backbone")
FAMILIES: Registry[Builder] = Registry("backbone family")


class Backbone(nn.Module):
    """Base class of every visual backbone (see the module docstring for the shapes)."""

    name: str = ""
    num_features: int = 0  # channels of the grid and of the pooled vector
    stages: tuple[str, ...] = ()  # intermediate outputs, first to last; the last one is ``forward``'s
    export_format: str = ""  # the library whose state-dict names :meth:`export_state_dict` uses
    activation_checkpointing: bool = False  # recompute each block in backward (model.activation_checkpointing)

    def forward(self, images: Tensor) -> Tensor:  # pragma: no cover - abstract
        """``images`` (B, 3, S, S) -> visual tokens as a grid (B, C, h, w)."""
        raise NotImplementedError

    def pooled(self, images: Tensor, stage: str | None = None) -> Tensor:
        """(B, C) features: the last grid's mean, or the mean of ``stage``'s grid."""
        if stage is None or stage == self.stages[-1]:
            return self.forward(images).mean(dim=(2, 3))
        return self.intermediates(images, [stage])[0].mean(dim=(2, 3))

    def intermediates(self, images: Tensor, stages: Sequence[str]) -> list[Tensor]:  # pragma: no cover
        """The (B, C_i, h_i, w_i) grids of ``stages`` (names from :attr:`stages`), in that order."""
        raise NotImplementedError

    def check_stage(self, stage: str | None) -> None:
        """One-line error for a stage this backbone does not have."""
        if stage is not None and stage not in self.stages:
            raise ConfigError(f"backbone {self.name!r} has no stage {stage!r}; its stages: {', '.join(self.stages)}")

    def no_weight_decay(self) -> set[str]:
        """Parameter names (relative to the backbone) trained without weight decay."""
        return set()

    def blocks(self) -> list[nn.Module]:
        """The units FSDP shards and activation checkpointing recomputes one at a time."""
        return []

    classifier_name: str = ""  # where the family's own model keeps its classifier (``fc``, ``head``)

    def export_state_dict(self, *, standard_only: bool = True) -> dict[str, Tensor]:  # pragma: no cover
        """The weights under the names of :attr:`export_format`'s own model (no classifier).

        ``standard_only``: refuse, in one line, a variant the library's own builder cannot make
        (a ResNet with the small stem); off, the names are the library's whatever the shapes."""
        raise NotImplementedError

    def for_inference(self) -> "Backbone":
        """A frozen eval-mode copy for feature extraction, rewritten for speed where the family knows
        how (a ResNet folds its BatchNorms into its convolutions). A copy: the module being trained,
        which a demo keeps training after an evaluation, is left as it is."""
        return copy.deepcopy(self).eval().requires_grad_(False)

    def torchvision_resnet(self) -> "ResNet | None":
        """The torchvision ResNet inside, for consumers that need one (detection); None otherwise."""
        return None


def build_visual_by_name(name: str, model_cfg: "ModelConfig", image_size: int) -> Backbone:
    """The backbone ``name`` names: a registered name, or ``<family>/<name>``."""
    if "/" in name:
        family, rest = name.split("/", 1)
        if not rest:
            raise ConfigError(f"model.backbone {name!r} names no model after {family + '/'!r}")
        return FAMILIES.get(family)(rest, model_cfg, image_size)
    return BACKBONES.get(name)(name, model_cfg, image_size)


def list_backbones() -> list[str]:
    """Registered names plus one ``<family>/<name>`` pattern per family."""
    return [*BACKBONES.names(), *(f"{family}/<name>" for family in FAMILIES.names())]


__all__ = ["BACKBONES", "FAMILIES", "Backbone", "build_visual_by_name", "list_backbones"]
