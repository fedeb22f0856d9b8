"""``coca``: captioning and contrastive learning from one backbone (CoCa, Yu et al. 2022).

One backbone grid feeds two objectives, ``loss = caption_weight * captioning + contrastive_weight *
contrastive`` (``model.coca``; open_clip's defaults 2 and 1):

* **captioning**: VirTex's textual head (``textual.*``) cross-attending to the whole grid, forward, or
  both directions with ``model.coca.bidirectional`` (a ``backward_textual`` head as in bicaptioning);
  parallel prediction (``model.textual.parallel_fraction``) works as in the captioning tasks.
* **contrastive**: the ``contrastive`` task's text encoder, projections, temperature and loss
  (``model.contrastive``: InfoNCE or SigLIP, all-gathered over the global batch under DDP). The image
  embedding is **attention-pooled** by default (``model.coca.image_pool=attention``: one learned query
  attends over the grid, CoCa's contrastive pooler; ``image_pool``) or the GAP + projection of
  ``contrastive`` (``mean``).

Unlike CoCa, the text tower is not shared: CoCa's decoder runs text-only layers (whose pooled output
is the text embedding) under its cross-attending ones; here the contrastive text encoder and the
captioning head are separate Transformers, so each objective keeps the exact model of its own task
and capvis's captioning tools (KV-cache decoding, ``capvis score``, likelihood zero-shot) work
unchanged. Both sides start from the initialisation the single-objective tasks get from the same
seed, so with ``image_pool=mean`` a weight of 0 reproduces the other task's loss exactly.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from capvis.config import Config, config_section
from capvis.errors import ConfigError
from capvis.models.attention import MultiheadAttention
from capvis.models.backbones import Backbone, build_visual_for
from capvis.models.text_encoder import TextEncoder
from capvis.models.textual import TextualHead
from capvis.tasks.base import TASKS, TaskOutput, caption_lengths, head_sizes
from capvis.tasks.captioning import CaptioningTask, reverse_captions
from capvis.tasks.contrastive import ContrastiveObjective, build_text_encoder, contrastive_options
from capvis.tasks.protocols import CaptionHead

IMAGE_POOLS = ("attention", "mean")


@config_section("coca")
@dataclass(frozen=True)
class CocaConfig:
    """``model.coca``: caption_weight * captioning + contrastive_weight * contrastive (open_clip's
    defaults 2 and 1); the contrastive side takes its sizes and loss from ``model.contrastive``."""

    caption_weight: float = 2.0
    contrastive_weight: float = 1.0
    bidirectional: bool = False  # also a backward captioning head (VirTex's bicaptioning)
    image_pool: str = "attention"  # image embedding: attention (one learned query, CoCa's) | mean (GAP)


class AttentionPool(nn.Module):
    """One learned query attends over the grid's h*w positions (multi-head): the image embedding."""

    def __init__(self, features: int, embed_dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(features)
        self.input_projection = nn.Linear(features, embed_dim)
        self.attention = MultiheadAttention(embed_dim, max(1, embed_dim // 64))
        self.query = nn.Parameter(0.02 * torch.randn(1, 1, embed_dim))

    def forward(self, grid: Tensor) -> Tensor:
        """(B, C, h, w) -> (B, E), not normalised."""
        x = self.input_projection(self.norm(grid.permute(0, 2, 3, 1).flatten(1, 2)))  # (B, h*w, E)
        k, v = self.attention.project_kv(x)
        q = self.attention.project_q(self.query.expand(x.shape[0], -1, -1))  # (B, heads, 1, d)
        out, _ = self.attention.attend(q, k, v)  # (B, 1, E)
        return out[:, 0]


def backward_head(textual: TextualHead) -> TextualHead:
    """Bicaptioning's backward head: its own layers (same initial values), shared projection, embedding
    and output."""
    backward = copy.deepcopy(textual)
    backward.visual_projection = textual.visual_projection
    backward.embedding = textual.embedding
    backward.output = textual.output
    return backward


@TASKS.register("coca")
class CocaTask(ContrastiveObjective, CaptioningTask):
    """Captioning (one or both directions) plus contrastive matching, weighted, on one backbone."""

    def __init__(self, visual: Backbone, textual: TextualHead, text_encoder: TextEncoder, *,
                 caption_weight: float = 2.0, contrastive_weight: float = 1.0, bidirectional: bool = False,
                 image_pool: str = "attention", parallel_fraction: float = 0.0, seed: int = 0,
                 label_smoothing: float = 0.0, **contrastive: Any) -> None:
        super().__init__(visual, textual, parallel_fraction=parallel_fraction, seed=seed,
                         label_smoothing=label_smoothing)
        weights = (caption_weight, contrastive_weight)
        if not all(math.isfinite(w) and w >= 0 for w in weights) or max(weights) == 0:
            raise ConfigError("model.coca.caption_weight and contrastive_weight must be finite, >= 0 and not "
                              f"both 0, got {caption_weight} and {contrastive_weight}")
        if image_pool not in IMAGE_POOLS:
            raise ConfigError(f"model.coca.image_pool must be one of {', '.join(IMAGE_POOLS)}, got {image_pool!r}")
        self.caption_weight, self.contrastive_weight = caption_weight, contrastive_weight
        self.backward_textual = backward_head(textual) if bidirectional else None
        self.init_contrastive(text_encoder, image_projection=image_pool == "mean", **contrastive)
        self.image_pool = AttentionPool(visual.num_features, contrastive.get("embed_dim", 256)) \
            if image_pool == "attention" else None

    @classmethod
    def from_config(cls, cfg: Config, vocab_size: int) -> "CocaTask":
        m, t, k = cfg.model, cfg.model.textual, cfg.model.coca
        visual = build_visual_for(cfg)
        with torch.random.fork_rng(devices=[]):  # both sides start where their own task would start
            textual = TextualHead(visual_features=visual.num_features, vocab_size=vocab_size,
                                  **head_sizes(t, cfg.data.max_caption_length))
        return cls(visual, textual, build_text_encoder(cfg, vocab_size), caption_weight=k.caption_weight,
                   contrastive_weight=k.contrastive_weight, bidirectional=k.bidirectional,
                   image_pool=k.image_pool, parallel_fraction=t.parallel_fraction, seed=cfg.train.seed,
                   label_smoothing=t.label_smoothing,
                   **contrastive_options(m.contrastive))

    def embed_grid(self, grid: Tensor) -> Tensor:
        """(B, C, h, w) -> (B, E) L2-normalised: attention-pooled, or GAP + projection (``image_pool``)."""
        if self.image_pool is None:
            return super().embed_grid(grid)
        return F.normalize(self.image_pool(grid), dim=-1)

    def caption_heads(self) -> list[CaptionHead]:
        heads = [CaptionHead("forward", self.textual, reverse=False)]
        if self.backward_textual is not None:
            heads.append(CaptionHead("backward", self.backward_textual, reverse=True))
        return heads

    def forward(self, batch: dict[str, Tensor]) -> TaskOutput:
        grid = self.visual(batch["image"])  # (B, C, h, w), once for both objectives
        tokens = batch["caption_tokens"]
        lengths = caption_lengths(batch)
        parallel = self.select_parallel(batch)
        caption = self.caption_loss(self.textual(grid, tokens, lengths, parallel=parallel), tokens)
        logs = {"loss_forward": caption.detach()}
        if self.backward_textual is not None:
            reversed_tokens = reverse_captions(tokens, lengths)  # [EOS] wn .. w1 [SOS]
            logits = self.backward_textual(grid, reversed_tokens, lengths, parallel=parallel)
            backward = self.caption_loss(logits, reversed_tokens)
            logs["loss_backward"] = backward.detach()
            caption = caption + backward
        contrastive, contrastive_logs = self.contrastive_loss(self.embed_grid(grid),
                                                              self.encode_text(tokens, lengths))
        loss = self.caption_weight * caption + self.contrastive_weight * contrastive
        logs.update(loss_caption=caption.detach(), **contrastive_logs)
        if parallel is not None:
            logs["parallel_share"] = parallel.float().mean()
        return TaskOutput(loss=loss, logs=logs)
