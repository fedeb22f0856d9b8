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
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Protocol, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from capvis.data.tokenizer import EOS_ID, MASK_ID, PAD_ID, SOS_ID
from capvis.errors import ConfigError
from capvis.models.textual import DecodeCache

BANNED_IDS = (PAD_ID, SOS_ID, MASK_ID)  # never generated: <unk>/padding, [SOS], [MASK]


class Decodable(Protocol):
    def init_decoding(self, images: Tensor, *, max_len: int | None = None) -> DecodeCache: ...

    def decode_step(self, tokens: Tensor, cache: DecodeCache, *, return_attention: bool = False) -> Any: ...


@dataclass
class Decoded:
    tokens: list[list[int]]  # per image, no [SOS], no [EOS]
    scores: list[float]  # total log-prob of the emitted tokens ([EOS] included when emitted)
    finished: list[bool]  # whether the caption ended with [EOS] within max_steps
    attention: list[Tensor] | None = None  # per image (len(tokens), h, w): cross-attention for each word
    alternatives: list[list[list[int]]] | None = None  # beam search with n_best > 1: per image, best first
    alternative_scores: list[list[float]] | None = None  # their scores (as ranked, length penalty included)


@contextlib.contextmanager
def _eval_mode(model: Any) -> Iterator[None]:
    """Eval mode and inference mode inside (no autograd bookkeeping: ~10% of a small head's decoding
    step); afterwards every submodule is back in its own mode (a fine-tuning model's frozen BatchNorms
    stay in eval mode). What leaves it goes through :func:`_released`."""
    training = [m for m in model.modules() if m.training] if isinstance(model, nn.Module) else []
    for module in training:  # only these change (a backbone has hundreds of modules, ~1 ms a batch)
        module.training = False
    try:
        with torch.inference_mode():
            yield
    finally:
        for module in training:
            module.training = True


def _released(decoded: Decoded) -> Decoded:
    """Outside inference mode: attention maps as ordinary tensors, which callers may change in place."""
    if decoded.attention is not None:
        decoded.attention = [a.clone() for a in decoded.attention]
    return decoded


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
        decoded = _finish(torch.stack(history, 1), scores, eos_id, att, cache.extras.get("grid_size"))
    return _released(decoded)


def beam_search(model: Decodable, images: Tensor, *, beam_size: int = 5, max_steps: int = 30,
                length_penalty: float = 0.0, sos_id: int = SOS_ID, eos_id: int = EOS_ID,
                banned_ids: Sequence[int] = BANNED_IDS, return_attention: bool = False,
                early_stop: bool = True, n_best: int = 1) -> Decoded:
    """Beam search: every hypothesis may expand to any of its ``beam_size`` best tokens.

    Finished hypotheses stay in the beam with their score frozen. The best hypothesis is the one with
    the highest total log-prob, divided by ``len ** length_penalty`` (0: off, as in VirTex) when set.
    ``n_best`` > 1 also returns each image's final beam, best first (``Decoded.alternatives``: the
    ``n_best`` highest-ranked hypotheses, for re-ranking them with another model or head).

    Cost: the backbone and every layer's cross-attention K/V run once per image and are shared by its
    beams (one copy per image, not per beam). Each step feeds only the live hypotheses: a finished
    beam, a beam left without a finite candidate and an image whose beams all ended leave the batch,
    and the search stops once none is left (or after ``max_steps``). Inside the model step nothing
    waits for the device; the bookkeeping between steps syncs once (the live count, which sets the
    next batch's shape). A finished hypothesis never changes, so ``early_stop`` does not change the
    result; it is kept for the other decoders' signature.
    """
    if not 1 <= n_best <= beam_size:
        raise ConfigError(f"n_best={n_best} must be between 1 and the beam size ({beam_size})")
    with _eval_mode(model):
        cache = model.init_decoding(images, max_len=max_steps)
        beams = _Beams.start(cache.batch_size, beam_size, images.device, sos_id, n_best)
        cache.regroup(torch.arange(cache.batch_size, device=images.device), beams.slots, beam_size)  # beam 0
        ban = None
        for _ in range(cache.max_len):
            out = model.decode_step(beams.tokens, cache, return_attention=return_attention)
            logits, weights = out if return_attention else (out, None)
            logp = logits.float().log_softmax(dim=-1)  # (R, V) live rows only
            if ban is None:
                ban = _banned_mask(banned_ids, logp.shape[-1], logp.device)
            rows, images_kept = beams.advance(logp.masked_fill_(ban, float("-inf")), weights, eos_id,
                                              length_penalty)
            if rows is None:
                break
            cache.regroup(rows, beams.slots, beam_size, images_kept)
        decoded = beams.result(eos_id, length_penalty, cache.extras.get("grid_size"))
    return _released(decoded)


