"""timm backbones by name, from scratch: ``model.backbone=timm/<name>`` (ViTs, ConvNeXts, ...).

Any timm model with timm's features contract fits (``forward_features``, ``forward_intermediates``,
``feature_info``, ``num_features``): it is built with ``pretrained=False``, no classifier and no
pooling (``num_classes=0, global_pool=""``; the features are ``forward_head(pre_logits=True)`` of
``forward_features``, so a head norm such as ConvNeXt's is kept) and, where the model takes one, ``img_size=data.image_size`` (a ViT at 64 px has
a 4x4 patch grid). Its tensors sit under ``visual.model.*`` with timm's own names, so the export is
``visual.model``'s state dict as-is. Token models (ViTs) give their patch tokens on the patch grid,
prefix (class, register) tokens dropped; ``model.pool=token`` pools by the class token instead of the
patch mean. Weight decay follows timm's convention: none on 1-d tensors (norms, biases) and on the
names the model lists in ``no_weight_decay()`` (position embeddings, class tokens).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

from torch import Tensor, nn

from capvis.errors import ConfigError
from capvis.models.backbones.base import FAMILIES, Backbone
from capvis.models.checkpointing import wants_checkpoint

if TYPE_CHECKING:
    from capvis.config import ModelConfig

POOLS = ("avg", "token")
_RESNET_KEYS = {"small_stem": False, "stem_stride": 1, "visual_width": 64, "visual_norm": "batch"}


class TimmBackbone(Backbone):
    """A timm model behind the backbone contract."""

    export_format = "timm"

    def __init__(self, model: nn.Module, *, name: str, pool: str = "avg") -> None:
        super().__init__()
        if pool not in POOLS:
            raise ConfigError(f"unknown model.pool {pool!r}; known: {', '.join(POOLS)}")
        self.prefix_tokens = int(getattr(model, "num_prefix_tokens", 0))
        if pool == "token" and self.prefix_tokens == 0:
            raise ConfigError(f"model.pool=token needs a class token; timm/{name} has none (use model.pool=avg)")
        info = getattr(model, "feature_info", None)
        if not info or not hasattr(model, "forward_intermediates"):
            raise ConfigError(f"timm/{name} lacks timm's features contract (feature_info, forward_intermediates)")
        self.model = model
        self.name = f"timm/{name}"
        self.pool = pool
        self.num_features = int(model.num_features)
        self.stages = tuple(entry["module"] for entry in info)
        self.reduction = int(info[-1]["reduction"])
        self.channels_last_output = getattr(model, "output_fmt", "NCHW") == "NHWC"

    def _tokens_to_grid(self, tokens: Tensor, images: Tensor) -> Tensor:
        """(B, prefix + h*w, C) -> (B, C, h, w) on the patch grid."""
        h, w = images.shape[-2] // self.reduction, images.shape[-1] // self.reduction
        patches = tokens[:, self.prefix_tokens:]
        return patches.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[-1], h, w)

    def _features(self, images: Tensor) -> Tensor:
        """timm's ``forward_features`` then its unpooled ``forward_head(pre_logits=True)``, so a final
        norm that sits in the head (ConvNeXt's) is part of the features; blocks checkpointed when asked."""
        if hasattr(self.model, "set_grad_checkpointing"):
            self.model.set_grad_checkpointing(wants_checkpoint(self))
        feats = self.model.forward_features(images)
        out = self.model.forward_head(feats, pre_logits=True)
        return out if out.ndim == feats.ndim else feats

    def _grid(self, out: Tensor, images: Tensor) -> Tensor:
        if out.ndim == 3:
            return self._tokens_to_grid(out, images)
        return out.permute(0, 3, 1, 2) if self.channels_last_output else out

    def forward(self, images: Tensor) -> Tensor:
        return self._grid(self._features(images), images)

    def pooled(self, images: Tensor, stage: str | None = None) -> Tensor:
        if stage is None and self.pool == "token":
            return self._features(images)[:, 0]  # the class token, after the final norm
        return super().pooled(images, stage)

    def intermediates(self, images: Tensor, stages: Sequence[str]) -> list[Tensor]:
        for stage in stages:
            self.check_stage(stage)
        wanted = sorted({self.stages.index(s) for s in stages})
        # timm lays every intermediate out as NCHW (its default output_fmt; a ViT's on the patch grid)
        grids = self.model.forward_intermediates(images, indices=wanted, intermediates_only=True)
        by_index = dict(zip(wanted, grids))
        return [by_index[self.stages.index(s)] for s in stages]

    def no_weight_decay(self) -> set[str]:
        listed = set(self.model.no_weight_decay()) if hasattr(self.model, "no_weight_decay") else set()
        return {f"model.{n}" for n, p in self.model.named_parameters() if p.ndim <= 1 or n in listed}

    def blocks(self) -> list[nn.Module]:
        for attr in ("blocks", "stages", "layers"):
            container = getattr(self.model, attr, None)
            if isinstance(container, (nn.Sequential, nn.ModuleList)):
                return list(container)
        return []

    @property
    def classifier_name(self) -> str:  # type: ignore[override]
        return str(getattr(self.model, "pretrained_cfg", {}).get("classifier", "head"))

    def export_state_dict(self, *, standard_only: bool = True) -> dict[str, Tensor]:
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()}


def create_timm_model(name: str, image_size: int) -> nn.Module:
    """``timm.create_model(name)`` from scratch, without classifier, sized for ``image_size``."""
    import timm

    if not timm.is_model(name):
        hint = timm.list_models(f"*{name.split('_')[0]}*")[:5]
        raise ConfigError(f"timm has no model {name!r}" + (f" (similar: {', '.join(hint)})" if hint else ""))
    kwargs = {"pretrained": False, "num_classes": 0, "global_pool": ""}  # no classifier, no pooling
    try:  # token models size their position embeddings for the image; ConvNets take no img_size
        return timm.create_model(name, img_size=image_size, **kwargs)
    except TypeError:
        return timm.create_model(name, **kwargs)


@FAMILIES.register("timm")
def build_timm(name: str, model_cfg: "ModelConfig", image_size: int) -> TimmBackbone:
    changed = [k for k, default in _RESNET_KEYS.items() if getattr(model_cfg, k) != default]
    if changed:
        raise ConfigError(f"model.{changed[0]} applies to ResNet backbones only, not timm/{name}")
    return TimmBackbone(create_timm_model(name, image_size), name=name, pool=model_cfg.pool)


__all__ = ["POOLS", "TimmBackbone", "build_timm", "create_timm_model"]
