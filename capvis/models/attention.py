"""A Transformer decoder layer on ``scaled_dot_product_attention``, with a key/value cache.

Parameter names and shapes are those of :class:`torch.nn.TransformerDecoderLayer`
(``self_attn.in_proj_weight``, ``multihead_attn.out_proj.bias``, ``linear1``, ``norm3``, ...), so the
original VirTex checkpoints load key for key, and in eval mode the output equals that layer's.

Masks follow the SDPA convention: a boolean ``attn_mask`` is True where a query MAY attend.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from capvis.models.dropout import Dropout


class MultiheadAttention(nn.Module):
    """Multi-head attention with ``nn.MultiheadAttention``'s parameter layout (packed in-projection)."""

    def __init__(self, embed_dim: int, num_heads: int, *, dropout: float = 0.0) -> None:
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim={embed_dim} is not divisible by num_heads={num_heads}")
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.dropout = dropout
        self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dim, embed_dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * embed_dim))
        self.out_proj = nn.Linear(embed_dim, embed_dim)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def _heads(self, x: Tensor) -> Tensor:
        b, t, _ = x.shape
        return x.view(b, t, self.num_heads, -1).transpose(1, 2)  # (B, heads, T, d)

    def project_q(self, x: Tensor) -> Tensor:
        e = self.embed_dim
        return self._heads(F.linear(x, self.in_proj_weight[:e], self.in_proj_bias[:e]))

    def project_kv(self, x: Tensor) -> tuple[Tensor, Tensor]:
        e = self.embed_dim
        kv = F.linear(x, self.in_proj_weight[e:], self.in_proj_bias[e:])  # (B, S, 2E)
        k, v = kv.chunk(2, dim=-1)
        return self._heads(k), self._heads(v)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, *, attn_mask: Tensor | None = None,
               is_causal: bool = False, need_weights: bool = False) -> tuple[Tensor, Tensor | None]:
        """Attention of (B, heads, T, d) queries over (B, heads, S, d) keys -> ((B, T, E), weights).

        ``weights`` (B, T, S), averaged over heads, is computed (on a slower explicit path) only
        when ``need_weights`` is set.
        """
        out, weights = self._attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal,
                                       need_weights=need_weights)
        return self.out_proj(out), weights

    def attend_slots(self, q: Tensor, k: Tensor, v: Tensor, slots: Tensor, group: int, *,
                     need_weights: bool = False) -> tuple[Tensor, Tensor | None]:
        """One query per row, (R, heads, 1, d), over per-image keys (B, heads, S, d): row r is slot
        ``slots[r]`` of a (B, group) grid (beam search: the beams of an image share its keys, uncopied).

        Returns ((R, 1, E), (R, 1, S) weights or None); empty slots of the grid cost only attention.
        """
        b, h, _, d = k.shape
        grid = q.new_zeros(b * group, h, d).index_copy_(0, slots, q[:, :, 0])  # (B*G, heads, d)
        grid = grid.view(b, group, h, d).transpose(1, 2)  # (B, heads, G, d): an image's beams as its queries
        out, weights = self._attention(grid, k, v, need_weights=need_weights)
        out = self.out_proj(out.reshape(b * group, -1).index_select(0, slots)).unsqueeze(1)  # (R, 1, E)
        if weights is not None:
            weights = weights.reshape(b * group, -1).index_select(0, slots).unsqueeze(1)  # (R, 1, S)
        return out, weights

    def _attention(self, q: Tensor, k: Tensor, v: Tensor, *, attn_mask: Tensor | None = None,
                   is_causal: bool = False, need_weights: bool = False) -> tuple[Tensor, Tensor | None]:
        """``attend`` before the output projection: ((B, T, E), weights)."""
        p = self.dropout if self.training else 0.0
        weights = None
        if need_weights:
            scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])  # (B, heads, T, S)
            if is_causal:
                t, s = scores.shape[-2:]
                attn_mask = torch.ones(t, s, dtype=torch.bool, device=q.device).tril()
            if attn_mask is not None:
                scores = scores.masked_fill(~attn_mask, float("-inf"))
            probs = scores.float().softmax(dim=-1).to(q.dtype)
            weights = probs.mean(dim=1)
            out = F.dropout(probs, p, training=self.training) @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=p,
                                                 is_causal=is_causal and attn_mask is None)
        b, _, t, _ = out.shape
        return out.transpose(1, 2).reshape(b, t, self.embed_dim), weights  # (B, T, E)


