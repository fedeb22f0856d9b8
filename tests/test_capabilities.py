"""Commands ask a checkpoint for a capability (tasks/protocols.py) and say in one line when it lacks it;
a ViT backbone captions with attention maps on its patch grid."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import capvis
from capvis.cli import main
from capvis.config import load_config
from capvis.data.tokenizer import Tokenizer
from capvis.errors import ConfigError
from capvis.tasks import build_task
from capvis.tasks.protocols import CaptionLikelihoodModel, Captioner, ImageTextEmbedder, require
from capvis.train.checkpoint import atomic_save

pytestmark = pytest.mark.usefixtures("one_thread")  # restored after each test (conftest)


def checkpoint(tmp_path: Path, vocab: Path, task: str, *extra: str) -> Path:
    cfg = load_config(None, [f"model.task={task}", "model.backbone=resnet18", "model.small_stem=true",
                             "model.visual_width=16", "data.image_size=32", "model.textual.hidden=32",
                             "model.textual.heads=2", "model.textual.feedforward=64", f"data.vocab={vocab}", *extra])
    tokenizer = Tokenizer(vocab)
    torch.manual_seed(0)
    model = build_task(cfg, tokenizer.vocab_size)
    path = tmp_path / f"{task}.pt"
    atomic_save({"model": model.state_dict(), "config": cfg.to_dict(), "vocab": tokenizer.model_bytes,
                 "capvis_version": capvis.__version__, "iteration": 1}, path)
    return path


def one_image(tmp_path: Path) -> Path:
    path = tmp_path / "a.png"
    Image.fromarray(np.full((40, 40, 3), 120, np.uint8)).save(path)
    return path


@pytest.mark.parametrize("command", ["score", "caption"])
def test_token_classification_checkpoint_gets_one_line(command: str, tmp_path: Path, coco_tokenizer_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = checkpoint(tmp_path, coco_tokenizer_path, "token_classification")
    image = one_image(tmp_path)
    if command == "score":
        (tmp_path / "c.jsonl").write_text('{"image": "a.png", "caption": "a red disc"}\n')
        argv = ["score", "--checkpoint", str(ckpt), "--annotations", str(tmp_path / "c.jsonl"),
                "--images", str(tmp_path)]
    else:
        argv = ["caption", "--checkpoint", str(ckpt), str(image)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    lacks = "scores captions (caption_heads)" if command == "score" else "caption decoder (init_decoding"
    assert lacks in err[0] and str(ckpt) in err[0] and "TokenClassificationTask" in err[0]


def test_require_names_each_capability() -> None:
    task = build_task(load_config(None, ["model.task=multilabel_classification", "model.backbone=resnet18"]), 40)
    for capability in (Captioner, CaptionLikelihoodModel, ImageTextEmbedder):
        with pytest.raises(ConfigError, match="MultilabelClassificationTask"):
            require(task, capability, doing="x")
    captioner = build_task(load_config(None, ["model.backbone=resnet18"]), 40)
    assert require(captioner, Captioner, doing="x") is captioner


def test_vit_captions_with_patch_grid_attention(tmp_path: Path, coco_tokenizer_path: Path) -> None:
    from capvis.eval.captioning import DecodeSettings, caption_images

    cfg = load_config(None, ["model.backbone=timm/vit_tiny_patch16_224", "data.image_size=64",
                             "model.textual.hidden=32", "model.textual.heads=2", "model.textual.feedforward=64"])
    tokenizer = Tokenizer(coco_tokenizer_path)
    torch.manual_seed(0)
    task = build_task(cfg, tokenizer.vocab_size).eval()
    rows = caption_images(task, tokenizer, [one_image(tmp_path)], image_size=64,
                          settings=DecodeSettings(method="greedy", max_steps=4), attention_dir=tmp_path / "att")
    assert len(rows) == 1 and isinstance(rows[0]["caption"], str)
    assert task.init_decoding(torch.zeros(1, 3, 64, 64)).extras["grid_size"] == (4, 4)  # 64 px / 16: the patches
    assert [p.name for p in (tmp_path / "att").glob("a.*.png")] == [f"a.{rows[0]['image_id']}.png"]
