"""Captioning pretext tasks: ``captioning`` (forward head) and ``bicaptioning`` (VirTex).

Bicaptioning adds a backward head that reads each caption reversed ([EOS] ... [SOS]). The two heads
share ``visual_projection``, ``embedding`` and ``output`` (the same module objects, so the state dict
repeats them under ``backward_textual.*`` exactly as the original checkpoints do); only the
Transformer layers are separate, and both start from identical values.

With ``model.textual.parallel_fraction`` > 0, a seeded share of the samples of every training batch is
trained by *parallel prediction* (CapPa, Tschannen et al. 2023): decoder inputs all [MASK], full
self-attention, same cross-entropy, so each token must be predicted from the image alone. The
choice is a pure function of ``(train.seed, step, image_id)`` (:func:`parallel_rows`), where the step
is the task's ``parallel_steps`` buffer (training steps taken; saved in checkpoints, broadcast by
DDP): the same on every rank and after a resume. Both heads of bicaptioning use the same samples.
Evaluation mode (validation, decoding) is always the plain teacher-forced model.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from capvis.config import Config
from capvis.errors import DataError
from capvis.models.backbones import Backbone, build_visual_for
from capvis.models.textual import DecodeCache, TextualHead
from capvis.tasks.base import TASKS, PretextTask, TaskOutput, caption_lengths, head_sizes
from capvis.tasks.protocols import CaptionHead


def caption_loss(logits: Tensor, tokens: Tensor, padding_idx: int = 0,
                 label_smoothing: float = 0.0) -> Tensor:
    """Mean cross-entropy of ``logits[:, :-1]`` (B, T, V) against ``tokens[:, 1:]``, padding ignored;
    ``label_smoothing`` mixes the one-hot target with a uniform one (0: VirTex's loss, bit for bit)."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), tokens[:, 1:].flatten(),
                           ignore_index=padding_idx, label_smoothing=label_smoothing)


def reverse_captions(tokens: Tensor, lengths: Tensor) -> Tensor:
    """Reverse each row's first ``lengths[i]`` tokens in place of them, keeping right padding (B, T)."""
    t = tokens.shape[1]
    steps = torch.arange(t, device=tokens.device).unsqueeze(0)  # (1, T)
    lengths = lengths.to(tokens.device).unsqueeze(1)  # (B, 1)
    index = (lengths - 1 - steps).clamp(min=0)  # (B, T)
    return torch.where(steps < lengths, tokens.gather(1, index), torch.zeros_like(tokens))


_M32 = 0xFFFFFFFF


def _mix32(x: Tensor) -> Tensor:
    """A bijective 32-bit integer hash on int64 values in [0, 2^32); products stay below 2^59 (no overflow)."""
    x = ((x >> 16) ^ x) * 0x45D9F3B & _M32
    x = ((x >> 16) ^ x) * 0x45D9F3B & _M32
    return (x >> 16) ^ x


def parallel_rows(image_ids: Tensor, step: Tensor | int, *, seed: int, fraction: float) -> Tensor:
    """(B,) bool: the samples trained by parallel prediction at ``step``, each kept with probability
    ``fraction``, as a pure function of ``(seed, step, image id)``: independent of the batch's order, its
    split over ranks and of any RNG state. Integer ops on the ids' device: no host sync."""
    ids = image_ids.long()
    step = torch.as_tensor(step, dtype=torch.long, device=ids.device)
    h = _mix32(torch.full_like(ids, seed & _M32))
    for part in ((seed >> 32) & _M32, step & _M32, (step >> 32) & _M32, ids & _M32, (ids >> 32) & _M32):
        h = _mix32(h ^ part)
    return h < int(fraction * 2**32)


