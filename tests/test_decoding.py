"""Decoding: beam 1 == greedy, beam search finds the exhaustive optimum, nucleus, batching, attention."""

from __future__ import annotations

import itertools

import pytest
import torch

from capvis.config import load_config
from capvis.errors import ConfigError
from capvis.models.decoding import BANNED_IDS, beam_search, decode, greedy_decode, nucleus_sample
from capvis.tasks import CaptioningTask, build_task

pytestmark = pytest.mark.usefixtures("one_thread")  # restored after each test (conftest)

EOS = 2


def tiny_task(vocab: int = 30, seed: int = 0, std: float = 0.3, max_len: int = 12) -> CaptioningTask:
    """A random captioning model with peaky-but-not-degenerate next-token distributions."""
    torch.manual_seed(seed)
    cfg = load_config(None, ["model.task=captioning", "model.backbone=resnet18", "model.small_stem=true",
                             "model.textual.hidden=32", "model.textual.heads=4", "model.textual.layers=2",
                             f"data.max_caption_length={max_len}"])
    task = build_task(cfg, vocab).eval()
    with torch.no_grad():
        for p in task.textual.parameters():
            p.normal_(0, std)
    return task


def images(n: int = 3, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def test_beam_one_equals_greedy() -> None:
    task, x = tiny_task(), images(4)
    greedy = greedy_decode(task, x, max_steps=10)
    beam = beam_search(task, x, beam_size=1, max_steps=10)
    assert beam.tokens == greedy.tokens
    assert beam.finished == greedy.finished
    assert beam.scores == pytest.approx(greedy.scores, abs=1e-5)
    assert any(len(t) > 1 for t in greedy.tokens)
    assert all(not set(t) & set(BANNED_IDS) and EOS not in t for t in greedy.tokens)


def _sequence_logprob(task: CaptioningTask, image: torch.Tensor, seq: list[int]) -> float:
    """Total log-prob of ``seq`` (ids after [SOS], EOS included if present) by a full forward pass."""
    tokens = torch.tensor([[1] + seq])
    with torch.no_grad():
        logp = task.textual(task.visual(image[None]), tokens)[0, :-1].log_softmax(-1)  # (len, V)
    logp[:, list(BANNED_IDS)] = float("-inf")
    return float(logp.gather(1, tokens[0, 1:, None]).sum())


@pytest.mark.parametrize("seed", [0, 1])
def test_beam_search_finds_exhaustive_best(seed: int) -> None:
    vocab, steps = 6, 4
    task = tiny_task(vocab=vocab, seed=seed, std=0.5)
    allowed = [t for t in range(vocab) if t not in BANNED_IDS]  # EOS, 4, 5
    words = [t for t in allowed if t != EOS]
    candidates = [list(w) + [EOS] for n in range(steps) for w in itertools.product(words, repeat=n)]
    candidates += [list(w) for w in itertools.product(words, repeat=steps)]  # cut off at max steps
    x = images(2, seed=seed)
    result = beam_search(task, x, beam_size=len(candidates), max_steps=steps)
    small = beam_search(task, x, beam_size=2, max_steps=steps)
    for i in range(2):
        scored = {tuple(c): _sequence_logprob(task, x[i], c) for c in candidates}
        best = max(scored, key=scored.get)
        got = tuple(result.tokens[i]) + ((EOS,) if result.finished[i] else ())
        assert got == best, (got, best)
        assert result.scores[i] == pytest.approx(scored[best], abs=1e-4)
        small_seq = tuple(small.tokens[i]) + ((EOS,) if small.finished[i] else ())
        assert small.scores[i] == pytest.approx(scored[small_seq], abs=1e-4)
        assert small.scores[i] <= scored[best] + 1e-5


def test_beam_search_batch_equals_one_by_one_and_beats_greedy() -> None:
    task, x = tiny_task(seed=3), images(3, seed=3)
    batch = beam_search(task, x, beam_size=5, max_steps=10)
    for i in range(3):
        single = beam_search(task, x[i:i + 1], beam_size=5, max_steps=10)
        assert single.tokens[0] == batch.tokens[i]
        assert single.scores[0] == pytest.approx(batch.scores[i], abs=1e-4)
    greedy = greedy_decode(task, x, max_steps=10)
    assert all(b >= g - 1e-5 for b, g, f in zip(batch.scores, greedy.scores, greedy.finished) if f)


def test_nucleus_sampling() -> None:
    task, x = tiny_task(seed=4), images(3, seed=4)
    greedy = greedy_decode(task, x, max_steps=10)
    assert nucleus_sample(task, x, top_p=1e-6, max_steps=10).tokens == greedy.tokens  # top-1 only
    runs = [nucleus_sample(task, x, top_p=0.9, max_steps=10, generator=torch.Generator().manual_seed(7))
            for _ in range(2)]
    assert runs[0].tokens == runs[1].tokens and runs[0].scores == runs[1].scores
    others = {tuple(map(tuple, nucleus_sample(task, x, top_p=0.9, max_steps=10,
                                                generator=torch.Generator().manual_seed(s)).tokens))
              for s in range(6)}
    assert len(others) > 1
    assert all(not set(t) & set(BANNED_IDS) for t in runs[0].tokens)


@pytest.mark.parametrize("method", ["greedy", "beam"])
def test_attention_maps(method: str) -> None:
    task, x = tiny_task(seed=5), images(2, seed=5)
    task.train()
    result = decode(task, x, method=method, max_steps=8, return_attention=True)
    plain = decode(task, x, method=method, max_steps=8)
    assert task.training  # mode restored
    assert result.tokens == plain.tokens
    for tokens, maps in zip(result.tokens, result.attention):
        assert maps.shape == (len(tokens), 2, 2)  # 16 px, small stem: a 2x2 grid
        torch.testing.assert_close(maps.sum(dim=(1, 2)), torch.ones(len(tokens)))


def test_max_steps_and_bad_method() -> None:
    task, x = tiny_task(seed=6), images(2)
    out = beam_search(task, x, beam_size=3, max_steps=3, early_stop=False)
    assert all(len(t) <= 3 for t in out.tokens)
    long = greedy_decode(task, x, max_steps=100, banned_ids=(0, 1, 2, 3))  # never ends
    assert all(len(t) == 12 for t in long.tokens) and not any(long.finished)  # capped by 12 positions
    with pytest.raises(ConfigError, match="unknown decoding method"):
        decode(task, x, method="sample")
