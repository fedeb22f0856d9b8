"""capvis.models.dropout: nn.Dropout's contract with cheaper CPU masks, and the tasks that train with it."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from capvis.config import load_config
from capvis.models.dropout import Dropout, apply_dropout, keep_mask
from capvis.tasks import build_task

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_keep_mask_drops_the_asked_share(p: float) -> None:
    torch.manual_seed(0)
    dropped = 1 - keep_mask(torch.Size([1000, 1000]), p).float().mean().item()
    assert abs(dropped - p) < 5 * math.sqrt(p * (1 - p) / 1e6)  # 5 standard errors of a million draws


def test_keep_mask_is_a_function_of_the_global_seed_and_advances_it() -> None:
    torch.manual_seed(3)
    a, b = keep_mask(torch.Size([7, 9]), 0.3), keep_mask(torch.Size([7, 9]), 0.3)
    torch.manual_seed(3)
    assert torch.equal(keep_mask(torch.Size([7, 9]), 0.3), a)  # resume restores the generator: same masks
    assert not torch.equal(a, b)


def test_train_mode_zeroes_or_rescales_and_keeps_the_expectation() -> None:
    drop, x = Dropout(0.25), torch.randn(400, 500, requires_grad=True)
    torch.manual_seed(1)
    y = drop.train()(x)
    kept = y != 0
    torch.testing.assert_close(y[kept], x[kept] / 0.75)
    assert abs(1 - kept.float().mean().item() - 0.25) < 0.005
    torch.testing.assert_close(Dropout(0.25).train()(torch.ones(1000, 1000)).mean(), torch.tensor(1.0), atol=3e-3,
                               rtol=0)
    y.sum().backward()
    torch.testing.assert_close(x.grad, kept.float() / 0.75)  # the gradient flows through the kept elements only


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_eval_mode_and_p_zero_are_the_identity(p: float) -> None:
    x = torch.randn(5, 6)
    assert torch.equal(Dropout(p).eval()(x), x)
    assert torch.equal(Dropout(0.0).train()(x), x)
    assert torch.equal(apply_dropout(x, p, training=False), x)


def test_it_is_an_nn_dropout_without_state() -> None:
    drop = Dropout(0.1)
    assert isinstance(drop, nn.Dropout) and drop.p == 0.1 and not drop.state_dict()


def test_bf16_activations_stay_bf16() -> None:
    x = torch.randn(64, 64, dtype=torch.bfloat16)
    assert Dropout(0.1).train()(x).dtype == torch.bfloat16


@pytest.mark.parametrize("task_name", ["bicaptioning", "coca", "masked_lm", "icmlm"])
def test_every_textual_dropout_of_a_task_is_the_cheaper_one(task_name: str) -> None:
    """The textual heads and text encoders build capvis's Dropout (attention probabilities keep SDPA's own
    dropout), so the cheaper masks are what trains; a plain nn.Dropout added anywhere fails this."""
    cfg = load_config(None, [f"model.task={task_name}", "model.backbone=resnet18", "model.small_stem=true",
                             "model.textual.hidden=64", "model.textual.layers=1", "data.max_caption_length=10"])
    task = build_task(cfg, 40)
    drops = [m for m in task.modules() if isinstance(m, nn.Dropout)]
    assert drops and all(type(m) is Dropout for m in drops)