def _banned_mask(banned: Sequence[int], v: int, device: torch.device) -> Tensor:
    mask = torch.zeros(v, dtype=torch.bool)
    mask[[b for b in banned if b < v]] = True
    return mask.to(device)


@dataclass
class _Beams:
    """Beam-search state of the A images still searching (K beams each, A*K slots), and the results of
    the finished images. Slots are image-major; the R live hypotheses are ``slots`` (ascending), in
    the order of the model's rows."""

    k: int
    image: Tensor  # (A,) index into the input batch
    scores: Tensor  # (A, K) total log-probs; -inf: no hypothesis in that slot
    ended: Tensor  # (A, K) bool: finished (or empty) slots, no longer fed to the model
    history: Tensor  # (A*K, t) emitted ids
    slots: Tensor  # (R,) live slots
    tokens: Tensor  # (R,) last ids of the live slots
    attn: Tensor | None = None  # (A*K, t, S) cross-attention of each emitted token
    done: list = field(default_factory=list)  # (image, history, score, attention) of finished images
    n_best: int = 1
    ranked: list = field(default_factory=list)  # (n_best histories (n, nb, t), their scores) of finished images

    @classmethod
    def start(cls, b: int, k: int, device: torch.device, sos_id: int, n_best: int = 1) -> "_Beams":
        scores = torch.full((b, k), float("-inf"), device=device)
        scores[:, 0] = 0.0  # one hypothesis per image at the start
        slots = torch.arange(b, device=device) * k
        return cls(k=k, image=torch.arange(b, device=device), scores=scores, ended=scores.isinf(),
                   history=torch.empty(b * k, 0, dtype=torch.long, device=device), slots=slots,
                   tokens=torch.full((b,), sos_id, dtype=torch.long, device=device), n_best=n_best)

    def advance(self, logp: Tensor, weights: Tensor | None, eos_id: int, length_penalty: float
                ) -> tuple[Tensor | None, Tensor | None]:
        """One step from the live rows' log-probs (R, V). Returns the cache rows to keep (each new live
        hypothesis's parent row) and the images kept (None: all), or ``(None, None)`` when all ended."""
        a, k, v = self.scores.shape[0], self.k, logp.shape[-1]
        flat = self.scores.view(-1)
        full = len(self.slots) == a * k  # every slot live (so none ended): rows are the slots, in order
        if full:
            cand = logp.add_(flat[:, None])
        else:
            cand = flat.new_full((a * k, v), float("-inf"))  # a finished slot's one candidate: itself + [EOS]
            cand[:, eos_id] = torch.where(self.ended.view(-1), flat, float("-inf"))
            cand.index_copy_(0, self.slots, logp.add_(flat[self.slots, None]))
        top, index = cand.view(a, k * v).topk(k, dim=1)  # (A, K)
        parent = (index // v + torch.arange(a, device=top.device).unsqueeze(1) * k).view(-1)  # (A*K,)
        new = (index % v).view(-1)
        self.ended = self.ended.view(-1)[parent].view(a, k) | (new == eos_id).view(a, k) | top.isinf()
        self.scores = top
        self.history = torch.cat([self.history[parent], new[:, None]], dim=1)
        if weights is not None:
            step = weights.new_zeros(a * k, weights.shape[-1]).index_copy_(0, self.slots, weights)  # (A*K, S)
            step = step[parent].unsqueeze(1)
            self.attn = step if self.attn is None else torch.cat([self.attn[parent], step], dim=1)
        live, searching = ~self.ended.view(-1), ~self.ended.all(dim=1)
        n_live, n_searching = torch.stack([live.sum(), searching.sum()]).tolist()  # the one sync per step
        new_slots = torch.nonzero_static(live, size=n_live)[:, 0]
        rows = parent[new_slots]  # a live hypothesis's parent was live: its slot, and with a full grid its row
        if not full:
            row_of_slot = torch.full((a * k,), -1, dtype=torch.long, device=top.device)
            row_of_slot[self.slots] = torch.arange(len(self.slots), device=top.device)
            rows = row_of_slot[rows]
        self.tokens = new[new_slots]
        kept = None
        if n_searching < a:
            self._store(torch.nonzero_static(~searching, size=a - n_searching)[:, 0], eos_id, length_penalty)
            if n_searching == 0:
                self.image = self.image[:0]
                return None, None
            kept = torch.nonzero_static(searching, size=n_searching)[:, 0]
            position = torch.full((a,), -1, dtype=torch.long, device=top.device)
            position[kept] = torch.arange(n_searching, device=top.device)
            new_slots = position[new_slots // k] * k + new_slots % k
            kept_slots = (kept.unsqueeze(1) * k + torch.arange(k, device=top.device)).view(-1)
            self.image, self.scores, self.ended = self.image[kept], self.scores[kept], self.ended[kept]
            self.history = self.history[kept_slots]
            self.attn = self.attn[kept_slots] if self.attn is not None else None
        self.slots = new_slots
        return rows, kept

    def _store(self, which: Tensor, eos_id: int, length_penalty: float) -> None:
        """Keep the best hypothesis of images ``which`` (positions among the A searching)."""
        k = self.k
        scores = self.scores[which]  # (n, K)
        slots = (which.unsqueeze(1) * k + torch.arange(k, device=which.device)).view(-1)
        ranked = scores
        if length_penalty:
            hist = self.history[slots]
            n = (hist != eos_id).sum(1) + (hist == eos_id).any(1).long()  # tokens incl. first EOS
            ranked = scores / n.clamp(min=1).view(-1, k).float() ** length_penalty
        best = ranked.argmax(dim=1)  # (n,)
        rows = which * k + best
        attn = self.attn[rows] if self.attn is not None else None
        self.done.append((self.image[which], self.history[rows], scores.gather(1, best[:, None])[:, 0], attn))
        if self.n_best > 1:  # a stable sort keeps argmax's choice among ties first
            order = ranked.argsort(dim=1, descending=True, stable=True)[:, : self.n_best]  # (n, nb)
            self.ranked.append((self.history[(which.unsqueeze(1) * k + order).view(-1)].view(*order.shape, -1),
                                ranked.gather(1, order)))

    def result(self, eos_id: int, length_penalty: float, grid: tuple[int, int] | None) -> Decoded:
        if len(self.image):  # still searching after max_steps
            self._store(torch.arange(len(self.image), device=self.image.device), eos_id, length_penalty)
        steps = max(h.shape[1] for _, h, _, _ in self.done)
        image = torch.cat([i for i, _, _, _ in self.done])
        history = torch.cat([F.pad(h, (0, steps - h.shape[1]), value=eos_id) for _, h, _, _ in self.done])
        scores = torch.cat([s for _, _, s, _ in self.done])
        order = image.argsort()
        attn = None
        if self.done[0][3] is not None:
            attn = torch.cat([F.pad(a, (0, 0, 0, steps - a.shape[1])) for *_, a in self.done])[order]
        decoded = _finish(history[order], scores[order], eos_id, attn, grid)
        if self.ranked:
            decoded.alternatives, decoded.alternative_scores = self._alternatives(order, steps, eos_id)
        return decoded

    def _alternatives(self, order: Tensor, steps: int, eos_id: int) -> tuple[list, list]:
        """Per image (in input order), its ``n_best`` hypotheses without [EOS], and their ranking scores;
        empty slots (-inf) are left out."""
        history = torch.cat([F.pad(h, (0, steps - h.shape[2]), value=eos_id) for h, _ in self.ranked])[order]
        scores = torch.cat([s for _, s in self.ranked])[order]
        tokens, kept = [], []
        for rows, row_scores in zip(history.tolist(), scores.tolist()):
            pairs = [(r[: r.index(eos_id)] if eos_id in r else r, sc) for r, sc in zip(rows, row_scores)
                     if sc != float("-inf")]
            tokens.append([t for t, _ in pairs])
            kept.append([sc for _, sc in pairs])
        return tokens, kept


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


def _parallel(model: Any, images: Tensor, **kwargs: Any) -> Decoded:
    from capvis.models.parallel_decoding import parallel_decode  # it imports this module

    return parallel_decode(model, images, **kwargs)


DECODERS = {"beam": beam_search, "greedy": greedy_decode, "nucleus": nucleus_sample, "parallel": _parallel}


def decode(model: Decodable, images: Tensor, *, method: str = "beam", **kwargs: Any) -> Decoded:
    """Dispatch by name: ``beam`` (default, beam 5), ``greedy``, ``nucleus`` (top-p 0.9) or ``parallel``
    (one pass over [MASK] inputs, :mod:`capvis.models.parallel_decoding`)."""
    if method not in DECODERS:
        raise ConfigError(f"unknown decoding method {method!r}; known: {', '.join(DECODERS)}")
    return DECODERS[method](model, images, **kwargs)
