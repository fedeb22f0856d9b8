"""Captioning pretext tasks: ``captioning`` (forward head) and ``bicaptioning`` (VirTex).

Bicaptioning adds a backward head that reads each caption reversed ([EOS] ... [SOS]). The two heads
share ``visual_projection``, ``embedding`` and ``output`` (the same module objects, so the state dict
repeats them under ``backward_textual.*`` exactly as the original checkpoints do); only the
Transformer layers are separate, and both start from identical values.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor

from capvis.config import Config
from capvis.models.backbones import VisualBackbone, build_visual
from capvis.models.textual import DecodeCache, TextualHead
from capvis.tasks.base import TASKS, PretextTask, TaskOutput


def caption_loss(logits: Tensor, tokens: Tensor, padding_idx: int = 0) -> Tensor:
    """Mean cross-entropy of ``logits[:, :-1]`` (B, T, V) against ``tokens[:, 1:]``, padding ignored."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), tokens[:, 1:].flatten(),
                           ignore_index=padding_idx)


def reverse_captions(tokens: Tensor, lengths: Tensor) -> Tensor:
    """Reverse each row's first ``lengths[i]`` tokens in place of them, keeping right padding (B, T)."""
    t = tokens.shape[1]
    steps = torch.arange(t, device=tokens.device).unsqueeze(0)  # (1, T)
    lengths = lengths.to(tokens.device).unsqueeze(1)  # (B, 1)
    index = (lengths - 1 - steps).clamp(min=0)  # (B, T)
    return torch.where(steps < lengths, tokens.gather(1, index), torch.zeros_like(tokens))


def _lengths(batch: dict[str, Tensor]) -> Tensor:
    if "caption_lengths" in batch:
        return batch["caption_lengths"]
    return (batch["caption_tokens"] != 0).sum(dim=1)


@TASKS.register("captioning")
class CaptioningTask(PretextTask):
    """Forward captioning: predict each caption token from the image and the tokens before it."""

    def __init__(self, visual: VisualBackbone, textual: TextualHead) -> None:
        super().__init__()
        self.visual = visual
        self.textual = textual

    @classmethod
    def from_config(cls, cfg: Config, vocab_size: int) -> "CaptioningTask":
        m, t = cfg.model, cfg.model.textual
        visual = build_visual(m)
        textual = TextualHead(visual_features=visual.num_features, vocab_size=vocab_size, hidden=t.hidden,
                              layers=t.layers, heads=t.heads, feedforward=t.feedforward, dropout=t.dropout,
                              norm_first=t.norm_first, max_len=cfg.data.max_caption_length)
        return cls(visual, textual)

    def forward(self, batch: dict[str, Tensor]) -> TaskOutput:
        grid = self.visual(batch["image"])  # (B, C, h, w)
        tokens, lengths = batch["caption_tokens"], _lengths(batch)
        loss = caption_loss(self.textual(grid, tokens, lengths), tokens)
        return TaskOutput(loss=loss, logs={"loss_forward": loss.detach()})

    # -- decoding (used by capvis.models.decoding) ------------------------------------------------
    @torch.no_grad()
    def init_decoding(self, images: Tensor, *, max_len: int | None = None) -> DecodeCache:
        """Run the backbone once and set up the forward head's cache for ``images`` (B, 3, S, S)."""
        grid = self.visual(images)  # (B, C, h, w)
        cache = self.textual.init_cache(grid, max_len=max_len)
        cache.extras["grid_size"] = tuple(grid.shape[-2:])  # to fold attention weights back to (h, w)
        return cache

    def decode_step(self, tokens: Tensor, cache: DecodeCache, *,
                    return_attention: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """One forward-head step: ``tokens`` (B,) -> next-token logits (B, V)."""
        return self.textual.decode_step(tokens, cache, return_attention=return_attention)


@TASKS.register("bicaptioning")
class BicaptioningTask(CaptioningTask):
    """VirTex: forward and backward captioning, losses summed."""

    def __init__(self, visual: VisualBackbone, textual: TextualHead) -> None:
        super().__init__(visual, textual)
        backward = copy.deepcopy(textual)
        backward.visual_projection = textual.visual_projection
        backward.embedding = textual.embedding
        backward.output = textual.output
        self.backward_textual = backward

    def forward(self, batch: dict[str, Tensor]) -> TaskOutput:
        grid = self.visual(batch["image"])  # (B, C, h, w)
        tokens, lengths = batch["caption_tokens"], _lengths(batch)
        loss_f = caption_loss(self.textual(grid, tokens, lengths), tokens)
        reversed_tokens = reverse_captions(tokens, lengths)  # [EOS] wn .. w1 [SOS]
        loss_b = caption_loss(self.backward_textual(grid, reversed_tokens, lengths), reversed_tokens)
        return TaskOutput(loss=loss_f + loss_b,
                          logs={"loss_forward": loss_f.detach(), "loss_backward": loss_b.detach()})
