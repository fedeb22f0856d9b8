"""Beam search that shares each image's cross-attention K/V and drops ended hypotheses: same captions and
scores as the decoder it replaced (kept below, verbatim, as the reference), and the cost claims counted."""

from __future__ import annotations

from typing import Sequence

import pytest
import torch
from torch import Tensor, nn

from capvis.config import load_config
from capvis.models.attention import MultiheadAttention
from capvis.models.decoding import (
    BANNED_IDS,
    EOS_ID,
    SOS_ID,
    Decoded,
    _eval_mode,
    _finish,
    beam_search,
    greedy_decode,
)
from capvis.tasks import CaptioningTask, build_task

pytestmark = pytest.mark.usefixtures("one_thread")  # restored after each test (conftest)


# -- the previous implementation (capvis before issue 13), the reference --------------------------------
def _reference_step(model, tokens, cache, attention, banned):
    out = model.decode_step(tokens, cache, return_attention=attention)
    logits, weights = out if attention else (out, None)
    logp = logits.float().log_softmax(dim=-1)  # (N, V)
    banned = [b for b in banned if b < logp.shape[-1]]
    if banned:
        logp[:, banned] = float("-inf")
    return logp, weights


def reference_beam_search(model, images: Tensor, *, beam_size: int = 5, max_steps: int = 30,
                          length_penalty: float = 0.0, sos_id: int = SOS_ID, eos_id: int = EOS_ID,
                          banned_ids: Sequence[int] = BANNED_IDS, return_attention: bool = False,
                          early_stop: bool = True) -> Decoded:
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
            logp, weights = _reference_step(model, tokens, cache, return_attention, banned_ids)
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


# -- a seeded tiny model whose captions end at different steps --------------------------------------------
class EndingModel(nn.Module):
    """A seeded tiny captioning model whose [EOS] logit rises with the position and varies per hypothesis
    (random weights alone end all captions at once or never), so beams end at different steps."""

    def __init__(self, seed: int, ramp: float = 0.3, start: int = 6, vocab: int = 40,
                 max_len: int = 14) -> None:
        super().__init__()
        torch.manual_seed(seed)
        cfg = load_config(None, ["model.task=captioning", "model.backbone=resnet18", "model.small_stem=true",
                                 "model.textual.hidden=32", "model.textual.heads=4", "model.textual.layers=2",
                                 f"data.max_caption_length={max_len}"])
        self.task: CaptioningTask = build_task(cfg, vocab).eval()
        with torch.no_grad():
            for p in self.task.textual.parameters():
                p.normal_(0, 0.3)
        self.ramp, self.start = ramp, start

    def init_decoding(self, images: Tensor, **kwargs):
        return self.task.init_decoding(images, **kwargs)

    def decode_step(self, tokens: Tensor, cache, *, return_attention: bool = False):
        out = self.task.decode_step(tokens, cache, return_attention=return_attention)
        logits = (out[0] if return_attention else out).clone()  # (rows, V), row-wise only
        logits[:, EOS_ID] += self.ramp * (cache.length - self.start) + 3.0 * (logits[:, 7] - logits[:, 8])
        return (logits, out[1]) if return_attention else logits


def images(n: int, seed: int = 1) -> Tensor:
    return torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def assert_same(new: Decoded, ref: Decoded, attention: bool = False) -> None:
    assert new.tokens == ref.tokens
    assert new.finished == ref.finished
    assert new.scores == pytest.approx(ref.scores, abs=1e-5)
    if attention:
        for a, b in zip(new.attention, ref.attention):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("batch, beam, seed",
                         [(1, 5, 6), (3, 5, 8), (8, 5, 6), (6, 3, 8), (5, 1, 6), (8, 2, 5)])
def test_same_captions_and_scores_as_the_previous_decoder(batch, beam, seed) -> None:
    task, x = EndingModel(seed), images(batch, seed=seed)
    new = beam_search(task, x, beam_size=beam, max_steps=12)
    ref = reference_beam_search(task, x, beam_size=beam, max_steps=12)
    assert_same(new, ref)
    forced = reference_beam_search(task, x, beam_size=beam, max_steps=12, early_stop=False)
    assert_same(new, forced)  # the forced reference finds the same: ended hypotheses never change


@pytest.mark.parametrize("seed", [6, 8])
def test_beams_and_images_end_at_different_steps_with_attention_and_penalty(seed) -> None:
    task, x = EndingModel(seed), images(8, seed=seed)
    ref = reference_beam_search(task, x, beam_size=4, max_steps=12, return_attention=True)
    lengths = {len(t) for t, f in zip(ref.tokens, ref.finished) if f}
    assert len(lengths) >= 3 or not all(ref.finished)  # images end at several steps, or some never
    assert_same(beam_search(task, x, beam_size=4, max_steps=12, return_attention=True), ref, attention=True)
    for penalty in (0.6, 1.0):
        assert_same(beam_search(task, x, beam_size=4, max_steps=12, length_penalty=penalty),
                    reference_beam_search(task, x, beam_size=4, max_steps=12, length_penalty=penalty))


