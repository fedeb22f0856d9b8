"""End-to-end classification fine-tuning (`capvis finetune classify`) on a tiny ImageFolder."""

from __future__ import annotations

import pytest
import torch
from helpers_eval import image_folder, run_cli, tiny_run, world  # noqa: F401 (fixtures)
from torchvision.models import resnet18

from capvis.eval.finetune import multistep_lambda


def test_steps_at_70_and_90_percent():
    f = multistep_lambda(100)
    assert [f(t) for t in (0, 69, 70, 89, 90, 99)] == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01])


def test_finetune_classify_cli_trains_and_saves_torchvision_weights(image_folder, tiny_run, tmp_path, capsys):
    from capvis.loading import load_pretrained

    out = tmp_path / "ft.pt"
    res = run_cli(["finetune", "classify", "--checkpoint", str(tiny_run), "--train", str(image_folder / "train"),
                   "--val", str(image_folder / "val"), "--epochs", "1", "--batch-size", "8", "--loader-workers", "0",
                   "--output", str(out)], capsys)
    assert 0 <= res["top1"] <= res["top5"] <= 100 and res["iterations"] == 3 and res["precision"] == "fp32"
    state = torch.load(out, map_location="cpu")
    assert state["classes"] == sorted(p.name for p in (image_folder / "train").iterdir())
    net = resnet18(num_classes=len(state["classes"]))
    assert net.load_state_dict(state["model"]).missing_keys == []  # strict: no missing or unexpected keys
    before = load_pretrained(tiny_run).backbone.cnn.state_dict()
    changed = [k for k, v in before.items() if k in state["model"] and not torch.equal(v, state["model"][k])]
    assert any(k.endswith("running_mean") for k in changed) and any(k.endswith("conv1.weight") for k in changed)
