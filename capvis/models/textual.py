"""The VirTex textual head: a Transformer decoder over caption tokens, attending to the visual grid.

Layout (and so state-dict keys) follows the original: ``visual_projection``, ``embedding.{words,
positions,layer_norm}``, ``transformer.layers.N.*`` (plus ``transformer.norm`` for pre-norm) and
``output`` whose weight IS ``embedding.words.weight``.

Initialisation: N(0, 0.02) for Linear weights, attention projections and both embeddings (padding row
zeroed); every bias starts at zero. The original leaves Linear biases (visual_projection, linear1/2,
output) at PyTorch's uniform default although its docstring says zero; capvis does what the docstring
says, which is the usual BERT-style init and makes the initial logits independent of the bias draw.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from capvis.data.tokenizer import MASK_ID
from capvis.models.attention import LayerCache, MultiheadAttention, TransformerDecoderLayer
from capvis.models.checkpointing import checkpointed, wants_checkpoint
from capvis.models.dropout import Dropout


class WordAndPositionalEmbedding(nn.Module):
    """Word + learned absolute position embedding, LayerNorm, dropout; padding positions zeroed."""

    def __init__(self, vocab_size: int, hidden: int, *, max_len: int = 30, dropout: float = 0.1,
                 padding_idx: int = 0) -> None:
        super().__init__()
        self.padding_idx = padding_idx
        self.words = nn.Embedding(vocab_size, hidden, padding_idx=padding_idx)
        self.positions = nn.Embedding(max_len, hidden)
        self.layer_norm = nn.LayerNorm(hidden, eps=1e-8)
        self.dropout = Dropout(dropout)

    def forward(self, tokens: Tensor, start: int = 0) -> Tensor:
        """``tokens`` (B, T) at positions ``start .. start+T-1`` -> (B, T, H)."""
        positions = torch.arange(start, start + tokens.shape[1], device=tokens.device)
        x = self.dropout(self.layer_norm(self.words(tokens) + self.positions(positions)))
        return x * (tokens != self.padding_idx).unsqueeze(-1).to(x.dtype)

    def step(self, tokens: Tensor, position: int) -> Tensor:
        """One token per row at ``position``, (B,) -> (B, H), as :meth:`forward` in eval mode: the
        decoding step's embedding: two row lookups instead of two embedding modules and a position range."""
        x = self.layer_norm(self.words.weight[tokens] + self.positions.weight[position])
        return x * (tokens != self.padding_idx).unsqueeze(-1).to(x.dtype)


class TransformerStack(nn.Module):
    """``layers`` (ModuleList) and, for pre-norm, a final ``norm``: keys ``transformer.layers.N.*``."""

    def __init__(self, layers: list[TransformerDecoderLayer], norm: nn.LayerNorm | None) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.norm = norm


@dataclass
class DecodeCache:
    """Incremental decoding state for a batch of (image, hypothesis) rows."""

    layers: list[LayerCache]
    length: int = 0  # tokens fed so far = position of the next token
    max_len: int = 30
    extras: dict = field(default_factory=dict)

    @property
    def batch_size(self) -> int:
        return self.layers[0].self_kv.shape[0]

    def reorder(self, index: Tensor, *, memory: bool = False) -> None:
        """Select rows (B',) of the cache, e.g. the parent beams. Cross-attention K/V are reordered only
        with ``memory=True``; beam search reorders within an image, whose K/V rows are identical."""
        for layer in self.layers:
            layer.reorder(index, memory=memory, length=self.length)

    def regroup(self, rows: Tensor, slots: Tensor, group: int, images: Tensor | None = None) -> None:
        """Beam search: keep rows ``rows`` (B',) of the self-attention cache; row r is now beam slot
        ``slots[r]`` of a (images, group) grid and attends to its image's cross-attention K/V, one copy
        per image (``images`` keeps a subset of them, e.g. drops the finished ones)."""
        for layer in self.layers:
            layer.regroup(rows, slots, group, images, self.length)


