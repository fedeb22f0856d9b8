"""Classification pretext tasks of VirTex's Table 1: ``token_classification`` and ``multilabel_classification``.

Both put one linear layer on the globally pooled grid (VirTex's "linear textual head", keys
``textual.output.*``) and, as the original ``ClassificationModel``, minimise the KL divergence between a
K-hot target normalised to 1/K and the softmax of the logits (equal, up to the target's entropy, to the
cross-entropy against that target, so the gradients are the same as the original's).

* ``token_classification``: the targets are the *set* of caption tokens (order and repeats ignored;
  padding/<unk>, [SOS], [EOS], [MASK] excluded). This is also the tag-prediction baseline of Joulin et al.
  (2016), who found this softmax over normalised targets better than one-vs-all logistic losses;
  ``model.classification.loss=bce`` gives the one-vs-all variant (mean binary cross-entropy).
* ``multilabel_classification``: the targets are the COCO instance categories of the image (from
  ``instances_<split>.json`` beside the captions file, read by the data pipeline because the task sets
  ``batch_keys``); ``model.num_categories`` outputs (80 for COCO, CaptionWorld's 8 shapes fit too).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from capvis.config import Config, config_section
from capvis.data.pipeline import CAPTION_KEYS, CATEGORY_KEY
from capvis.data.tokenizer import EOS_ID, MASK_ID, PAD_ID, SOS_ID
from capvis.errors import ConfigError, DataError
from capvis.models.backbones import Backbone, build_visual_for
from capvis.tasks.base import TASKS, PretextTask, TaskOutput

SPECIAL_IDS = (PAD_ID, SOS_ID, EOS_ID, MASK_ID)
LOSSES = ("softmax", "bce")


@config_section("classification")
@dataclass(frozen=True)
class ClassificationConfig:
    """``model.classification``: the loss of token_classification."""

    loss: str = "softmax"  # softmax (CE on 1/K targets, as VirTex) | bce (one-vs-all)


class LinearHead(nn.Module):
    """Global average pooling of the grid, then ``output``: (B, C, h, w) -> (B, K) logits."""

    def __init__(self, visual_features: int, num_outputs: int) -> None:
        super().__init__()
        self.output = nn.Linear(visual_features, num_outputs)
        nn.init.normal_(self.output.weight, std=0.01)
        nn.init.zeros_(self.output.bias)

    def forward(self, visual_grid: Tensor) -> Tensor:
        return self.output(visual_grid.mean(dim=(2, 3)))  # (B, K)


def token_targets(tokens: Tensor, vocab_size: int, ignore: tuple[int, ...] = SPECIAL_IDS) -> Tensor:
    """(B, T) caption ids -> (B, V) float multi-hot of the tokens present, ``ignore`` ids zeroed."""
    target = torch.zeros(tokens.shape[0], vocab_size, device=tokens.device)
    target.scatter_(1, tokens, 1.0)
    target[:, list(ignore)] = 0.0
    return target


def soft_target_loss(logits: Tensor, multi_hot: Tensor) -> Tensor:
    """Mean over rows with at least one target of KL(q || softmax(logits)), q = multi-hot / K.

    Rows without any target (an image with no instances, a caption of only <unk>) carry no loss.
    """
    counts = multi_hot.sum(dim=1, keepdim=True)  # (B, 1)
    q = multi_hot / counts.clamp(min=1)
    logp = F.log_softmax(logits.float(), dim=1)
    per_row = (torch.xlogy(q, q) - q * logp).sum(dim=1)  # (B,)
    valid = (counts.squeeze(1) > 0).to(per_row.dtype)
    return (per_row * valid).sum() / valid.sum().clamp(min=1)


class _ClassificationTask(PretextTask):
    def __init__(self, visual: Backbone, num_outputs: int) -> None:
        super().__init__()
        self.visual = visual
        self.textual = LinearHead(visual.num_features, num_outputs)

    def logits(self, images: Tensor) -> Tensor:
        return self.textual(self.visual(images))  # (B, K)


@TASKS.register("token_classification")
class TokenClassificationTask(_ClassificationTask):
    """Predict the set of caption tokens from the pooled image features (a bag of words)."""

    def __init__(self, visual: Backbone, vocab_size: int, *, loss: str = "softmax") -> None:
        if loss not in LOSSES:
            raise ConfigError(f"model.classification.loss must be one of {', '.join(LOSSES)}, got {loss!r}")
        super().__init__(visual, vocab_size)
        self.vocab_size, self.loss = vocab_size, loss

    @classmethod
    def from_config(cls, cfg: Config, vocab_size: int) -> "TokenClassificationTask":
        return cls(build_visual_for(cfg), vocab_size, loss=cfg.model.classification.loss)

    def forward(self, batch: dict[str, Tensor]) -> TaskOutput:
        logits = self.logits(batch["image"])
        targets = token_targets(batch["caption_tokens"], self.vocab_size)
        if self.loss == "softmax":
            loss = soft_target_loss(logits, targets)
        else:
            keep = torch.ones(self.vocab_size, dtype=torch.bool, device=logits.device)
            keep[list(SPECIAL_IDS)] = False
            loss = F.binary_cross_entropy_with_logits(logits.float()[:, keep], targets[:, keep])
        return TaskOutput(loss=loss, logs={"loss_tokens": loss.detach()})


@TASKS.register("multilabel_classification")
class MultilabelClassificationTask(_ClassificationTask):
    """Predict the image's instance categories (batch key ``categories``, (B, K) multi-hot)."""

    batch_keys: ClassVar[frozenset[str]] = CAPTION_KEYS | {CATEGORY_KEY}  # instances_<split>.json categories

    def __init__(self, visual: Backbone, num_categories: int) -> None:
        if num_categories <= 0:
            raise ConfigError(f"model.num_categories must be positive, got {num_categories}")
        super().__init__(visual, num_categories)
        self.num_categories = num_categories

    @classmethod
    def from_config(cls, cfg: Config, vocab_size: int) -> "MultilabelClassificationTask":
        return cls(build_visual_for(cfg), cfg.model.num_categories)

    def forward(self, batch: dict[str, Tensor]) -> TaskOutput:
        if "categories" not in batch:
            raise DataError("multilabel_classification needs batch['categories']: train on a COCO captions file "
                            "with instances_<split>.json beside it (not shards or JSONL/CSV)")
        targets = batch["categories"].float()
        k = targets.shape[1]
        if k > self.num_categories:
            raise DataError(f"batch has {k} categories but model.num_categories={self.num_categories}")
        if k < self.num_categories:  # a dataset with fewer categories than outputs: the rest are never present
            targets = F.pad(targets, (0, self.num_categories - k))
        loss = soft_target_loss(self.logits(batch["image"]), targets)
        return TaskOutput(loss=loss, logs={"loss_categories": loss.detach()})
