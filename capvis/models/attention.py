"""A Transformer decoder layer on ``scaled_dot_product_attention``, with a key/value cache.

Parameter names and shapes are those of :class:`torch.nn.TransformerDecoderLayer`
(``self_attn.in_proj_weight``, ``multihead_attn.out_proj.bias``, ``linear1``, ``norm3``, ...), so the
original VirTex checkpoints load key for key, and in eval mode the output equals that layer's.

Masks follow the SDPA convention: a boolean ``attn_mask`` is True where a query MAY attend.
"""

from __future__ import annotations

import math
from collections.abc import Callable
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
        """One query per row, (R, heads, d), over per-image keys (B, heads, S, d): row r is slot
        ``slots[r]`` of a (B, group) grid (beam search: the beams of an image share its keys, uncopied).

        Returns ((R, E), (R, S) weights or None); empty slots of the grid cost only attention, and a
        full grid (every slot a row, as while no beam has ended) is not scattered at all.
        """
        b, h, _, d = k.shape
        full = q.shape[0] == b * group  # slots are ascending and distinct: then they are 0 .. R-1
        grid = q if full else q.new_zeros(b * group, h, d).index_copy_(0, slots, q)  # (B*G, heads, d)
        grid = grid.view(b, group, h, d).transpose(1, 2)  # (B, heads, G, d): an image's beams as its queries
        out, weights = self._attention(grid, k, v, need_weights=need_weights)
        out, weights = out.reshape(b * group, -1), weights.reshape(b * group, -1) if need_weights else None
        if not full:
            out = out.index_select(0, slots)
            weights = weights.index_select(0, slots) if weights is not None else None
        return self.out_proj(out), weights

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

    self_kv: Tensor  # (B, max_len, 2E): row r's keys [..., :E] and values [..., E:], filled up to DecodeCache.length
    cross_k: Tensor  # (B, heads, S, d), computed once per image
    cross_v: Tensor
    slots: Tensor | None = None  # (R,) beam rows: row r is slot slots[r] of a (B, group) grid (None: row = image)
    group: int = 1

    def reorder(self, index: Tensor, *, memory: bool, length: int) -> None:
        """Select rows ``index`` (B',); only the first ``length`` positions of the self-attention K/V are
        copied, the rest are written before they are read."""
        kv = self.self_kv.new_empty(len(index), *self.self_kv.shape[1:])
        torch.index_select(self.self_kv[:, :length], 0, index, out=kv[:, :length])
        self.self_kv = kv
        if memory:
            self.cross_k = self.cross_k.index_select(0, index)
            self.cross_v = self.cross_v.index_select(0, index)

    def regroup(self, rows: Tensor, slots: Tensor, group: int, images: Tensor | None, length: int) -> None:
        """Keep self-attention rows ``rows`` (their first ``length`` positions), now at ``slots`` of a
        (B', group) grid over the images kept by ``images`` (None: all), whose cross-attention K/V stay
        one copy per image."""
        self.reorder(rows, memory=False, length=length)
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

    def forward(self, x: Tensor, memory: Tensor, *, attn_mask: Tensor | None = None, is_causal: bool = False,
                need_weights: bool = False) -> tuple[Tensor, Tensor | None]:
        """``x`` (B, T, E) caption states, ``memory`` (B, S, E) visual tokens -> ((B, T, E), cross weights)."""
        return self._block(x, lambda y: self._sa(y, attn_mask, is_causal),
                           lambda y: self._ca(y, memory, need_weights), self._ff)

    def step(self, x: Tensor, cache: LayerCache, position: int, *,
             need_weights: bool = False) -> tuple[Tensor, Tensor | None]:
        """One decoding step: ``x`` (R, E), one token per row at ``position`` -> ((R, E), (R, S) weights).

        The same operations as :meth:`forward` on 2-D rows, in eval mode (no dropout), with fewer calls
        per step: a small head's decoding is bound by per-call cost, not arithmetic. Its self-attention
        K/V are written into the cache; the visual tokens come from the cache's cross-attention K/V.
        """
        return self._block(x, lambda y: self._sa_step(y, cache, position),
                           lambda y: self._ca_step(y, cache, need_weights),
                           lambda y: self.linear2(F.gelu(self.linear1(y))))

    def _block(self, x: Tensor, sa: Callable[[Tensor], Tensor], ca: Callable[[Tensor], tuple[Tensor, Tensor | None]],
               ff: Callable[[Tensor], Tensor]) -> tuple[Tensor, Tensor | None]:
        """Residuals and norms around the three sublayers: pre-norm or post-norm (VirTex)."""
        if self.norm_first:
            x = x + sa(self.norm1(x))
            h, weights = ca(self.norm2(x))
            x = x + h
            return x + ff(self.norm3(x)), weights
        x = self.norm1(x + sa(x))
        h, weights = ca(x)
        x = self.norm2(x + h)
        return self.norm3(x + ff(x)), weights

    def _sa(self, x: Tensor, attn_mask: Tensor | None, is_causal: bool) -> Tensor:
        attn = self.self_attn
        q = attn.project_q(x)  # before k/v: the order autograd sums x's gradients in, so runs repeat bit for bit
        k, v = attn.project_kv(x)
        out, _ = attn.attend(q, k, v, attn_mask=attn_mask, is_causal=is_causal)
        return self.dropout1(out)

    def _ca(self, x: Tensor, memory: Tensor, need_weights: bool) -> tuple[Tensor, Tensor | None]:
        attn = self.multihead_attn
        k, v = attn.project_kv(memory)
        out, weights = attn.attend(attn.project_q(x), k, v, need_weights=need_weights)
        return self.dropout2(out), weights

    def _ff(self, x: Tensor) -> Tensor:
        return self.dropout3(self.linear2(self.dropout(F.gelu(self.linear1(x)))))

    def _sa_step(self, x: Tensor, cache: LayerCache, position: int) -> Tensor:
        """The new token's q/k/v in one product; it may see every cached position, itself included."""
        attn, (r, e), h = self.self_attn, x.shape, self.self_attn.num_heads
        qkv = F.linear(x, attn.in_proj_weight, attn.in_proj_bias)  # (R, 3E)
        cache.self_kv[:, position] = qkv[:, e:]
        kv = cache.self_kv[:, : position + 1]  # (R, t, 2E)
        k = kv[..., :e].view(r, position + 1, h, -1).transpose(1, 2)  # (R, heads, t, d)
        v = kv[..., e:].view(r, position + 1, h, -1).transpose(1, 2)
        out = F.scaled_dot_product_attention(qkv[:, :e].view(r, h, 1, -1), k, v)  # (R, heads, 1, d)
        return attn.out_proj(out.view(r, e))

    def _ca_step(self, x: Tensor, cache: LayerCache, need_weights: bool) -> tuple[Tensor, Tensor | None]:
        attn, (r, e) = self.multihead_attn, x.shape
        q = F.linear(x, attn.in_proj_weight[:e], attn.in_proj_bias[:e]).view(r, attn.num_heads, -1)  # (R, heads, d)
        if cache.slots is not None:  # beam rows sharing their image's K/V
            return attn.attend_slots(q, cache.cross_k, cache.cross_v, cache.slots, cache.group,
                                     need_weights=need_weights)
        out, weights = attn.attend(q.unsqueeze(2), cache.cross_k, cache.cross_v, need_weights=need_weights)
        return out.view(r, e), weights.view(r, -1) if weights is not None else None

    def new_cache(self, memory: Tensor, max_len: int) -> LayerCache:
        """An empty cache for ``max_len`` tokens, with the cross-attention K/V of ``memory`` (B, S, E)."""
        cross_k, cross_v = self.multihead_attn.project_kv(memory)
        b, _, e = memory.shape
        return LayerCache(self_kv=memory.new_zeros(b, max_len, 2 * e), cross_k=cross_k, cross_v=cross_v)
