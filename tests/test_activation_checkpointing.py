"""``model.activation_checkpointing``: backbone stages and textual layers recompute their activations in
backward; the loss, the gradients and the BatchNorm statistics are those of the plain model."""

from __future__ import annotations

import copy

import pytest
import torch

from capvis.config import load_config
from capvis.models import checkpointing
from capvis.models.checkpointing import set_activation_checkpointing
from capvis.tasks import build_task


def _task():
    cfg = load_config("bicaptioning_R_50_L1_H2048", [
        "model.backbone=resnet18", "model.small_stem=true", "model.visual_width=16", "data.image_size=16",
        "model.textual.hidden=64", "model.textual.layers=2", "model.textual.dropout=0.3", "data.vocab="])
    torch.manual_seed(0)
    return build_task(cfg, 50).train()


def _batch():
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(4, 50, (4, 9), generator=g)
    tokens[:, 0], tokens[:, -1] = 1, 2
    return {"image": torch.randn(4, 3, 16, 16, generator=g), "caption_tokens": tokens,
            "caption_lengths": torch.full((4,), 9), "image_id": torch.arange(4)}


def _run(task):
    torch.manual_seed(3)  # the dropout masks: replayed in the recomputation
    out = task(_batch())
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in task.named_parameters() if p.grad is not None}


def test_checkpointing_changes_neither_loss_gradients_nor_statistics(monkeypatch, one_thread):
    plain = _task()
    ckpt_task = copy.deepcopy(plain)
    assert set_activation_checkpointing(ckpt_task, True) == 3  # the backbone and both heads
    calls = []
    original = checkpointing.checkpoint
    monkeypatch.setattr(checkpointing, "checkpoint", lambda *a, **k: calls.append(1) or original(*a, **k))
    loss_a, grads_a = _run(plain)
    loss_b, grads_b = _run(ckpt_task)
    assert len(calls) == 4 + 2 * 2  # four stages, two layers in each of two heads
    assert torch.equal(loss_a, loss_b)
    assert grads_a.keys() == grads_b.keys()
    for name, grad in grads_a.items():
        torch.testing.assert_close(grad, grads_b[name], rtol=1e-5, atol=1e-7, msg=name)
    buffers_a, buffers_b = dict(plain.named_buffers()), dict(ckpt_task.named_buffers())
    for name, buffer in buffers_a.items():  # BatchNorm counted the batch once, not once more in the recomputation
        assert torch.equal(buffer, buffers_b[name]), name


def test_checkpointing_is_off_in_eval_and_without_grad(monkeypatch):
    task = _task()
    set_activation_checkpointing(task, True)
    calls = []
    monkeypatch.setattr(checkpointing, "checkpoint", lambda *a, **k: calls.append(1))
    with torch.no_grad():
        task(_batch())
    task.eval()
    task(_batch())
    assert calls == []


def test_config_key_reaches_the_trainer(tmp_path, coco_fixture, coco_tokenizer_path):
    from capvis.train.loop import Trainer

    cfg = load_config("bicaptioning_R_50_L1_H2048", [
        f"data.train={coco_fixture}", "data.val=", f"data.vocab={coco_tokenizer_path}", "model.backbone=resnet18",
        "model.small_stem=true", "data.image_size=16", "model.textual.hidden=64", "train.batch_size=2",
        "data.num_workers=0", "train.iterations=1", "train.warmup=0", "train.device=cpu",
        "model.activation_checkpointing=true"])
    trainer = Trainer(cfg, tmp_path / "run", progress=False)
    assert trainer.task.visual.activation_checkpointing and trainer.task.backward_textual.activation_checkpointing
    assert trainer.run()["iteration"] == 1
    with pytest.raises(Exception, match="activation_checkpointing"):
        load_config("bicaptioning_R_50_L1_H2048", ["model.activation_checkpointing=3"])
