"""Bidirectional Transformers over caption tokens, on the SDPA attention of :mod:`capvis.models.attention`.

Two modules:

* :class:`BidirectionalTextualHead` is VirTex's textual head without the causal mask: every token sees
  every (non-pad) token and the visual grid. The masked-LM task uses it; its state-dict keys are those
  of :class:`~capvis.models.textual.TextualHead` (``textual.*``), as in the original masked-LM model.
* :class:`TextEncoder` is text only (self-attention and feed-forward, no cross-attention), with the
  parameter names of :class:`torch.nn.TransformerEncoderLayer`. The contrastive task trains one; ICMLM
  uses one frozen, loaded from a contrastive checkpoint or from the text side of a masked-LM head
  (:meth:`TextEncoder.state_from_masked_lm`).
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from capvis.models.attention import MultiheadAttention
from capvis.models.dropout import Dropout
from capvis.models.textual import TextualHead, TransformerStack, WordAndPositionalEmbedding, _init_weights


def key_padding_mask(tokens: Tensor, lengths: Tensor | None, padding_idx: int = 0) -> Tensor:
    """(B, 1, 1, T) boolean SDPA mask, True where a key may be attended (position < length).

    Position 0 is always allowed, so that no query row is left without a key (empty captions).
    """
    t = tokens.shape[1]
    if lengths is None:
        keep = tokens != padding_idx
    else:
        keep = torch.arange(t, device=tokens.device) < lengths.to(tokens.device).unsqueeze(1)
    keep[:, 0] = True
    return keep[:, None, None, :]


class BidirectionalTextualHead(TextualHead):
    """The textual head with bidirectional self-attention (the masked-LM head of VirTex's Table 1)."""

    def forward(self, visual_grid: Tensor, tokens: Tensor, lengths: Tensor | None = None, *,
                return_attention: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """Logits (B, T, V) for every position of ``tokens`` (B, T), given the grid (B, C, h, w)."""
        if tokens.shape[1] > self.max_len:
            raise ValueError(f"captions of {tokens.shape[1]} tokens exceed the {self.max_len} learned positions")
        memory = self.project_visual(visual_grid)  # (B, S, H)
        mask = key_padding_mask(tokens, lengths, self.padding_idx)  # (B, 1, 1, T)
        x = self.embedding(tokens)  # (B, T, H)
        weights = None
        for layer in self.transformer.layers:
            x, weights = layer(x, memory, attn_mask=mask, need_weights=return_attention)
        logits = self._logits(x)
        return (logits, weights) if return_attention else logits


class TransformerEncoderLayer(nn.Module):
    """Self-attention and GELU feed-forward; post-norm by default, ``norm_first`` for pre-norm."""

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int, *, dropout: float = 0.1,
                 norm_first: bool = False, layer_norm_eps: float = 1e-5) -> None:
        super().__init__()
        self.norm_first = norm_first
        self.self_attn = MultiheadAttention(d_model, nhead, dropout=dropout)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model, eps=layer_norm_eps)
        self.norm2 = nn.LayerNorm(d_model, eps=layer_norm_eps)
        self.dropout1 = Dropout(dropout)
        self.dropout2 = Dropout(dropout)

    def forward(self, x: Tensor, *, attn_mask: Tensor | None = None) -> Tensor:
        """(B, T, E) -> (B, T, E); ``attn_mask`` (B, 1, 1|T, T) True where a key may be attended."""
        if self.norm_first:
            x = x + self._sa(self.norm1(x), attn_mask)
            return x + self._ff(self.norm2(x))
        x = self.norm1(x + self._sa(x, attn_mask))
        return self.norm2(x + self._ff(x))

    def _sa(self, x: Tensor, attn_mask: Tensor | None) -> Tensor:
        attn = self.self_attn
        k, v = attn.project_kv(x)
        out, _ = attn.attend(attn.project_q(x), k, v, attn_mask=attn_mask)
        return self.dropout1(out)

    def _ff(self, x: Tensor) -> Tensor:
        return self.dropout2(self.linear2(self.dropout(F.gelu(self.linear1(x)))))


