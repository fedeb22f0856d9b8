"""Linear probe (`capvis eval linear`): protocol pieces, frozen backbone, both CLI paths on a tiny ImageFolder."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers_eval import image_folder, run_cli, tiny_config, tiny_run, world  # noqa: F401 (fixtures)

from capvis.errors import DataError
from capvis.eval.linear import cosine_lambda, image_folders, linear_probe, linear_probe_cached, new_head, topk_correct


def test_head_init_and_schedule():
    torch.manual_seed(0)
    fc = new_head(2048, 1000)
    assert fc.weight.std().item() == pytest.approx(0.01, rel=0.02) and torch.all(fc.bias == 0)
    f = cosine_lambda(100)
    assert f(0) == 1.0 and f(50) == pytest.approx(0.5) and f(100) == pytest.approx(0.0, abs=1e-12)
    assert f(25) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))


def test_topk_counts_and_caps_k_at_class_count():
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.3], [0.2, 0.3, 0.5]])
    assert topk_correct(logits, torch.tensor([1, 2, 0])) == [1, 3]  # top-5 of 3 classes: every row


def test_probe_keeps_backbone_frozen_in_eval_mode(image_folder, tiny_config):
    from capvis.loading import load_pretrained

    backbone = load_pretrained("random", config=tiny_config).backbone
    before = {k: v.clone() for k, v in backbone.state_dict().items()}  # incl. BN running statistics
    res = linear_probe(backbone, image_folder / "train", image_folder / "val", image_size=32, epochs=1,
                       batch_size=8, num_workers=0)
    assert 0 <= res["top1"] <= res["top5"] <= 100 and res["iterations"] == 3
    assert all(torch.equal(before[k], v) for k, v in backbone.state_dict().items())
    assert not backbone.training and not any(p.requires_grad for p in backbone.parameters())


def test_eval_linear_cli_images_and_cached_paths(image_folder, tiny_run, tiny_config, capsys):
    common = ["--train", str(image_folder / "train"), "--val", str(image_folder / "val"), "--epochs", "2",
              "--batch-size", "8", "--loader-workers", "0"]
    res = run_cli(["eval", "linear", "--checkpoint", str(tiny_run), *common], capsys)
    assert 0 <= res["top1"] <= res["top5"] <= 100 and res["val_images"] == 16 and "paper" in res["protocol"]
    assert res["iterations"] == 6
    fast = run_cli(["eval", "linear", "--checkpoint", "random", "--config", str(tiny_config), "--cached-features",
                    "--weight-decays", "1e-3,1e-1", *common], capsys)
    assert fast["checkpoint"] == "random" and fast["protocol"].startswith("FAST PATH")
    assert 0 <= fast["top1"] <= fast["top5"] <= 100 and fast["weight_decay"] in (1e-3, 1e-1)
    assert set(fast["holdout_top1"]) == {"0.001", "0.1"} and fast["val_images"] == 16


def test_cached_probe_is_the_batched_probe_on_the_cached_features(image_folder, tiny_config, tmp_path):
    from capvis.eval.features import extract_features
    from capvis.eval.probe import probe_accuracy
    from capvis.loading import load_pretrained

    backbone = load_pretrained("random", config=tiny_config).backbone
    res = linear_probe_cached(backbone, image_folder / "train", image_folder / "val", image_size=32, num_workers=0,
                              cache_dir=tmp_path, source="some-checkpoint")
    assert len(list(tmp_path.glob("features_*.npy"))) == 2  # both splits cached
    train, val = image_folders(image_folder / "train", image_folder / "val", image_size=32, augment=False)
    feats = [extract_features(backbone, [p for p, _ in split.samples], image_size=32) for split in (train, val)]
    ref = probe_accuracy(feats[0], np.array(train.targets), feats[1], np.array(val.targets), len(train.classes))
    assert res["top1"] == pytest.approx(ref.top1) and res["weight_decay"] == ref.weight_decay


def test_val_classes_follow_train_and_unknown_classes_fail(image_folder, tmp_path):
    train, val = image_folders(image_folder / "train", image_folder / "val", image_size=32)
    assert val.classes == train.classes and val.class_to_idx == train.class_to_idx
    (tmp_path / "zebra").mkdir()
    (tmp_path / "zebra" / "a.jpg").write_bytes((next((image_folder / "val").rglob("*.jpg"))).read_bytes())
    with pytest.raises(DataError, match="zebra"):
        image_folders(image_folder / "train", tmp_path, image_size=32)
    with pytest.raises(DataError, match="ImageFolder layout"):
        image_folders(tmp_path / "zebra", tmp_path, image_size=32)
