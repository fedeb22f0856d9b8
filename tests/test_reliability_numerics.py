"""Numerical faults: a NaN/inf step is skipped without touching the model; after
``train.max_bad_steps`` in a row the run stops with one line and a checkpoint of the last good state."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from capvis.config import load_config
from capvis.errors import CapvisError
from capvis.tasks.base import TaskOutput
from capvis.train import checkpoint as ckpt
from capvis.train.loop import Trainer
from capvis.train.precision import resolve_precision
from capvis.train.step import train_step


class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.BatchNorm1d(3)
        self.fc = nn.Linear(3, 1)

    def forward(self, batch):
        loss = self.fc(self.norm(batch["x"])).pow(2).mean() + batch.get("extra", 0.0)
        return TaskOutput(loss, {})


def _pieces():
    torch.manual_seed(0)
    model = _Tiny()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1.0 / (1 + i))
    precision = resolve_precision("fp32", torch.device("cpu"))
    return model, opt, sched, precision.scaler(), precision


def _snapshot(model, opt):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            {k: {n: t.clone() for n, t in s.items()} for k, s in opt.state.items()})


@pytest.mark.parametrize("fault", ["nan_input", "inf_loss", "inf_grad"])
def test_skipped_step_leaves_weights_buffers_and_optimizer_unchanged(fault):
    model, opt, sched, scaler, precision = _pieces()
    x = torch.randn(8, 3)
    train_step(model, {"x": x}, opt, sched, scaler, precision)  # a good step first: momentum buffers exist
    params, state = _snapshot(model, opt)
    batch = {"nan_input": {"x": x.clone().index_fill_(0, torch.tensor([2]), float("nan"))},
             "inf_loss": {"x": x, "extra": torch.tensor(float("inf"))},
             # sqrt'(0) = inf: a finite loss with an infinite gradient
             "inf_grad": {"x": x, "extra": (model.fc.bias - model.fc.bias.detach()).abs().sqrt().sum()}}[fault]
    result = train_step(model, batch, opt, sched, scaler, precision, clip_grad_norm=1.0)
    assert not result.finite and result.loss_finite == (fault == "inf_grad")
    after, after_state = _snapshot(model, opt)
    assert all(torch.equal(params[k], after[k]) for k in params), "weights or BatchNorm statistics changed"
    assert all(torch.equal(state[p][n], after_state[p][n]) for p in state for n in state[p])
    assert sched.last_epoch == 2  # the schedule still advances: LR stays a function of the iteration
    good = train_step(model, {"x": x}, opt, sched, scaler, precision)
    assert good.finite and not torch.equal(model.fc.weight, params["fc.weight"])


def test_bad_steps_reset_then_stop_with_checkpoint_of_last_good_state(tmp_path, coco_fixture, coco_tokenizer_path,
                                                                      caplog):
    cfg = load_config("bicaptioning_R_50_L1_H2048", [
        f"data.train={coco_fixture}", "data.val=", f"data.vocab={coco_tokenizer_path}", "model.backbone=resnet18",
        "model.small_stem=true", "data.image_size=16", "model.textual.hidden=64", "train.batch_size=2",
        "data.num_workers=0", "train.log_every=1", "train.warmup=0", "train.channels_last=false",
        "train.iterations=20", "train.checkpoint_every=100", "train.max_bad_steps=3"])
    trainer = Trainer(cfg, tmp_path / "run", progress=False)
    forward, calls, good_state = trainer.task.forward, [], {}

    def poisoned(batch):  # NaN images at step 2 (one bad step, then recovery) and from step 4 on
        calls.append(1)
        if len(calls) == 4:
            good_state.update({k: v.clone() for k, v in trainer.task.state_dict().items()})
        if len(calls) == 2 or len(calls) >= 4:
            batch = {**batch, "image": batch["image"] * float("nan")}  # poisons BatchNorm statistics too
        return forward(batch)

    trainer.task.forward = poisoned
    with caplog.at_level(logging.WARNING), pytest.raises(CapvisError) as info:
        trainer.run()
    message = str(info.value)
    assert "\n" not in message and "non-finite for 3 consecutive steps (iteration 6)" in message
    assert "checkpoint_00000006.pt" in message and len(calls) == 6
    assert caplog.text.count("update skipped") == 4
    saved = ckpt.load_checkpoint(tmp_path / "run" / "checkpoints" / "checkpoint_00000006.pt")
    assert saved["iteration"] == 6
    assert all(torch.equal(saved["model"][k], good_state[k]) for k in good_state)  # state after step 3
    assert all(torch.isfinite(v).all() for v in saved["model"].values() if v.is_floating_point())