@TASKS.register("captioning")
class CaptioningTask(PretextTask):
    """Forward captioning: predict each caption token from the image and the tokens before it."""

    def __init__(self, visual: Backbone, textual: TextualHead, *, parallel_fraction: float = 0.0,
                 seed: int = 0, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.visual = visual
        self.textual = textual
        self.parallel_fraction, self.seed, self.label_smoothing = parallel_fraction, seed, label_smoothing
        if parallel_fraction > 0:  # off: no buffer, so the state dict stays VirTex's key for key
            self.register_buffer("parallel_steps", torch.zeros((), dtype=torch.long))
        self.register_load_state_dict_pre_hook(_fit_parallel_steps)

    @classmethod
    def from_config(cls, cfg: Config, vocab_size: int) -> "CaptioningTask":
        t = cfg.model.textual
        visual = build_visual_for(cfg)
        textual = TextualHead(visual_features=visual.num_features, vocab_size=vocab_size,
                              **head_sizes(t, cfg.data.max_caption_length))
        return cls(visual, textual, parallel_fraction=t.parallel_fraction, seed=cfg.train.seed,
                   label_smoothing=t.label_smoothing)

    def caption_loss(self, logits: Tensor, tokens: Tensor) -> Tensor:
        """The training loss of one head's teacher-forced ``logits`` for ``tokens`` (its own direction)."""
        return caption_loss(logits, tokens, label_smoothing=self.label_smoothing if self.training else 0.0)

    def select_parallel(self, batch: dict[str, Tensor]) -> Tensor | None:
        """Rows of ``batch`` to train by parallel prediction now (None: none, e.g. in eval mode); advances
        the step. The buffer is restored with the others when the trainer skips a non-finite step."""
        if not (self.training and self.parallel_fraction > 0):
            return None
        if "image_id" not in batch:
            raise DataError("model.textual.parallel_fraction > 0 needs batch['image_id'] to choose samples")
        rows = parallel_rows(batch["image_id"], self.parallel_steps, seed=self.seed,
                             fraction=self.parallel_fraction)
        self.parallel_steps += 1
        return rows

    def forward(self, batch: dict[str, Tensor]) -> TaskOutput:
        grid = self.visual(batch["image"])  # (B, C, h, w)
        tokens, lengths = batch["caption_tokens"], caption_lengths(batch)
        parallel = self.select_parallel(batch)
        loss = self.caption_loss(self.textual(grid, tokens, lengths, parallel=parallel), tokens)
        return TaskOutput(loss=loss, logs=_with_share({"loss_forward": loss.detach()}, parallel))

    def caption_heads(self) -> list[CaptionHead]:
        """The forward head (:class:`~capvis.tasks.protocols.CaptionLikelihoodModel`: likelihood scoring)."""
        return [CaptionHead("forward", self.textual, reverse=False)]

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

    def __init__(self, visual: Backbone, textual: TextualHead, **parallel: Any) -> None:
        super().__init__(visual, textual, **parallel)
        backward = copy.deepcopy(textual)
        backward.visual_projection = textual.visual_projection
        backward.embedding = textual.embedding
        backward.output = textual.output
        self.backward_textual = backward

    def caption_heads(self) -> list[CaptionHead]:
        """Forward and backward heads: a caption's log-likelihood is the sum of both."""
        return [*super().caption_heads(), CaptionHead("backward", self.backward_textual, reverse=True)]

    def forward(self, batch: dict[str, Tensor]) -> TaskOutput:
        grid = self.visual(batch["image"])  # (B, C, h, w)
        tokens, lengths = batch["caption_tokens"], caption_lengths(batch)
        parallel = self.select_parallel(batch)  # the same samples for both heads
        loss_f = self.caption_loss(self.textual(grid, tokens, lengths, parallel=parallel), tokens)
        reversed_tokens = reverse_captions(tokens, lengths)  # [EOS] wn .. w1 [SOS]
        loss_b = self.caption_loss(self.backward_textual(grid, reversed_tokens, lengths, parallel=parallel),
                                   reversed_tokens)
        logs = {"loss_forward": loss_f.detach(), "loss_backward": loss_b.detach()}
        return TaskOutput(loss=loss_f + loss_b, logs=_with_share(logs, parallel))


def _with_share(logs: dict[str, Tensor], parallel: Tensor | None) -> dict[str, Tensor]:
    """Adds ``parallel_share`` (share of the batch trained in parallel) when parallel prediction is on."""
    if parallel is not None:
        logs["parallel_share"] = parallel.float().mean()
    return logs


def _fit_parallel_steps(module: CaptioningTask, state: dict[str, Any], prefix: str, *args: Any) -> None:
    """Weights move between runs with and without parallel prediction (e.g. fine-tuning a CapPa-style
    checkpoint with it off, or a VirTex one with it on): the step counter is dropped or starts at 0."""
    key = prefix + "parallel_steps"
    if hasattr(module, "parallel_steps"):
        state.setdefault(key, torch.zeros((), dtype=torch.long))
    else:
        state.pop(key, None)
