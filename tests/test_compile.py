"""``train.compile``: the task runs through ``torch.compile``; checkpoints hold the plain task's keys
(no ``_orig_mod.``), load without compile and resume. The tests use the ``aot_eager`` backend (dynamo
and AOT autograd, no code generation: inductor's C++ build of even a tiny model takes a minute on a
busy 2-core machine; ``bench/train_step.py train.compile=true`` measures inductor)."""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import write_coco

from capvis.config import load_config
from capvis.tasks import build_task
from capvis.train import checkpoint as ckpt
from capvis.train.loop import Trainer, read_metrics
from capvis.train.precision import compile_model

SAME_LENGTH = [["a dog runs on the grass."]] * 4  # one caption length: one graph, no recompilation


def _config(coco, vocab, *extra):
    return load_config("bicaptioning_R_50_L1_H2048", [
        f"data.train={coco}", "data.val=", f"data.vocab={vocab}", "model.backbone=resnet18", "model.small_stem=true",
        "model.visual_width=16", "data.image_size=16", "model.textual.hidden=64", "model.textual.dropout=0",
        "train.batch_size=2", "data.num_workers=0", "train.log_every=1", "train.warmup=1", "train.iterations=4",
        "train.checkpoint_every=100", "train.channels_last=false", "train.device=cpu", *extra])


def test_compiled_run_trains_checkpoints_plain_keys_and_resumes(tmp_path, coco_tokenizer_path, one_thread):
    coco = write_coco(tmp_path / "coco", captions=SAME_LENGTH)
    eager = tmp_path / "eager"
    Trainer(_config(coco, coco_tokenizer_path), eager, progress=False).run()
    cfg = _config(coco, coco_tokenizer_path, "train.compile=true", "train.compile_backend=aot_eager")
    parted = tmp_path / "compiled"
    trainer = Trainer(cfg, parted, progress=False)
    assert trainer.model is not trainer.task and hasattr(trainer.model, "_orig_mod")  # really compiled
    trainer.run(until=2)
    state = ckpt.load_checkpoint(parted / "checkpoints" / "checkpoint_00000002.pt")
    assert not [k for k in state["model"] if "_orig_mod" in k or k.startswith("module.")]
    plain = build_task(cfg, trainer.task.textual.vocab_size)
    plain.load_state_dict(state["model"])  # strict, into an uncompiled task
    Trainer(cfg, parted, resume="auto", progress=False).run()
    a = {r["iteration"]: r["loss"] for r in read_metrics(eager)}
    b = {r["iteration"]: r["loss"] for r in read_metrics(parted)}
    assert list(b) == [1, 2, 3, 4]
    assert [b[i] for i in b] == pytest.approx([a[i] for i in b], rel=1e-5, abs=1e-5)
    assert b[4] < b[1]  # it trained
    wa = ckpt.load_checkpoint(eager / "checkpoints" / "checkpoint_00000004.pt")["model"]
    wb = ckpt.load_checkpoint(parted / "checkpoints" / "checkpoint_00000004.pt")["model"]
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], rtol=1e-4, atol=1e-5, msg=key)


def test_unavailable_backend_is_one_warning_and_eager(caplog):
    model = torch.nn.Linear(2, 2)
    with caplog.at_level(logging.WARNING):
        out = compile_model(model, backend="no_such_backend", device=torch.device("cpu"))
    assert out is model
    lines = [r.getMessage() for r in caplog.records if "train.compile" in r.getMessage()]
    assert len(lines) == 1 and "no_such_backend" in lines[0] and "eagerly" in lines[0] and "\n" not in lines[0]