class TextEncoder(nn.Module):
    """Word + position embedding and bidirectional encoder layers: tokens (B, T) -> states (B, T, H).

    Keys: ``embedding.{words,positions,layer_norm}``, ``transformer.layers.N.*`` and, for pre-norm,
    ``transformer.norm``. Initialisation as the textual head (N(0, 0.02), zero biases).
    """

    def __init__(self, *, vocab_size: int, hidden: int, layers: int = 1, heads: int = 0, feedforward: int = 0,
                 dropout: float = 0.1, norm_first: bool = False, max_len: int = 30, padding_idx: int = 0) -> None:
        super().__init__()
        heads = heads or hidden // 64
        self.vocab_size, self.hidden, self.max_len, self.padding_idx = vocab_size, hidden, max_len, padding_idx
        self.embedding = WordAndPositionalEmbedding(vocab_size, hidden, max_len=max_len, dropout=dropout,
                                                    padding_idx=padding_idx)
        blocks = [TransformerEncoderLayer(hidden, heads, feedforward or 4 * hidden, dropout=dropout,
                                          norm_first=norm_first) for _ in range(layers)]
        self.transformer = TransformerStack(blocks, nn.LayerNorm(hidden) if norm_first else None)
        self.apply(_init_weights)
        with torch.no_grad():
            self.embedding.words.weight[padding_idx].zero_()

    def forward(self, tokens: Tensor, lengths: Tensor | None = None) -> Tensor:
        """Contextual states (B, T, H) of right-padded ``tokens`` (B, T); pads are never attended."""
        if tokens.shape[1] > self.max_len:
            raise ValueError(f"captions of {tokens.shape[1]} tokens exceed the {self.max_len} learned positions")
        mask = key_padding_mask(tokens, lengths, self.padding_idx)  # (B, 1, 1, T)
        x = self.embedding(tokens)
        for layer in self.transformer.layers:
            x = layer(x, attn_mask=mask)
        return self.transformer.norm(x) if self.transformer.norm is not None else x

    @staticmethod
    def state_from_masked_lm(head_state: dict[str, Tensor]) -> dict[str, Tensor]:
        """A TextEncoder state dict from a masked-LM head's (keys without the ``textual.`` prefix).

        The text side of a decoder layer is its self-attention and feed-forward: ``self_attn``,
        ``linear1/2``, ``norm1`` (after self-attention) and ``norm3`` (after the feed-forward, here
        ``norm2``). Cross-attention (``multihead_attn``, ``norm2``) is dropped, as are
        ``visual_projection`` and ``output``.
        """
        out: dict[str, Tensor] = {}
        layer_key = re.compile(r"^transformer\.layers\.(\d+)\.(.+)$")
        for key, value in head_state.items():
            if key.startswith("embedding.") or key.startswith("transformer.norm."):
                out[key] = value
                continue
            match = layer_key.match(key)
            if not match:
                continue
            index, rest = match.groups()
            if rest.startswith("multihead_attn.") or rest.startswith("norm2."):
                continue
            rest = "norm2." + rest[len("norm3."):] if rest.startswith("norm3.") else rest
            out[f"transformer.layers.{index}.{rest}"] = value
        return out


def pool_text(states: Tensor, lengths: Tensor, mode: str = "eos") -> Tensor:
    """(B, T, H) states -> (B, H): the last non-pad token's state ([EOS], or the last word of a
    truncated caption) for ``eos``, the mean over non-pad tokens for ``mean``."""
    lengths = lengths.to(states.device).clamp(min=1)
    if mode == "eos":
        index = (lengths - 1).view(-1, 1, 1).expand(-1, 1, states.shape[-1])  # (B, 1, H)
        return states.gather(1, index).squeeze(1)
    if mode == "mean":
        keep = (torch.arange(states.shape[1], device=states.device) < lengths.unsqueeze(1)).to(states.dtype)
        return (states * keep.unsqueeze(-1)).sum(1) / keep.sum(1, keepdim=True)
    raise ValueError(f"unknown text pooling {mode!r}; use eos or mean")
