"""Release format: safetensors + JSON + vocabulary, in a directory or an archive; bit-exact round trips."""

from __future__ import annotations

import json

import pytest
import torch

import capvis
from capvis.cli import main
from capvis.config import load_config
from capvis.data.tokenizer import Tokenizer
from capvis.errors import CheckpointError
from capvis.release import read_release
from capvis.tasks import build_task
from capvis.train.checkpoint import atomic_save

TINY = ["model.backbone=resnet18", "data.image_size=64", "model.textual.hidden=64"]  # 2x2 grid, fast on CPU


def tiny_checkpoint(path, vocab_path, *extra):
    """A capvis checkpoint of a tiny bicaptioning model whose every tensor is off its init value."""
    cfg = load_config("bicaptioning_R_50_L1_H2048", [*TINY, f"data.vocab={vocab_path}", *extra])
    tokenizer = Tokenizer(vocab_path)
    torch.manual_seed(0)
    task = build_task(cfg, tokenizer.vocab_size)
    with torch.no_grad():
        for p in task.parameters():
            p.add_(0.05 * torch.randn_like(p))
        for name, b in task.named_buffers():
            if b.is_floating_point():
                b.copy_(torch.rand_like(b) + 0.5 if name.endswith("running_var") else 0.1 * torch.randn_like(b))
            else:
                b.fill_(17)
    atomic_save({"model": task.state_dict(), "config": cfg.to_dict(), "vocab": tokenizer.model_bytes,
                 "capvis_version": capvis.__version__, "iteration": 17}, path)
    return task.eval()


_CACHE: dict = {}


def _trained(tmp_path_factory, vocab_path):
    """One tiny checkpoint for the four round trips."""
    if "task" not in _CACHE:
        path = tmp_path_factory.mktemp("ckpt") / "ckpt.pt"
        _CACHE["task"] = tiny_checkpoint(path, vocab_path)
        _CACHE["task"].path = path
    return _CACHE["task"]


@pytest.mark.parametrize("name", ["release", "release.tar", "release.zip"])  # .tar.gz: same path as .tar
def test_round_trip_is_bit_exact(tmp_path_factory, coco_tokenizer_path, name, capsys):
    trained = _trained(tmp_path_factory, coco_tokenizer_path)
    out = tmp_path_factory.mktemp("out") / name
    assert main(["release", "--checkpoint", str(trained.path), "--output", str(out)]) == 0
    assert f"release: wrote {out}" in capsys.readouterr().out
    loaded = capvis.load(out, "model")
    a, b = trained.state_dict(), loaded.state_dict()
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    assert loaded.textual.output.weight is loaded.textual.embedding.words.weight
    assert loaded.backward_textual.embedding is loaded.textual.embedding
    assert loaded.tokenizer.model_bytes == coco_tokenizer_path.read_bytes()
    if name != "release":
        return  # equal tensors give equal outputs; the forward pass is checked once, below
    batch = {"image": torch.randn(2, 3, 64, 64), "caption_tokens": torch.tensor([[1, 5, 6, 2], [1, 7, 2, 0]]),
             "caption_lengths": torch.tensor([4, 3])}
    with torch.no_grad():
        assert torch.equal(trained(batch).loss, loaded(batch).loss)
        assert torch.equal(trained.visual(batch["image"]), capvis.load(out)(batch["image"]))


def test_release_contents(tmp_path, coco_tokenizer_path):
    tiny_checkpoint(tmp_path / "ckpt.pt", coco_tokenizer_path)
    assert main(["release", "--checkpoint", str(tmp_path / "ckpt.pt"), "--output", str(tmp_path / "rel")]) == 0
    assert sorted(p.name for p in (tmp_path / "rel").iterdir()) == ["config.json", "model.safetensors", "vocab.model"]
    meta = json.loads((tmp_path / "rel" / "config.json").read_text())
    assert meta["format"] == "capvis-release" and meta["capvis_version"] == capvis.__version__
    assert meta["iteration"] == 17 and meta["vocab_size"] == Tokenizer(coco_tokenizer_path).vocab_size
    assert meta["tied"]["textual.output.weight"] == "textual.embedding.words.weight"
    assert meta["tied"]["backward_textual.output.bias"] == "textual.output.bias"
    assert not any(k.startswith("backward_textual.transformer") for k in meta["tied"])
    assert meta["config"]["model"]["textual"]["hidden"] == 64
    rel = read_release(tmp_path / "rel", prefix="visual.")
    assert rel.state and all(k.startswith("visual.cnn.") for k in rel.state)


def test_corrupt_or_unsafe_outputs_are_refused(tmp_path, coco_tokenizer_path):
    tiny_checkpoint(tmp_path / "ckpt.pt", coco_tokenizer_path)
    rel = tmp_path / "rel"
    assert main(["release", "--checkpoint", str(tmp_path / "ckpt.pt"), "--output", str(rel)]) == 0
    weights = bytearray((rel / "model.safetensors").read_bytes())
    weights[-1] ^= 0xFF
    (rel / "model.safetensors").write_bytes(bytes(weights))
    with pytest.raises(CheckpointError, match="checksum"):
        capvis.load(rel)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="not empty"):
        from capvis.loading import release_from_checkpoint

        release_from_checkpoint(tmp_path / "ckpt.pt", busy)