@dataclass
class LayerCache:
    """Per-layer decoding state: self-attention K/V of the tokens so far, cross-attention K/V."""

    self_k: Tensor  # (B, heads, max_len, d), filled up to DecodeCache.length
    self_v: Tensor
    cross_k: Tensor  # (B, heads, S, d), computed once per image
    cross_v: Tensor
    slots: Tensor | None = None  # (R,) beam rows: row r is slot slots[r] of a (B, group) grid (None: row = image)
    group: int = 1

    def reorder(self, index: Tensor, *, memory: bool) -> None:
        self.self_k = self.self_k.index_select(0, index)
        self.self_v = self.self_v.index_select(0, index)
        if memory:
            self.cross_k = self.cross_k.index_select(0, index)
            self.cross_v = self.cross_v.index_select(0, index)

    def regroup(self, rows: Tensor, slots: Tensor, group: int, images: Tensor | None) -> None:
        """Keep self-attention rows ``rows``, now at ``slots`` of a (B', group) grid over the images
        kept by ``images`` (None: all), whose cross-attention K/V stay one copy per image."""
        self.reorder(rows, memory=False)
        self.slots, self.group = slots, group
        if images is not None:
            self.cross_k = self.cross_k.index_select(0, images)
            self.cross_v = self.cross_v.index_select(0, images)


class TransformerDecoderLayer(nn.Module):
    """Self-attention (causal), cross-attention over visual tokens, GELU feed-forward.

    Post-norm by default (as VirTex); ``norm_first=True`` gives the pre-norm variant.
    """

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int, *, dropout: float = 0.1,
                 norm_first: bool = False, layer_norm_eps: float = 1e-5) -> None:
        super().__init__()
        self.norm_first = norm_first
        self.self_attn = MultiheadAttention(d_model, nhead, dropout=dropout)
        self.multihead_attn = MultiheadAttention(d_model, nhead, dropout=dropout)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model, eps=layer_norm_eps)
        self.norm2 = nn.LayerNorm(d_model, eps=layer_norm_eps)
        self.norm3 = nn.LayerNorm(d_model, eps=layer_norm_eps)
        self.dropout1 = Dropout(dropout)
        self.dropout2 = Dropout(dropout)
        self.dropout3 = Dropout(dropout)

    def forward(self, x: Tensor, memory: Tensor | None = None, *, attn_mask: Tensor | None = None,
                is_causal: bool = False, need_weights: bool = False, cache: LayerCache | None = None,
                position: int = 0) -> tuple[Tensor, Tensor | None]:
        """``x`` (B, T, E) caption states, ``memory`` (B, S, E) visual tokens -> ((B, T, E), cross weights).

        With ``cache`` the layer runs one decoding step: ``x`` is (B, 1, E) at ``position``, its
        self-attention K/V are written into the cache and ``memory`` is not needed.
        """
        if self.norm_first:
            x = x + self._sa(self.norm1(x), attn_mask, is_causal, cache, position)
            h, weights = self._ca(self.norm2(x), memory, need_weights, cache)
            x = x + h
            x = x + self._ff(self.norm3(x))
        else:
            x = self.norm1(x + self._sa(x, attn_mask, is_causal, cache, position))
            h, weights = self._ca(x, memory, need_weights, cache)
            x = self.norm2(x + h)
            x = self.norm3(x + self._ff(x))
        return x, weights

    def _sa(self, x: Tensor, attn_mask: Tensor | None, is_causal: bool, cache: LayerCache | None,
            position: int) -> Tensor:
        attn = self.self_attn
        q = attn.project_q(x)
        k, v = attn.project_kv(x)
        if cache is not None:  # one new token: it may see every cached position, itself included
            cache.self_k[:, :, position] = k[:, :, 0]
            cache.self_v[:, :, position] = v[:, :, 0]
            k, v = cache.self_k[:, :, : position + 1], cache.self_v[:, :, : position + 1]
            attn_mask, is_causal = None, False
        out, _ = attn.attend(q, k, v, attn_mask=attn_mask, is_causal=is_causal)
        return self.dropout1(out)

    def _ca(self, x: Tensor, memory: Tensor | None, need_weights: bool,
            cache: LayerCache | None) -> tuple[Tensor, Tensor | None]:
        attn = self.multihead_attn
        if cache is not None and cache.slots is not None:  # beam rows sharing their image's K/V
            out, weights = attn.attend_slots(attn.project_q(x), cache.cross_k, cache.cross_v, cache.slots,
                                             cache.group, need_weights=need_weights)
            return self.dropout2(out), weights
        k, v = (cache.cross_k, cache.cross_v) if cache is not None else attn.project_kv(memory)
        out, weights = attn.attend(attn.project_q(x), k, v, need_weights=need_weights)
        return self.dropout2(out), weights

    def _ff(self, x: Tensor) -> Tensor:
        return self.dropout3(self.linear2(self.dropout(F.gelu(self.linear1(x)))))

    def new_cache(self, memory: Tensor, max_len: int) -> LayerCache:
        """An empty cache for ``max_len`` tokens, with the cross-attention K/V of ``memory`` (B, S, E)."""
        cross_k, cross_v = self.multihead_attn.project_kv(memory)
        b, h, _, d = cross_k.shape
        empty = cross_k.new_zeros(b, h, max_len, d)
        return LayerCache(self_k=empty, self_v=empty.clone(), cross_k=cross_k, cross_v=cross_v)
