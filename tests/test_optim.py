"""Lookahead and the LR schedule against hand-computed values."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from capvis.config import TrainConfig
from capvis.train.optim import Lookahead, build_optimizer, inner_optimizer
from capvis.train.schedule import build_scheduler, lr_multiplier


def _sgd_lookahead(p: torch.nn.Parameter) -> Lookahead:
    return Lookahead(torch.optim.SGD([p], lr=0.1), alpha=0.5, k=2)


def _step(opt: Lookahead, p: torch.nn.Parameter) -> None:
    opt.zero_grad()
    p.sum().backward()  # gradient 1 everywhere
    opt.step()


def test_lookahead_matches_hand_computed_trajectory():
    p = torch.nn.Parameter(torch.tensor([1.0]))
    opt = _sgd_lookahead(p)
    # fast: 0.9, 0.8 -> sync: slow = 1 + .5 (0.8 - 1) = 0.9 ; fast 0.8, 0.7 -> slow = .9 + .5 (.7 - .9) = 0.8
    expected = [0.9, 0.9, 0.8, 0.8, 0.7, 0.7]
    got = []
    for _ in expected:
        _step(opt, p)
        got.append(round(p.item(), 6))
    assert got == pytest.approx(expected)
    assert opt.slow[0].item() == pytest.approx(0.7)


def test_lookahead_state_round_trip_mid_cycle():
    p1 = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    a = Lookahead(torch.optim.SGD([p1], lr=0.1, momentum=0.9), alpha=0.5, k=3)
    for _ in range(4):
        _step(a, p1)
    state = copy.deepcopy(a.state_dict())  # as if saved to disk and read back
    p2 = torch.nn.Parameter(p1.detach().clone())
    b = Lookahead(torch.optim.SGD([p2], lr=0.1, momentum=0.9), alpha=0.5, k=3)
    b.load_state_dict(state)
    for _ in range(5):
        _step(a, p1)
        _step(b, p2)
    assert torch.equal(p1, p2)
    assert torch.equal(a.slow[0], b.slow[0])


def test_lookahead_rejects_bad_arguments():
    with pytest.raises(ValueError):
        Lookahead(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1), alpha=0.0)


@pytest.mark.parametrize("t,expected", [(0, 0.25), (1, 0.5), (3, 1.0), (4, 1.0), (8, 0.5), (12, 0.0),
                                        (6, 0.5 * (1 + math.cos(math.pi * 0.25)))])
def test_cosine_schedule_hand_values(t, expected):
    assert lr_multiplier(t, warmup=4, total=12, kind="cosine") == pytest.approx(expected)


def test_linear_and_constant_schedules():
    assert lr_multiplier(8, warmup=4, total=12, kind="linear") == pytest.approx(0.5)
    assert lr_multiplier(11, warmup=4, total=12, kind="none") == 1.0


def test_scheduler_drives_two_peak_lrs():
    cfg = TrainConfig(iterations=10, warmup=2, lr_backbone=0.2, lr_textual=1e-3)
    a, b = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    opt = build_optimizer([{"params": [a], "lr": 0.2}, {"params": [b], "lr": 1e-3}], cfg)
    sched = build_scheduler(inner_optimizer(opt), cfg)
    lrs = []
    for _ in range(10):
        lrs.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx([0.1, 5e-4])  # warm-up step 1 of 2
    assert lrs[1] == pytest.approx([0.2, 1e-3])
    assert lrs[6] == pytest.approx([0.1, 5e-4])  # half-way through the cosine
    assert isinstance(opt, Lookahead) and opt.k == 5 and opt.alpha == 0.5
    assert inner_optimizer(opt).defaults["momentum"] == 0.9
