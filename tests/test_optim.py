"""Lookahead and the LR schedule against hand-computed values."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from capvis.config import TrainConfig
from capvis.train.optim import Lookahead, build_optimizer, inner_optimizer, is_fused, step_unless
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


# -- fused steps that skip on the device ------------------------------------------------------

def _fused_pieces(optimizer: str = "sgd", k: int = 2, lookahead: bool = True):
    cfg = TrainConfig(iterations=10, warmup=0, lr_backbone=0.1, lr_textual=0.1, optimizer=optimizer, lookahead_k=k,
                      lookahead=lookahead)
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(6))
    return p, build_optimizer([{"params": [p], "lr": 0.1}], cfg)


def _grad_step(opt, p, skip: bool) -> None:
    p.grad = torch.full_like(p, float("nan")) if skip else p.detach().clone()
    step_unless(opt, torch.tensor(skip))


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_build_optimizer_uses_the_fused_kernel_on_cpu(optimizer):
    _, opt = _fused_pieces(optimizer)
    assert is_fused(opt) and all(g["fused"] for g in opt.param_groups)


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_skipped_first_step_leaves_no_trace(optimizer):
    """torch's fused SGD leaves its momentum uninitialised when its first step is skipped; capvis
    starts it at zero, so a run whose first step is skipped continues as if it had begun one step later."""
    p, opt = _fused_pieces(optimizer, lookahead=False)
    start = p.detach().clone()
    junk = torch.full_like(p, 1e30)  # freed memory the allocator hands out again to uninitialised buffers
    del junk
    _grad_step(opt, p, skip=True)
    assert torch.equal(p.detach(), start)
    q, ref = _fused_pieces(optimizer, lookahead=False)
    for _ in range(3):
        _grad_step(opt, p, skip=False)
        _grad_step(ref, q, skip=False)
    assert torch.equal(p.detach(), q.detach())


def test_lookahead_masked_sync_skips_on_the_device_and_matches_unmasked():
    p, opt = _fused_pieces("sgd", k=2)
    q, ref = _fused_pieces("sgd", k=2)
    _grad_step(opt, p, skip=False)
    _grad_step(ref, q, skip=False)
    before, slow = p.detach().clone(), opt.slow[0].clone()
    _grad_step(opt, p, skip=True)  # step 2 of k=2 is a sync step: skipped, neither weight moves
    assert torch.equal(p.detach(), before) and torch.equal(opt.slow[0], slow)
    assert opt.step_count == 2
    q.grad = q.detach().clone()
    ref.step()  # the plain, unmasked path: a real sync
    _grad_step(opt, p, skip=False)
    _grad_step(opt, p, skip=False)  # masked path, sync at step 4
    r, again = _fused_pieces("sgd", k=2)
    for _ in range(2):
        r.grad = r.detach().clone()
        again.step()
    assert torch.equal(q.detach(), r.detach())  # masked (weight 1) and unmasked syncs agree bit for bit
    assert torch.equal(again.slow[0], r.detach())
