"""``log p(caption | image)`` of (image, caption) pairs under a captioning model, batched, with the KV cache.

What zero-shot classification by likelihood (CapPa's scoring classifier) and likelihood retrieval
share. For every head of the task (:class:`~capvis.tasks.protocols.CaptionLikelihoodModel`: the forward
head, and the backward one of bicaptioning, which reads the caption reversed) the visual memory's
cross-attention keys and values are computed once per image (``TextualHead.init_cache``) and shared
by every caption scored against that image; the captions are then fed one position at a time, all
pairs of a chunk together (``decode_step``), and the log-probability of each next token is summed.
The token rule is ``capvis score``'s: every token after the first up to and including the last,
targets with id 0 (padding, ``<unk>``) not scored, so ``-log_likelihood / tokens`` of a caption equals
its ``nll_forward`` (+ ``nll_backward``) there.
"""

from __future__ import annotations

import copy
from typing import Sequence

import torch
from torch import Tensor

from capvis.data.tokenizer import EOS_ID, PAD_ID, SOS_ID, Tokenizer, normalize_caption
from capvis.errors import ConfigError
from capvis.models.textual import DecodeCache
from capvis.tasks.protocols import CaptionLikelihoodModel

MAX_ROWS = 2048  # (image, caption) pairs decoded together


def check_likelihood_model(task: object, what: str) -> CaptionLikelihoodModel:
    """ConfigError unless ``task`` has captioning heads to score with."""
    if not isinstance(task, CaptionLikelihoodModel):
        raise ConfigError(f"{what} by likelihood needs a captioning model (captioning, bicaptioning, coca); "
                          f"this checkpoint's model is {type(task).__name__}, which has no captioning head")
    return task


def tokenize(tokenizer: Tokenizer, texts: Sequence[str], max_len: int) -> tuple[Tensor, Tensor]:
    """Texts -> right-padded (N, T) [SOS] ids [EOS] (cut to ``max_len`` as in training) and lengths (N,)."""
    return pack_captions([tokenizer.encode(normalize_caption(t)) for t in texts], max_len)


def pack_captions(captions: Sequence[Sequence[int]], max_len: int) -> tuple[Tensor, Tensor]:
    """Token ids (no [SOS]/[EOS]) -> right-padded (N, T) [SOS] ids [EOS] (cut to ``max_len``) and lengths (N,)."""
    rows = [[SOS_ID, *ids, EOS_ID][:max_len] for ids in captions]
    lengths = torch.tensor([len(r) for r in rows], dtype=torch.long)
    tokens = torch.full((len(rows), int(lengths.max()) if rows else 1), PAD_ID, dtype=torch.long)
    for i, r in enumerate(rows):
        tokens[i, : len(r)] = torch.tensor(r)
    return tokens, lengths


def _expand(cache: DecodeCache, images: Tensor) -> DecodeCache:
    """A new cache whose row r attends to image ``images[r]``'s cross-attention K/V (``cache`` untouched)."""
    out = DecodeCache([copy.copy(layer) for layer in cache.layers], max_len=cache.max_len)
    out.reorder(images, memory=True)
    return out


@torch.no_grad()
def pair_log_likelihood(task: CaptionLikelihoodModel, grid: Tensor, tokens: Tensor, lengths: Tensor,
                        image_index: Tensor, text_index: Tensor, *, max_rows: int = MAX_ROWS) -> tuple[Tensor, Tensor]:
    """Summed log-likelihood (R,) of caption ``tokens[text_index[r]]`` given grid ``grid[image_index[r]]``
    over every head, and the number of scored tokens per head (R,).

    ``grid`` (B, C, h, w) is the backbone output of B images, ``tokens`` (N, T) / ``lengths`` (N,) the
    captions; the task must be in eval mode.
    """
    from capvis.tasks.captioning import reverse_captions

    device = grid.device
    tokens, lengths = tokens.to(device), lengths.to(device)
    image_index, text_index = image_index.to(device), text_index.to(device)
    total = torch.zeros(len(image_index), dtype=torch.float64, device=device)
    t = tokens.shape[1]
    counts = (tokens[:, 1:] != PAD_ID).sum(dim=1)[text_index]  # (R,)
    for head in task.caption_heads():
        ids = reverse_captions(tokens, lengths) if head.reverse else tokens  # [EOS] .. [SOS] when reversed
        base = head.module.init_cache(grid, max_len=t)  # cross-attention K/V once per image
        for start in range(0, len(image_index), max_rows):
            rows = slice(start, start + max_rows)
            cache, seq = _expand(base, image_index[rows]), ids[text_index[rows]]  # (r, T)
            for step in range(t - 1):
                logp = head.module.decode_step(seq[:, step], cache).float().log_softmax(dim=-1)  # (r, V)
                target = seq[:, step + 1]
                picked = logp.gather(1, target[:, None])[:, 0]
                total[rows] += torch.where(target != PAD_ID, picked, 0.0).double()
    return total, counts
