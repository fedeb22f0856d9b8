"""End-to-end pretraining on a tiny COCO-format fixture: loss falls, outputs exist, resume is exact."""

from __future__ import annotations


import pytest
import torch

from capvis.cli import main
from capvis.config import load_config
from capvis.train import checkpoint as ckpt
from capvis.train.loop import Trainer, read_metrics

TINY = ["model.backbone=resnet18", "model.small_stem=true", "data.image_size=32", "model.textual.hidden=64",
        "train.batch_size=4", "data.num_workers=0", "train.log_every=1", "train.warmup=2",
        "train.channels_last=false"]


def tiny_config(coco, vocab, *extra):
    return load_config("bicaptioning_R_50_L1_H2048", [f"data.train={coco}", "data.val=", f"data.vocab={vocab}", *TINY, *extra])


def test_pretrain_cli_writes_outputs_and_lowers_loss(tmp_path, coco_fixture, coco_tokenizer_path, capsys):
    out = tmp_path / "run"
    code = main(["pretrain", "--config", "bicaptioning_R_50_L1_H2048", "--output", str(out), "--no-progress",
                 f"data.train={coco_fixture}", f"data.val={coco_fixture}", f"data.vocab={coco_tokenizer_path}",
                 *TINY, "train.iterations=40", "train.checkpoint_every=20", "train.optimizer=adamw",
                 "train.lr_backbone=0.002", "train.lr_textual=0.002", "train.weight_decay=0", "model.textual.dropout=0"])
    assert code == 0
    rows = [r for r in read_metrics(out) if "loss" in r]
    assert {"iteration", "loss", "lr", "images_per_s"} <= set(rows[0])
    first = sum(r["loss"] for r in rows[:5]) / 5
    last = sum(r["loss"] for r in rows[-5:]) / 5
    assert last < first - 1.0, (first, last)
    assert any("val/loss" in r for r in read_metrics(out))
    assert (out / "config.yaml").is_file() and list((out / "tensorboard").iterdir())
    assert [p.name for p in ckpt.list_checkpoints(out / "checkpoints")] == [
        "checkpoint_00000020.pt", "checkpoint_00000040.pt"]
    state = ckpt.load_checkpoint(out / "checkpoints" / "checkpoint_00000040.pt")
    assert state["iteration"] == 40 and state["vocab"] == coco_tokenizer_path.read_bytes()
    assert "stopped at iteration 40" in capsys.readouterr().out


def test_resume_continues_exactly(tmp_path, coco_fixture, coco_tokenizer_path):
    cfg = tiny_config(coco_fixture, coco_tokenizer_path, "train.iterations=6", "train.checkpoint_every=100")
    straight = tmp_path / "straight"
    Trainer(cfg, straight, progress=False).run()
    parted = tmp_path / "parted"
    Trainer(cfg, parted, progress=False).run(until=3)
    assert [p.name for p in ckpt.list_checkpoints(parted / "checkpoints")] == ["checkpoint_00000003.pt"]
    Trainer(cfg, parted, resume="auto", progress=False).run()
    a = {r["iteration"]: r["loss"] for r in read_metrics(straight)}
    b = {r["iteration"]: r["loss"] for r in read_metrics(parted)}
    assert list(b) == [1, 2, 3, 4, 5, 6]
    assert a == b  # bit-identical losses, before and after the resume
    wa = ckpt.load_checkpoint(straight / "checkpoints" / "checkpoint_00000006.pt")["model"]
    wb = ckpt.load_checkpoint(parted / "checkpoints" / "checkpoint_00000006.pt")["model"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_resume_rejects_a_checkpoint_of_another_model(tmp_path, coco_fixture, coco_tokenizer_path):
    from capvis.errors import CheckpointError

    cfg = tiny_config(coco_fixture, coco_tokenizer_path, "train.iterations=1", "train.warmup=0")
    Trainer(cfg, tmp_path / "a", progress=False).run()
    other = tiny_config(coco_fixture, coco_tokenizer_path, "train.iterations=2", "train.warmup=0", "model.textual.hidden=128")
    with pytest.raises(CheckpointError, match="does not match"):
        Trainer(other, tmp_path / "a", resume="auto", progress=False)


def test_unknown_config_key_is_one_line(tmp_path, capsys):
    code = main(["pretrain", "--config", "bicaptioning_R_50_L1_H2048", "--output", str(tmp_path),
                 "train.bach_size=4"])
    err = capsys.readouterr().err
    assert code == 2 and "unknown config key 'train.bach_size'" in err and "train.batch_size" in err
    assert len(err.strip().splitlines()) == 1