def test_cross_attention_kv_once_per_image_and_ended_rows_dropped(monkeypatch) -> None:
    task, x = EndingModel(6), images(6, seed=6)
    cross = {id(layer.multihead_attn) for layer in task.task.textual.transformer.layers}
    projected: list[int] = []  # rows of every cross-attention K/V projection
    real_project = MultiheadAttention.project_kv

    def counting_project(self, inp):
        if id(self) in cross:
            projected.append(inp.shape[0])
        return real_project(self, inp)

    fed: list[tuple[int, int]] = []  # (rows fed, images whose K/V the cache holds) per step
    real_step = task.decode_step

    def counting_step(tokens, cache, **kw):
        fed.append((tokens.shape[0], cache.layers[0].cross_k.shape[0]))
        return real_step(tokens, cache, **kw)

    monkeypatch.setattr(MultiheadAttention, "project_kv", counting_project)
    monkeypatch.setattr(task, "decode_step", counting_step)
    out = beam_search(task, x, beam_size=5, max_steps=12)
    assert projected == [6] * len(cross)  # once per layer, one row per image (not per beam or step)
    assert fed[0] == (6, 6) and all(kv <= 6 for _, kv in fed)  # K/V never copied per beam
    rows = [r for r, _ in fed]
    assert max(rows) <= 6 * 5 and rows[-1] < max(rows)  # ended hypotheses left the batch
    assert fed[-1][1] < 6  # and so did images whose beams all ended
    assert len(fed) < 12 and all(out.finished)  # stopped when every beam ended, before max_steps
    assert out.tokens == reference_beam_search(task, x, beam_size=5, max_steps=12).tokens


def test_the_inference_view_captions_the_same_and_leaves_the_task_alone() -> None:
    """``task.for_inference()`` (what caption commands decode with: backbone BatchNorms folded) gives the
    same beams; the heads are shared, the trained task keeps its own backbone and its mode."""
    model = EndingModel(6)
    task = model.task.train()
    with torch.no_grad():  # running statistics that are not (0, 1), so folding changes the weights
        task.visual(images(8, seed=3) * 2 + 0.5)
    task.eval()
    fast = task.for_inference()
    assert fast.textual is task.textual and fast.visual is not task.visual
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fast.visual.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in task.visual.modules())
    assert any(p.requires_grad for p in task.visual.parameters())
    x = images(5, seed=6)
    ref = beam_search(model, x, beam_size=4, max_steps=12)
    model.task = fast
    assert_same(beam_search(model, x, beam_size=4, max_steps=12), ref)


def _forced_log_prob(model, image: Tensor, tokens: list[int], max_steps: int) -> float:
    """Total log-prob of ``tokens`` (+ [EOS] if it ended before ``max_steps``), fed one at a time."""
    with _eval_mode(model):
        cache = model.init_decoding(image[None], max_len=max_steps)
        fed, total = SOS_ID, 0.0
        targets = tokens + ([EOS_ID] if len(tokens) < max_steps else [])
        for target in targets:
            logp = model.decode_step(torch.tensor([fed]), cache).float().log_softmax(dim=-1)[0]
            logp[list(BANNED_IDS)] = float("-inf")
            total, fed = total + float(logp[target]), target
        return total


@pytest.mark.parametrize("seed", [6, 8])
def test_n_best_returns_the_final_beam_best_first(seed) -> None:
    task, x = EndingModel(seed), images(4, seed=seed)
    plain = beam_search(task, x, beam_size=4, max_steps=12)
    assert plain.alternatives is None
    out = beam_search(task, x, beam_size=4, max_steps=12, n_best=4)
    assert_same(out, plain)
    for i, (alts, scores) in enumerate(zip(out.alternatives, out.alternative_scores)):
        assert 2 <= len(alts) <= 4 and alts[0] == out.tokens[i] and scores[0] == pytest.approx(out.scores[i])
        assert scores == sorted(scores, reverse=True) and len({tuple(a) for a in alts}) == len(alts)
        for tokens, score in zip(alts, scores):
            assert _forced_log_prob(task, x[i], tokens, 12) == pytest.approx(score, abs=1e-4)
    two = beam_search(task, x, beam_size=4, max_steps=12, n_best=2)
    assert two.alternatives == [a[:2] for a in out.alternatives]
    with pytest.raises(Exception, match="n_best"):
        beam_search(task, x, beam_size=2, max_steps=12, n_best=3)


def test_decoding_restores_each_submodules_own_mode() -> None:
    task = EndingModel(6)
    task.train()
    task.task.visual.eval()  # e.g. a backbone kept frozen while the head trains
    beam_search(task, images(2), beam_size=2, max_steps=4)
    assert task.training and task.task.textual.training and not task.task.visual.training
    assert not any(m.training for m in task.task.visual.modules())


def test_results_leave_inference_mode_as_ordinary_tensors() -> None:
    """Decoding runs under ``torch.inference_mode``; the attention maps it returns are ordinary tensors,
    which a caller may scale in place (an inference tensor would refuse) or use with autograd."""
    model, x = EndingModel(6), images(3, seed=6)
    for out in (beam_search(model, x, beam_size=3, max_steps=12, return_attention=True),
                greedy_decode(model, x, max_steps=12, return_attention=True)):
        assert out.attention and not any(torch.is_inference(a) for a in out.attention)
        out.attention[0].mul_(2.0)
    assert not torch.is_inference(next(model.task.parameters()))
