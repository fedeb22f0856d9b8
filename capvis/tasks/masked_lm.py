"""``masked_lm``: image-conditioned masked language modelling with one bidirectional Transformer.

The textual head is VirTex's decoder without the causal mask (:class:`BidirectionalTextualHead`):
tokens attend to every caption token and to the visual grid. BERT-style corruption, vectorised and
applied inside ``forward`` with the global RNG (the trainer seeds it per step, so runs stay exact):

* Candidates are the word positions: never [SOS], [EOS], padding/<unk> or an existing [MASK].
* Per caption, ``round_stochastic(mask_proportion * n)`` of its ``n`` candidates are selected
  uniformly (so the share is ``mask_proportion`` in expectation), and at least one.
* A selected token becomes [MASK] with ``mask_probability``, a random word (never a special id) with
  ``replace_probability``, and stays unchanged otherwise (BERT's 80/10/10, capvis's defaults; the
  original VirTex config uses 85/10/5).

The loss is the cross-entropy at the selected positions only, averaged over them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from capvis.config import Config, config_section
from capvis.data.tokenizer import MASK_ID
from capvis.errors import ConfigError
from capvis.models.backbones import Backbone, build_visual_for
from capvis.models.text_encoder import BidirectionalTextualHead
from capvis.tasks.base import TASKS, PretextTask, TaskOutput, caption_lengths, head_sizes

IGNORE_INDEX = -100
FIRST_WORD_ID = MASK_ID + 1  # the special ids (<unk>/padding, [SOS], [EOS], [MASK]) come first


@config_section("masked_lm")
@dataclass(frozen=True)
class MaskedLMConfig:
    """``model.masked_lm``: the BERT-style corruption (masked_lm, icmlm)."""

    mask_proportion: float = 0.15
    mask_probability: float = 0.80  # of the selected tokens, replaced by [MASK]
    replace_probability: float = 0.10  # of the selected tokens, replaced by a random token


def mask_tokens(tokens: Tensor, lengths: Tensor, *, vocab_size: int, mask_proportion: float = 0.15,
                mask_probability: float = 0.8, replace_probability: float = 0.1,
                generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """BERT-style corruption of right-padded captions.

    Args:
        tokens: (B, T) ids, [SOS] w1 .. wn [EOS], padded with 0.
        lengths: (B,) non-pad counts.

    Returns:
        ``(inputs, targets)``, both (B, T): the corrupted ids, and the original id at selected
        positions with :data:`IGNORE_INDEX` everywhere else.
    """
    device = tokens.device
    b, t = tokens.shape
    positions = torch.arange(t, device=device)
    candidate = (positions < lengths.to(device).unsqueeze(1)) & (tokens >= FIRST_WORD_ID)  # (B, T)
    n = candidate.sum(dim=1)  # (B,)
    u = torch.rand(b, 2 * t + 1, device=device, generator=generator)  # one draw for every decision below
    k = torch.floor(mask_proportion * n + u[:, -1]).long().clamp(min=1)  # stochastic rounding, at least one
    k = torch.minimum(k, n)
    scores = u[:, :t].masked_fill(~candidate, 2.0)  # non-candidates sort last
    ranks = scores.argsort(dim=1).argsort(dim=1)  # (B, T) rank of each position among its row
    selected = candidate & (ranks < k.unsqueeze(1))
    action = u[:, t: 2 * t]  # (B, T): < p_mask -> [MASK]; < p_mask + p_replace -> random word; else keep
    to_mask = selected & (action < mask_probability)
    to_replace = selected & (action >= mask_probability) & (action < mask_probability + replace_probability)
    inputs = tokens.masked_fill(to_mask, MASK_ID)
    if vocab_size > FIRST_WORD_ID:
        random_words = torch.randint(FIRST_WORD_ID, vocab_size, (b, t), device=device, generator=generator)
        inputs = torch.where(to_replace, random_words, inputs)
    targets = tokens.masked_fill(~selected, IGNORE_INDEX)
    return inputs, targets


def masked_lm_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean cross-entropy of (B, T, V) ``logits`` at the positions where ``targets`` is not ignored."""
    if not bool((targets != IGNORE_INDEX).any()):
        return logits.sum() * 0.0  # nothing to predict (captions without words): zero, graph kept
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX)


def check_masking(m: MaskedLMConfig) -> None:
    if not 0 < m.mask_proportion <= 1:
        raise ConfigError(f"model.masked_lm.mask_proportion must be in (0, 1], got {m.mask_proportion}")
    if m.mask_probability < 0 or m.replace_probability < 0 or m.mask_probability + m.replace_probability > 1:
        raise ConfigError("model.masked_lm.mask_probability and replace_probability must be >= 0 and sum to <= 1")


@TASKS.register("masked_lm")
class MaskedLMTask(PretextTask):
    """Predict masked caption tokens from the rest of the caption and the image."""

    def __init__(self, visual: Backbone, textual: BidirectionalTextualHead, masking: MaskedLMConfig) -> None:
        super().__init__()
        check_masking(masking)
        self.visual = visual
        self.textual = textual
        self.masking = masking

    @classmethod
    def from_config(cls, cfg: Config, vocab_size: int) -> "MaskedLMTask":
        t = cfg.model.textual
        visual = build_visual_for(cfg)
        textual = BidirectionalTextualHead(visual_features=visual.num_features, vocab_size=vocab_size,
                                           **head_sizes(t, cfg.data.max_caption_length))
        return cls(visual, textual, cfg.model.masked_lm)

    def mask(self, tokens: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        m = self.masking
        return mask_tokens(tokens, lengths, vocab_size=self.textual.vocab_size, mask_proportion=m.mask_proportion,
                           mask_probability=m.mask_probability, replace_probability=m.replace_probability)

    def forward(self, batch: dict[str, Tensor]) -> TaskOutput:
        tokens = batch["caption_tokens"]
        lengths = caption_lengths(batch)
        inputs, targets = self.mask(tokens, lengths)
        logits = self.textual(self.visual(batch["image"]), inputs, lengths)  # (B, T, V)
        loss = masked_lm_loss(logits, targets)
        selected = targets != IGNORE_INDEX
        accuracy = (logits.argmax(-1) == targets)[selected].float().mean() if selected.any() else loss.new_zeros(())
        return TaskOutput(loss=loss, logs={"loss_mlm": loss.detach(), "mlm_accuracy": accuracy.detach()})


__all__ = ["IGNORE_INDEX", "MaskedLMTask", "mask_tokens", "masked_lm_loss"]
