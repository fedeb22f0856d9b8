"""``capvis.load`` and ``hubconf.py``: one-line loading from checkpoints, run dirs, releases, torch.hub."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import capvis
from capvis.config import load_config
from capvis.data.tokenizer import Tokenizer
from capvis.errors import CheckpointError, ConfigError
from capvis.models.backbones import VisualBackbone
from capvis.loading import release_from_checkpoint
from capvis.tasks import build_task
from capvis.train.checkpoint import atomic_save, checkpoint_path

REPO = Path(__file__).resolve().parents[1]
TINY = ["model.backbone=resnet18", "data.image_size=64", "model.textual.hidden=64"]
TINY_KWARGS = {"model__backbone": "resnet18", "data__image_size": 64, "model__textual__hidden": 64}


@pytest.fixture
def trained(tmp_path, coco_tokenizer_path):
    """A run directory with one checkpoint of a tiny bicaptioning model (every tensor off its init)."""
    cfg = load_config("bicaptioning_R_50_L1_H2048", [*TINY, f"data.vocab={coco_tokenizer_path}"])
    tokenizer = Tokenizer(coco_tokenizer_path)
    torch.manual_seed(0)
    task = build_task(cfg, tokenizer.vocab_size)
    with torch.no_grad():
        for p in task.parameters():
            p.add_(0.05 * torch.randn_like(p))
        for name, b in task.named_buffers():
            if name.endswith("running_var"):
                b.copy_(torch.rand_like(b) + 0.5)
    run = tmp_path / "run"
    atomic_save({"model": task.state_dict(), "config": cfg.to_dict(), "vocab": tokenizer.model_bytes,
                 "capvis_version": capvis.__version__, "iteration": 3}, checkpoint_path(run / "checkpoints", 3))
    return task.eval(), run


def test_load_gives_the_trained_model(trained):
    task, run = trained
    ckpt = checkpoint_path(run / "checkpoints", 3)
    images = torch.randn(2, 3, 64, 64)
    tokens, lengths = torch.tensor([[1, 5, 6, 2], [1, 7, 2, 0]]), torch.tensor([4, 3])
    with torch.no_grad():
        grid = task.visual(images)
        logits = task.textual(grid, tokens, lengths)
        backbone = capvis.load(ckpt)  # part="backbone" by default
        assert isinstance(backbone, VisualBackbone) and not backbone.training
        assert torch.equal(backbone(images), grid) and backbone(images).shape == (2, 512, 2, 2)
        assert backbone.config.data.image_size == 64
        model = capvis.load(run, part="model")  # a run directory: its newest checkpoint
        assert not model.training and model.tokenizer.vocab_size == task.textual.vocab_size
        assert torch.equal(model.textual(model.visual(images), tokens, lengths), logits)


def test_load_errors_name_the_problem(tmp_path):
    with pytest.raises(CheckpointError, match="no release, checkpoint or run directory"):
        capvis.load(tmp_path / "missing.pt")
    with pytest.raises(ConfigError, match="part must be one of"):
        capvis.load(tmp_path, part="head")


def test_named_release_under_capvis_home(trained, tmp_path, monkeypatch):
    task, run = trained
    monkeypatch.setenv("CAPVIS_HOME", str(tmp_path / "home"))
    release_from_checkpoint(run, tmp_path / "home" / "releases" / "tiny.zip")
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(capvis.load("tiny")(images), task.visual(images))


def test_torch_hub_local_load(trained, tmp_path):
    task, run = trained
    release = release_from_checkpoint(run, tmp_path / "tiny.tar")
    model = torch.hub.load(str(REPO), "bicaptioning_r50_l1_h2048", source="local", weights=str(release),
                           part="model", **TINY_KWARGS)
    a, b = task.state_dict(), model.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(CheckpointError, match="is not a bicaptioning_r50_l1_h2048 model"):
        torch.hub.load(str(REPO), "bicaptioning_r50_l1_h2048", source="local", weights=str(release))
    random_r50 = torch.hub.load(str(REPO), "bicaptioning_r50_l1_h2048", source="local")  # weights=None: random init
    assert isinstance(random_r50, VisualBackbone) and random_r50.name == "resnet50" and not random_r50.training
    with torch.no_grad():
        assert random_r50(torch.randn(1, 3, 64, 64)).shape == (1, 2048, 2, 2)


def test_hubconf_has_an_entry_per_paper_architecture():
    spec = importlib.util.spec_from_file_location("capvis_hubconf", REPO / "hubconf.py")
    hubconf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hubconf)
    entries = sorted(n for n in dir(hubconf) if callable(getattr(hubconf, n)) and not n.startswith("_"))
    assert entries == sorted([
        "bicaptioning_r50_l1_h512", "bicaptioning_r50_l1_h768", "bicaptioning_r50_l1_h1024",
        "bicaptioning_r50_l1_h2048", "bicaptioning_r50_l2_h1024", "bicaptioning_r50_l3_h1024",
        "bicaptioning_r50_l4_h1024", "captioning_r50_l1_h2048", "bicaptioning_r101_l1_h1024",
        "bicaptioning_r50w2x_l1_h1024"])
    assert hubconf.dependencies == ["torch", "torchvision"]
    model = hubconf.captioning_r50_l1_h2048(part="model", **TINY_KWARGS)
    assert type(model).__name__ == "CaptioningTask" and model.textual.hidden == 64


def test_import_capvis_stays_light():
    code = "import sys, capvis; assert 'torch' not in sys.modules; assert callable(capvis.load)"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)