class TextualHead(nn.Module):
    """Caption decoder of VirTex (paper Section 3, "Textual Head")."""

    activation_checkpointing: bool = False  # recompute each layer in backward (model.activation_checkpointing)

    def __init__(self, *, visual_features: int, vocab_size: int, hidden: int = 2048, layers: int = 1,
                 heads: int = 0, feedforward: int = 0, dropout: float = 0.1, norm_first: bool = False,
                 max_len: int = 30, padding_idx: int = 0) -> None:
        super().__init__()
        heads = heads or hidden // 64
        feedforward = feedforward or 4 * hidden
        self.vocab_size, self.hidden = vocab_size, hidden
        self.max_len, self.padding_idx = max_len, padding_idx
        self.visual_projection = nn.Linear(visual_features, hidden)
        self.embedding = WordAndPositionalEmbedding(vocab_size, hidden, max_len=max_len, dropout=dropout,
                                                    padding_idx=padding_idx)
        blocks = [TransformerDecoderLayer(hidden, heads, feedforward, dropout=dropout, norm_first=norm_first)
                  for _ in range(layers)]
        self.transformer = TransformerStack(blocks, nn.LayerNorm(hidden) if norm_first else None)
        self.output = nn.Linear(hidden, vocab_size)
        self.apply(_init_weights)
        self.output.weight = self.embedding.words.weight  # tied; the output keeps its own bias
        with torch.no_grad():
            self.embedding.words.weight[padding_idx].zero_()

    def project_visual(self, visual_grid: Tensor) -> Tensor:
        """(B, C, h, w) grid (any memory format) -> (B, h*w, H) visual tokens, no positional encoding."""
        return self.visual_projection(visual_grid.permute(0, 2, 3, 1).flatten(1, 2))

    def forward(self, visual_grid: Tensor, tokens: Tensor, lengths: Tensor | None = None, *,
                parallel: Tensor | None = None,
                return_attention: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """Teacher-forced logits.

        Args:
            visual_grid: (B, C, h, w) backbone output.
            tokens: (B, T) right-padded caption ids, [SOS] first.
            lengths: (B,) non-pad counts; positions >= length are masked as attention keys
                (default: derived from ``tokens != padding_idx``).
            parallel: (B,) bool, rows to run as *parallel prediction* (CapPa): their caption positions
                are fed [MASK] and attend to each other in both directions (padding stays padding and
                masked), so every token must come from the image alone. ``None``: all causal.
            return_attention: also return the last layer's cross-attention (B, T, h*w), head-averaged.

        Returns:
            logits (B, T, V): position t predicts token t+1 from tokens <= t (from the image and the
            caption length alone in ``parallel`` rows).
        """
        t = tokens.shape[1]
        if t > self.max_len:
            raise ValueError(f"captions of {t} tokens exceed the {self.max_len} learned positions")
        memory = self.project_visual(visual_grid)  # (B, S, H)
        if lengths is None:
            keep = tokens != self.padding_idx
        else:
            keep = torch.arange(t, device=tokens.device) < lengths.to(tokens.device).unsqueeze(1)
        keep[:, 0] = True  # never leave a query row with no key (empty captions)
        causal = torch.ones(t, t, dtype=torch.bool, device=tokens.device).tril()
        if parallel is not None:
            rows = parallel.to(tokens.device).unsqueeze(1)  # (B, 1)
            tokens = torch.where(rows & keep, MASK_ID, tokens)  # (B, T)
            causal = causal | rows.unsqueeze(2)  # (B, T, T): full attention in parallel rows
        mask = (causal & keep[:, None, :]).unsqueeze(1)  # (B, 1, T, T)
        x = self.embedding(tokens)
        weights = None
        run = checkpointed if wants_checkpoint(self) else (lambda block, *a, **k: block(*a, **k))
        for layer in self.transformer.layers:
            x, weights = run(layer, x, memory, attn_mask=mask, need_weights=return_attention)
        logits = self._logits(x)
        return (logits, weights) if return_attention else logits

    def _logits(self, x: Tensor) -> Tensor:
        if self.transformer.norm is not None:
            x = self.transformer.norm(x)
        return self.output(x)

    @torch.no_grad()
    def init_cache(self, visual_grid: Tensor, *, max_len: int | None = None) -> DecodeCache:
        """Project the grid and precompute every layer's cross-attention K/V once per image."""
        memory = self.project_visual(visual_grid)
        max_len = min(max_len or self.max_len, self.max_len)
        return DecodeCache([layer.new_cache(memory, max_len) for layer in self.transformer.layers],
                           max_len=max_len)

    @torch.no_grad()
    def decode_step(self, tokens: Tensor, cache: DecodeCache, *,
                    return_attention: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """Feed one token per row at position ``cache.length``; returns next-token logits (B, V).

        Costs one token, not the prefix: earlier self-attention K/V come from the cache. With
        ``return_attention`` also returns the last layer's cross-attention (B, S), head-averaged.
        """
        if cache.length >= cache.max_len:
            raise ValueError(f"decoding past the {cache.max_len} learned positions")
        x = self.embedding.step(tokens, cache.length)  # (B, H)
        weights = None
        for layer, layer_cache in zip(self.transformer.layers, cache.layers):
            x, weights = layer.step(x, layer_cache, cache.length, need_weights=return_attention)
        cache.length += 1
        logits = self._logits(x)
        return (logits, weights) if return_attention else logits


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, MultiheadAttention):
        nn.init.normal_(module.in_proj_weight, std=0.02)
        nn.init.zeros_(module.in_proj_bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, std=0.02)
        if module.padding_idx is not None:
            with torch.no_grad():
                module.weight[module.padding_idx].zero_()
