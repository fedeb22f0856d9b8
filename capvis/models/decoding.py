"""Caption decoding: greedy, beam search and nucleus sampling, batched over images, with a KV cache.

Works on any captioning task (the forward head): the model exposes ``init_decoding(images, max_len=)``
-> :class:`~capvis.models.textual.DecodeCache` and ``decode_step(tokens, cache, return_attention=)``
-> logits (B, V), so each step feeds one token per hypothesis instead of the whole prefix.

Every step feeds the whole hypothesis including [SOS] at position 0 (the original beam search drops
[SOS] after the first step, shifting positions against training). Tokens in ``banned_ids`` (padding
/<unk>, [SOS], [MASK]) are never generated. Results carry token ids *without* [SOS] and *without*
[EOS]; ``scores`` are total log-probabilities of the emitted tokens, [EOS] included when emitted.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Protocol, Sequence

import torch
from torch import Tensor, nn

from capvis.errors import ConfigError
from capvis.models.textual import DecodeCache

SOS_ID, EOS_ID = 1, 2
BANNED_IDS = (0, 1, 3)  # <unk>/padding, [SOS], [MASK]


class Decodable(Protocol):
    def init_decoding(self, images: Tensor, *, max_len: int | None = None) -> DecodeCache: ...

    def decode_step(self, tokens: Tensor, cache: DecodeCache, *, return_attention: bool = False) -> Any: ...


@dataclass
class Decoded:
    tokens: list[list[int]]  # per image, no [SOS], no [EOS]
    scores: list[float]  # total log-prob of the emitted tokens ([EOS] included when emitted)
    finished: list[bool]  # whether the caption ended with [EOS] within max_steps
    attention: list[Tensor] | None = None  # per image (len(tokens), h, w): cross-attention for each word


@contextlib.contextmanager
def _eval_mode(model: Any) -> Iterator[None]:
    was_training = isinstance(model, nn.Module) and model.training
    if was_training:
        model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        if was_training:
            model.train()


def _step(model: Decodable, tokens: Tensor, cache: DecodeCache, attention: bool,
          banned: Sequence[int]) -> tuple[Tensor, Tensor | None]:
    out = model.decode_step(tokens, cache, return_attention=attention)
    logits, weights = out if attention else (out, None)
    logp = logits.float().log_softmax(dim=-1)  # (N, V)
    banned = [b for b in banned if b < logp.shape[-1]]
    if banned:
        logp[:, banned] = float("-inf")
    return logp, weights


def _finish(history: Tensor, scores: Tensor, eos_id: int, attn: Tensor | None,
            grid: tuple[int, int] | None) -> Decoded:
    """``history`` (B, steps) emitted ids (EOS-padded after the end), ``attn`` (B, steps, S)."""
    tokens, finished, maps = [], [], [] if attn is not None else None
    for i, row in enumerate(history.tolist()):
        n = row.index(eos_id) if eos_id in row else len(row)
        tokens.append(row[:n])
        finished.append(n < len(row))
        if maps is not None:
            a = attn[i, :n].float().cpu()
            maps.append(a.view(n, *grid) if grid else a)
    return Decoded(tokens=tokens, scores=scores.tolist(), finished=finished, attention=maps)


def greedy_decode(model: Decodable, images: Tensor, *, max_steps: int = 30, sos_id: int = SOS_ID,
                  eos_id: int = EOS_ID, banned_ids: Sequence[int] = BANNED_IDS,
                  return_attention: bool = False, early_stop: bool = True) -> Decoded:
    """Most likely next token at every step (images (B, 3, S, S))."""
    return _token_by_token(model, images, lambda logp: logp.argmax(dim=-1), max_steps=max_steps,
                           sos_id=sos_id, eos_id=eos_id, banned_ids=banned_ids,
                           return_attention=return_attention, early_stop=early_stop)


def _token_by_token(model: Decodable, images: Tensor, choose: Callable[[Tensor], Tensor], *,
                    max_steps: int, sos_id: int, eos_id: int, banned_ids: Sequence[int],
                    return_attention: bool, early_stop: bool) -> Decoded:
    """One hypothesis per image; ``choose`` maps log-probs (B, V) to the next ids (B,)."""
    with _eval_mode(model):
        cache = model.init_decoding(images, max_len=max_steps)
        b = cache.batch_size
        tokens = torch.full((b,), sos_id, dtype=torch.long, device=images.device)
        scores = torch.zeros(b, device=images.device)
        finished = torch.zeros(b, dtype=torch.bool, device=images.device)
        history, attn = [], []
        for _ in range(cache.max_len):
            logp, weights = _step(model, tokens, cache, return_attention, banned_ids)
            tokens = torch.where(finished, eos_id, choose(logp))  # finished rows keep emitting EOS
            scores += torch.where(finished, 0.0, logp.gather(1, tokens[:, None])[:, 0])
            finished |= tokens == eos_id
            history.append(tokens)
            if weights is not None:
                attn.append(weights)
            if early_stop and bool(finished.all()):
                break
        att = torch.stack(attn, 1) if return_attention else None
        return _finish(torch.stack(history, 1), scores, eos_id, att, cache.extras.get("grid_size"))


def beam_search(model: Decodable, images: Tensor, *, beam_size: int = 5, max_steps: int = 30,
                length_penalty: float = 0.0, sos_id: int = SOS_ID, eos_id: int = EOS_ID,
                banned_ids: Sequence[int] = BANNED_IDS, return_attention: bool = False,
                early_stop: bool = True) -> Decoded:
    """Beam search: every hypothesis may expand to any of its ``beam_size`` best tokens.

    Finished hypotheses stay in the beam with their score frozen; the search stops once every beam
    of every image has emitted [EOS] (or after ``max_steps``). The best hypothesis is the one with the
    highest total log-prob, divided by ``len ** length_penalty`` (0: off, as in VirTex) when set.
    """
    with _eval_mode(model):
        cache = model.init_decoding(images, max_len=max_steps)
        b, k, dev = cache.batch_size, beam_size, images.device
        cache.reorder(torch.arange(b, device=dev).repeat_interleave(k), memory=True)  # (B*K) rows
        scores = torch.full((b, k), float("-inf"), device=dev)
        scores[:, 0] = 0.0  # one live hypothesis per image at the start
        finished = torch.zeros(b, k, dtype=torch.bool, device=dev)
        history = torch.empty(b * k, 0, dtype=torch.long, device=dev)
        attn = None
        tokens = torch.full((b * k,), sos_id, dtype=torch.long, device=dev)
        offsets = (torch.arange(b, device=dev) * k).unsqueeze(1)  # (B, 1)
        for _ in range(cache.max_len):
            logp, weights = _step(model, tokens, cache, return_attention, banned_ids)
            v = logp.shape[-1]
            eos_only = torch.full((v,), float("-inf"), device=dev)
            eos_only[eos_id] = 0.0
            logp = torch.where(finished.view(-1, 1), eos_only, logp).view(b, k, v)
            top, index = (scores.unsqueeze(-1) + logp).view(b, k * v).topk(k, dim=1)  # (B, K)
            rows = (index // v + offsets).view(-1)  # parent hypothesis of each survivor
            new = (index % v).view(-1)
            cache.reorder(rows)
            history = torch.cat([history[rows], new[:, None]], dim=1)
            if weights is not None:
                step_attn = weights[rows].unsqueeze(1)
                attn = step_attn if attn is None else torch.cat([attn[rows], step_attn], dim=1)
            finished = finished.view(-1)[rows].view(b, k) | (new == eos_id).view(b, k) | top.isinf()
            scores, tokens = top, new
            if early_stop and bool(finished.all()):
                break
        ranked = scores
        if length_penalty:
            n = (history != eos_id).sum(1) + (history == eos_id).any(1).long()  # tokens incl. first EOS
            ranked = scores / n.clamp(min=1).view(b, k).float() ** length_penalty
        best = ranked.argmax(dim=1) + offsets[:, 0]  # (B,)
        att = attn[best] if attn is not None else None
        return _finish(history[best], scores.view(-1)[best], eos_id, att, cache.extras.get("grid_size"))


def nucleus_sample(model: Decodable, images: Tensor, *, top_p: float = 0.9, max_steps: int = 30,
                   sos_id: int = SOS_ID, eos_id: int = EOS_ID, banned_ids: Sequence[int] = BANNED_IDS,
                   generator: torch.Generator | None = None, return_attention: bool = False,
                   early_stop: bool = True) -> Decoded:
    """Top-p sampling: sample from the smallest set of tokens whose probability reaches ``top_p``
    (the token that crosses the threshold is kept)."""
    def choose(logp: Tensor) -> Tensor:
        probs, order = logp.exp().sort(dim=-1, descending=True)  # (B, V)
        probs = probs.masked_fill(probs.cumsum(-1) - probs >= top_p, 0.0)
        return order.gather(1, torch.multinomial(probs, 1, generator=generator))[:, 0]

    return _token_by_token(model, images, choose, max_steps=max_steps, sos_id=sos_id, eos_id=eos_id,
                           banned_ids=banned_ids, return_attention=return_attention, early_stop=early_stop)


DECODERS = {"beam": beam_search, "greedy": greedy_decode, "nucleus": nucleus_sample}


def decode(model: Decodable, images: Tensor, *, method: str = "beam", **kwargs: Any) -> Decoded:
    """Dispatch by name: ``beam`` (default, beam 5), ``greedy`` or ``nucleus`` (top-p 0.9)."""
    if method not in DECODERS:
        raise ConfigError(f"unknown decoding method {method!r}; known: {', '.join(DECODERS)}")
    return DECODERS[method](model, images, **kwargs)
