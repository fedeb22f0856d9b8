"""SigLIP's pairwise sigmoid loss: value and gradients against a pair-by-pair computation, the paper's
initialisation, no weight decay on temperature and bias, and the choice of loss by config.
(Two gloo processes against one: tests/test_contrastive_ddp.py.)"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from capvis.config import load_config
from capvis.errors import ConfigError
from capvis.tasks import build_task
from capvis.tasks.contrastive import siglip_loss

pytestmark = pytest.mark.usefixtures("one_thread")  # restored after each test (conftest)


def direct(image: torch.Tensor, text: torch.Tensor, t_prime: float, bias: float) -> tuple[float, dict]:
    """The paper's loss, -1/n sum_i sum_j log sigmoid(z_ij (t x_i.y_j + b)), pair by pair in float64, and its
    gradients written out: dL/dlogit_ij = -z_ij sigmoid(-z_ij logit_ij) / n."""
    n, t = image.shape[0], math.exp(t_prime)
    x, y = image.double().tolist(), text.double().tolist()
    loss, g = 0.0, [[0.0] * n for _ in range(n)]
    for i in range(n):
        for j in range(n):
            z = 1.0 if i == j else -1.0
            logit = t * sum(a * b for a, b in zip(x[i], y[j])) + bias
            loss -= math.log(1 / (1 + math.exp(-z * logit))) / n
            g[i][j] = -z / (1 + math.exp(z * logit)) / n
    gm = torch.tensor(g, dtype=torch.float64)
    xs, ys = image.double(), text.double()
    grads = {"image": t * gm @ ys, "text": t * gm.T @ xs, "bias": gm.sum(),
             "t_prime": (gm * t * (xs @ ys.T)).sum()}
    return loss, grads


def test_siglip_loss_and_gradients_match_the_definition() -> None:
    g = torch.Generator().manual_seed(0)
    image = torch.nn.functional.normalize(torch.randn(5, 8, generator=g), dim=1).requires_grad_()
    text = torch.nn.functional.normalize(torch.randn(5, 8, generator=g), dim=1).requires_grad_()
    t_prime = torch.tensor(math.log(10.0) + 0.3, requires_grad=True)
    bias = torch.tensor(-2.5, requires_grad=True)  # near 0 so that every pair's gradient matters
    loss, accuracy = siglip_loss(image, text, t_prime.exp(), bias)
    loss.backward()
    expected, grads = direct(image.detach(), text.detach(), t_prime.item(), bias.item())
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    torch.testing.assert_close(image.grad.double(), grads["image"], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(text.grad.double(), grads["text"], rtol=1e-4, atol=1e-6)
    assert bias.grad.item() == pytest.approx(grads["bias"].item(), rel=1e-4)
    assert t_prime.grad.item() == pytest.approx(grads["t_prime"].item(), rel=1e-4)
    assert 0 <= accuracy.item() <= 1 and not accuracy.requires_grad


def test_siglip_rows_of_one_rank_score_against_the_global_texts() -> None:
    """Rank r's images match global texts r*b .. r*b+b-1; the mean over ranks is the whole-batch loss."""
    g = torch.Generator().manual_seed(1)
    image = torch.nn.functional.normalize(torch.randn(6, 4, generator=g), dim=1)
    text = torch.nn.functional.normalize(torch.randn(6, 4, generator=g), dim=1)
    scale, bias = torch.tensor(7.0), torch.tensor(-1.0)
    whole, _ = siglip_loss(image, text, scale, bias)
    parts = [siglip_loss(image[r * 2:(r + 1) * 2], text[r * 2:(r + 1) * 2], scale, bias, all_text=text, rank=r)[0]
             for r in range(3)]
    assert torch.stack(parts).mean().item() == pytest.approx(whole.item(), rel=1e-6)


def tiny(*extra: str):
    return load_config(None, ["model.task=contrastive", "model.backbone=resnet18", "model.textual.hidden=64",
                              "model.contrastive.embed_dim=16", "data.max_caption_length=10", *extra])


@pytest.mark.parametrize("task_name", ["contrastive", "coca"])
def test_siglip_initialisation_and_groups(task_name: str) -> None:
    task = build_task(tiny(f"model.task={task_name}", "model.contrastive.loss=siglip"), 40)
    assert task.logit_scale.item() == pytest.approx(math.log(10.0)) and task.logit_bias.item() == -10.0
    groups = task.param_groups(SimpleNamespace(lr_backbone=0.1, lr_textual=0.01, weight_decay=1e-4))
    decay = {n for grp in groups if grp["weight_decay"] > 0 for n in grp["param_names"]}
    assert {"logit_scale", "logit_bias"} <= {n for grp in groups for n in grp["param_names"]} - decay
    infonce = build_task(tiny(f"model.task={task_name}"), 40)
    assert infonce.logit_scale.item() == pytest.approx(math.log(1 / 0.07)) and not hasattr(infonce, "logit_bias")
    custom = build_task(tiny("model.contrastive.loss=siglip", "model.contrastive.init_temperature=0.5",
                             "model.contrastive.init_bias=-3"), 40)
    assert custom.logit_scale.item() == pytest.approx(math.log(2.0)) and custom.logit_bias.item() == -3.0


def test_siglip_task_trains_and_unknown_loss_is_one_error() -> None:
    torch.manual_seed(0)
    task = build_task(tiny("model.contrastive.loss=siglip", "model.textual.dropout=0"), 40).train()
    g = torch.Generator().manual_seed(2)
    tokens = torch.randint(4, 40, (4, 5), generator=g)
    tokens[:, 0], tokens[:, -1] = 1, 2
    batch = {"image": torch.randn(4, 3, 16, 16, generator=g), "caption_tokens": tokens}
    optimizer = torch.optim.AdamW(task.param_groups(SimpleNamespace(lr_backbone=1e-3, lr_textual=1e-3,
                                                                    weight_decay=0.0)))
    losses = []
    for _ in range(12):
        out = task(batch)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        losses.append(out.loss.item())
    assert {"loss_contrastive", "logit_bias", "logit_scale"} <= out.logs.keys()
    assert losses[-1] < losses[0]
    with pytest.raises(ConfigError, match="model.contrastive.loss must be one of infonce, siglip"):
        build_task(tiny("model.contrastive.loss=sigmoid"), 40)
