"""``capvis export``: torchvision state dict (strict load), Detectron2 .pkl names, ONNX through onnxruntime."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from torch import nn
from torchvision import models as tvm

import capvis
from capvis.cli import main
from capvis.config import load_config
from capvis.interop.detectron2 import detectron2_state_dict
from capvis.interop.torchvision import torchvision_state_dict
from capvis.models.backbones import build_backbone
from capvis.tasks import build_task
from capvis.train.checkpoint import atomic_save


def randomized(backbone):
    """Every weight and BatchNorm statistic off its init value, in eval mode."""
    with torch.no_grad():
        for p in backbone.parameters():
            p.add_(0.05 * torch.randn_like(p))
        for name, b in backbone.named_buffers():
            if b.is_floating_point():
                b.copy_(torch.rand_like(b) + 0.5 if name.endswith("running_var") else 0.1 * torch.randn_like(b))
    return backbone.eval()


@pytest.fixture(scope="module")
def r50():
    torch.manual_seed(0)
    return randomized(build_backbone("resnet50"))


def test_torchvision_export_loads_strictly_into_resnet50(r50):
    state = torchvision_state_dict(r50)
    reference = tvm.resnet50()
    result = reference.load_state_dict(state, strict=True)
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert state["fc.weight"].shape == (1000, 2048) and not state["fc.bias"].any()
    reference.eval().fc = nn.Identity()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(reference(images), r50.pooled(images), atol=1e-6)  # avgpool of the same grid


def test_detectron2_names(r50):
    names = detectron2_state_dict(r50)
    cnn = r50.cnn.state_dict()
    assert len(names) == len([k for k in cnn if not k.endswith("num_batches_tracked")]) == 265
    for key in ("stem.conv1.weight", "stem.conv1.norm.weight", "stem.conv1.norm.bias", "stem.conv1.norm.running_mean",
                "stem.conv1.norm.running_var", "res2.0.conv1.weight", "res2.0.conv1.norm.weight",
                "res2.0.conv3.norm.running_var", "res2.0.shortcut.weight", "res2.0.shortcut.norm.bias",
                "res3.3.conv2.weight", "res4.5.conv3.norm.weight", "res5.0.shortcut.norm.running_mean",
                "res5.2.conv3.weight"):
        assert key in names, key
    assert not any(s in k for k in names for s in ("layer", "bn", "downsample", "fc.", "num_batches_tracked"))
    assert np.array_equal(names["res4.5.conv3.norm.weight"], cnn["layer3.5.bn3.weight"].numpy())
    assert np.array_equal(names["stem.conv1.weight"], cnn["conv1.weight"].numpy())  # RGB order kept, no flip
    assert names["res5.2.conv3.weight"].dtype == np.float32


def test_export_cli_writes_all_three_formats(tmp_path, capsys):
    cfg = load_config("bicaptioning_R_50_L1_H2048", ["model.backbone=resnet18", "data.image_size=64",
                                                     "model.textual.hidden=64", "model.vocab_size=50"])
    torch.manual_seed(0)
    task = build_task(cfg, 50)
    randomized(task.visual)
    ckpt = tmp_path / "ckpt.pt"
    atomic_save({"model": task.state_dict(), "config": cfg.to_dict(), "vocab": None,
                 "capvis_version": capvis.__version__}, ckpt)
    out = tmp_path / "export"
    assert main(["export", "--checkpoint", str(ckpt), "--output", str(out)]) == 0
    assert "backbone.onnx" in capsys.readouterr().out
    backbone = task.visual.eval()
    images = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        grid = backbone(images)

    reference = tvm.resnet18()
    reference.load_state_dict(torch.load(out / "backbone_torchvision.pth", weights_only=True), strict=True)

    with (out / "backbone_detectron2.pkl").open("rb") as fh:
        d2 = pickle.load(fh)
    assert d2["__author__"] == "capvis" and d2["matching_heuristics"] is True
    assert set(d2["model"]) == set(detectron2_state_dict(backbone))

    try:
        import onnxruntime as ort
    except ImportError:  # pragma: no cover - onnxruntime is a test dependency where it installs
        import onnx

        onnx.checker.check_model(str(out / "backbone.onnx"), full_check=True)
        return
    session = ort.InferenceSession(str(out / "backbone.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["images"]
    onnx_grid = session.run(None, {"images": images.numpy()})[0]  # batch 3: the export example had 2
    assert onnx_grid.shape == (3, 512, 2, 2)
    assert np.allclose(onnx_grid, grid.numpy(), atol=1e-4, rtol=1e-4)
    wide = torch.randn(1, 3, 64, 96)  # height and width are dynamic too
    with torch.no_grad():
        assert np.allclose(session.run(None, {"images": wide.numpy()})[0], backbone(wide).numpy(), atol=1e-4, rtol=1e-4)


def test_demo_backbones_are_refused_in_one_line(tmp_path, capsys):
    code = main(["export", "--checkpoint", "random", "--config", "bicaptioning_R_50_L1_H2048", "--output",
                 str(tmp_path), "--formats", "torchvision", "model.backbone=resnet18", "model.small_stem=true"])
    err = capsys.readouterr().err
    assert code == 2 and "small_stem" in err and len(err.strip().splitlines()) == 1
    assert not list(tmp_path.iterdir())
    code = main(["export", "--checkpoint", "random", "--config", "bicaptioning_R_50_L1_H2048", "--output",
                 str(tmp_path), "--formats", "tflite"])
    assert code == 2 and "--formats" in capsys.readouterr().err
