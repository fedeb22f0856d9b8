"""Gradient accumulation (``train.accumulate``): K micro-batches per optimizer step make the same update
as one batch when nothing depends on the batch (GroupNorm, no dropout, captions of one length), skip
the gradient all-reduce on the first K-1, and resume mid-run exactly."""

from __future__ import annotations

import contextlib

import pytest
import torch
from conftest import write_coco
from torch import nn

from capvis.config import load_config
from capvis.errors import ConfigError
from capvis.tasks.base import TaskOutput
from capvis.train import checkpoint as ckpt
from capvis.train.loop import Trainer, preflight, read_metrics
from capvis.train.precision import resolve_precision
from capvis.train.step import split_batch, train_step

SAME_LENGTH = [["a dog runs on the grass."]] * 4  # four images, one caption length: equal token counts


def _config(coco, vocab, *extra):
    return load_config("bicaptioning_R_50_L1_H2048", [
        f"data.train={coco}", "data.val=", f"data.vocab={vocab}", "model.backbone=resnet18", "model.small_stem=true",
        "model.visual_norm=group", "model.visual_width=16", "data.image_size=16", "model.textual.hidden=64",
        "model.textual.dropout=0", "train.batch_size=4", "data.num_workers=0", "train.log_every=1", "train.warmup=1",
        "train.channels_last=false", "train.device=cpu", "train.checkpoint_every=100", *extra])


def test_split_batch_splits_batch_tensors_and_shares_the_rest():
    batch = {"image": torch.arange(8.0).view(4, 2), "ids": torch.arange(4), "scalar": torch.tensor(3.0), "name": "x"}
    parts = split_batch(batch, 2)
    assert [p["ids"].tolist() for p in parts] == [[0, 1], [2, 3]]
    assert torch.equal(parts[1]["image"], batch["image"][2:]) and parts[0]["name"] == "x"
    assert all(p["scalar"] is batch["scalar"] for p in parts)
    assert split_batch(batch, 1)[0] is batch
    with pytest.raises(ValueError, match="cannot be split"):
        split_batch(batch, 3)


class _SyncRecorder(nn.Module):
    """A DDP stand-in: records whether each forward/backward ran inside ``no_sync``."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 1)
        self.inside, self.calls = False, []

    @contextlib.contextmanager
    def no_sync(self):
        self.inside = True
        try:
            yield
        finally:
            self.inside = False

    def forward(self, batch):
        self.calls.append((batch["x"].shape[0], self.inside))
        return TaskOutput(self.fc(batch["x"]).pow(2).mean(), {})


def test_only_the_last_micro_batch_syncs_gradients():
    model = _SyncRecorder()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    precision = resolve_precision("fp32", torch.device("cpu"))
    result = train_step(model, {"x": torch.randn(8, 3)}, opt, sched, precision.scaler(), precision, accumulate=4)
    assert model.calls == [(2, True), (2, True), (2, True), (2, False)]
    assert result.finite


def test_accumulated_gradient_is_the_whole_batch_gradient():
    torch.manual_seed(0)
    x = torch.randn(8, 3)
    grads = []
    for k in (1, 2):
        torch.manual_seed(1)
        model = _SyncRecorder()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
        precision = resolve_precision("fp32", torch.device("cpu"))
        result = train_step(model, {"x": x}, opt, sched, precision.scaler(), precision, accumulate=k)
        grads.append((result.loss.item(), model.fc.weight.grad.clone()))
    assert grads[0][0] == pytest.approx(grads[1][0], rel=1e-6)
    torch.testing.assert_close(grads[0][1], grads[1][1], rtol=1e-6, atol=1e-7)


def test_accumulate_two_equals_one_and_resumes_exactly(tmp_path, coco_tokenizer_path, one_thread):
    coco = write_coco(tmp_path / "coco", captions=SAME_LENGTH)
    runs = {}
    for k in (1, 2):
        cfg = _config(coco, coco_tokenizer_path, "train.iterations=4", f"train.accumulate={k}")
        Trainer(cfg, tmp_path / f"k{k}", progress=False).run()
        runs[k] = tmp_path / f"k{k}"
    a = [r["loss"] for r in read_metrics(runs[1])]
    b = [r["loss"] for r in read_metrics(runs[2])]
    assert len(a) == len(b) == 4
    assert b == pytest.approx(a, rel=1e-5, abs=1e-5)  # the logged loss is the step's mean over micro-batches
    wa = ckpt.load_checkpoint(runs[1] / "checkpoints" / "checkpoint_00000004.pt")["model"]
    wb = ckpt.load_checkpoint(runs[2] / "checkpoints" / "checkpoint_00000004.pt")["model"]
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], rtol=1e-5, atol=1e-5, msg=key)

    cfg = _config(coco, coco_tokenizer_path, "train.iterations=4", "train.accumulate=2")
    parted = tmp_path / "parted"
    Trainer(cfg, parted, progress=False).run(until=2)
    Trainer(cfg, parted, resume="auto", progress=False).run()
    assert {r["iteration"]: r["loss"] for r in read_metrics(parted)} == dict(enumerate(b, start=1))  # bit-identical
    wp = ckpt.load_checkpoint(parted / "checkpoints" / "checkpoint_00000004.pt")["model"]
    assert all(torch.equal(wp[k], wb[k]) for k in wb)


def test_batch_not_divisible_into_micro_batches_is_one_line(coco_fixture, coco_tokenizer_path):
    cfg = _config(coco_fixture, coco_tokenizer_path, "train.accumulate=3")
    with pytest.raises(ConfigError, match="not divisible into train.accumulate=3"):
        preflight(cfg, None)
    with pytest.raises(ConfigError, match="train.accumulate"):
        _config(coco_fixture, coco_tokenizer_path, "train.accumulate=0")
