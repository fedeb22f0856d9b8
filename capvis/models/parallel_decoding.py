"""Parallel decoding (CapPa): a whole caption from one forward pass, no token-by-token loop.

The forward head reads ``length`` [MASK] tokens with full (non-causal) self-attention, the input a
model trained with ``model.textual.parallel_fraction`` > 0 sees for its parallel samples; the caption
is the most likely token at every position, cut at the first [EOS]. Any captioning task works (it
exposes ``visual`` and ``textual``), but only a model trained with parallel prediction gives captions
worth reading. Results follow :class:`~capvis.models.decoding.Decoded`: ids without [SOS] and [EOS],
``scores`` the total log-probability of the emitted tokens ([EOS] included when emitted), tokens in
``banned_ids`` never emitted.
"""

from __future__ import annotations

from typing import Protocol, Sequence

import torch
from torch import Tensor, nn

from capvis.data.tokenizer import EOS_ID, MASK_ID
from capvis.models.decoding import BANNED_IDS, Decoded
from capvis.models.textual import TextualHead


class ParallelDecodable(Protocol):
    visual: nn.Module
    textual: TextualHead

    def eval(self) -> nn.Module: ...


def parallel_logits(model: ParallelDecodable, images: Tensor, *, length: int,
                    return_attention: bool = False) -> tuple[Tensor, Tensor | None, tuple[int, int]]:
    """Logits (B, length, V) of all-[MASK] inputs under full attention, the last layer's cross-attention
    (B, length, h*w) when asked, and the grid size (h, w)."""
    grid = model.visual(images)  # (B, C, h, w)
    b = grid.shape[0]
    tokens = torch.full((b, length), MASK_ID, dtype=torch.long, device=grid.device)
    lengths = torch.full((b,), length, dtype=torch.long, device=grid.device)
    parallel = torch.ones(b, dtype=torch.bool, device=grid.device)
    out = model.textual(grid, tokens, lengths, parallel=parallel, return_attention=return_attention)
    logits, weights = out if return_attention else (out, None)
    return logits, weights, (grid.shape[-2], grid.shape[-1])


def parallel_decode(model: ParallelDecodable, images: Tensor, *, max_steps: int = 30, eos_id: int = EOS_ID,
                    banned_ids: Sequence[int] = BANNED_IDS, return_attention: bool = False) -> Decoded:
    """Caption ``images`` (B, 3, S, S) in one pass over ``min(max_steps, learned positions)`` [MASK]s."""
    was_training = isinstance(model, nn.Module) and model.training
    model.eval()
    try:
        with torch.no_grad():
            length = min(max_steps, model.textual.max_len)
            logits, weights, grid = parallel_logits(model, images, length=length,
                                                    return_attention=return_attention)
    finally:
        if was_training:
            model.train()
    logp = logits.float().log_softmax(dim=-1)  # (B, T, V)
    banned = [i for i in banned_ids if i < logp.shape[-1]]
    if banned:
        logp[..., banned] = float("-inf")
    ids = logp.argmax(dim=-1)  # (B, T)
    is_eos = ids == eos_id
    finished = is_eos.any(dim=1)
    n = torch.where(finished, is_eos.long().argmax(dim=1), length)  # tokens before the first [EOS]
    emitted = torch.arange(length, device=ids.device) <= n.unsqueeze(1)  # (B, T), [EOS] included
    scores = torch.where(emitted, logp.gather(2, ids.unsqueeze(2))[..., 0], 0.0).sum(dim=1)
    counts = n.tolist()
    tokens = [row[:k] for row, k in zip(ids.tolist(), counts)]
    maps = None
    if weights is not None:
        maps = [weights[i, :k].float().cpu().view(k, *grid) for i, k in enumerate(counts)]
    return Decoded(tokens=tokens, scores=scores.tolist(), finished=finished.tolist(), attention=maps)
