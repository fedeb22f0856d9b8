"""Evaluation images are decoded once per process and give the per-image transform's tensors."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from capvis.config import load_config
from capvis.data import eval_images
from capvis.data.decode import load_image
from capvis.data.eval_images import STORE, eval_batches
from capvis.data.transforms import build_eval_transform
from capvis.errors import ConfigError
from capvis.eval.features import extract_features
from capvis.tasks import build_task


def _images(root: Path, n: int, size: tuple[int, int] = (40, 30)) -> list[Path]:
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        p = root / f"im{i}.png"
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(p)
        paths.append(p)
    return paths


@pytest.fixture
def counted_loads(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Every file decoded through the evaluation image path, in order."""
    STORE.clear()
    seen: list[Path] = []

    def load(path):
        seen.append(Path(path))
        return load_image(path)

    monkeypatch.setattr(eval_images, "load_image", load)
    yield seen
    STORE.clear()


@pytest.mark.parametrize("size,resize", [(16, None), (16, 20), (24, 27)])
def test_batches_equal_the_per_image_transform(tmp_path: Path, counted_loads: list[Path], size: int,
                                               resize: int | None) -> None:
    paths = _images(tmp_path, 5)
    want = torch.stack([build_eval_transform(size, resize)(load_image(p)) for p in paths])
    for _ in range(2):  # decoded, then from the store
        got = torch.cat(list(eval_batches(paths, image_size=size, resize=resize, batch_size=2)))
        assert got.dtype == torch.float32
        assert torch.equal(got, want)
    assert len(counted_loads) == 5


def test_second_pass_decodes_nothing_and_a_rewritten_file_is_decoded_again(tmp_path: Path,
                                                                           counted_loads: list[Path]) -> None:
    paths = _images(tmp_path, 4)
    first = torch.cat(list(eval_batches(paths, image_size=16, batch_size=3)))
    second = torch.cat(list(eval_batches(paths, image_size=16, batch_size=3)))
    assert torch.equal(first, second) and len(counted_loads) == 4
    list(eval_batches(paths, image_size=12, batch_size=3))  # another geometry: another entry
    assert len(counted_loads) == 8
    Image.new("RGB", (40, 30), (255, 0, 0)).save(paths[1])
    os.utime(paths[1], ns=(1, 1))
    third = torch.cat(list(eval_batches(paths, image_size=16, batch_size=3)))
    assert len(counted_loads) == 12
    assert not torch.equal(third[1], first[1]) and torch.equal(third[0], first[0])


def test_cache_budget_zero_keeps_nothing_and_a_small_budget_evicts_the_oldest(
        tmp_path: Path, counted_loads: list[Path], monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "b").mkdir()
    a, b = _images(tmp_path, 3), _images(tmp_path / "b", 3)
    monkeypatch.setenv(eval_images.CACHE_ENV, "0")
    for _ in range(2):
        list(eval_batches(a, image_size=16))
    assert len(counted_loads) == 6 and not STORE.sets
    one_set = 3 * 3 * 16 * 16
    monkeypatch.setenv(eval_images.CACHE_ENV, str(1.5 * one_set / 2**20))  # room for one set of 3
    list(eval_batches(a, image_size=16))
    list(eval_batches(b, image_size=16))  # evicts a
    list(eval_batches(b, image_size=16))
    assert len(counted_loads) == 12
    list(eval_batches(a, image_size=16))
    assert len(counted_loads) == 15


@pytest.mark.parametrize("value", ["lots", "-1", "nan", "inf", ""])
def test_an_unusable_cache_budget_is_a_one_line_error_naming_the_variable(
        tmp_path: Path, value: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(eval_images.CACHE_ENV, value)
    with pytest.raises(ConfigError, match=f"{eval_images.CACHE_ENV}={value!r}") as caught:
        list(eval_batches(_images(tmp_path, 2), image_size=16))
    assert "\n" not in str(caught.value)


def test_features_of_two_backbones_decode_the_images_once(tmp_path: Path, counted_loads: list[Path]) -> None:
    paths = _images(tmp_path, 6, size=(24, 24))
    torch.manual_seed(0)
    cfg = load_config(None, ["model.task=captioning", "model.backbone=resnet18", "model.small_stem=true",
                             "model.textual.hidden=64"])
    nets = [build_task(cfg, 16).visual.eval() for _ in range(2)]
    feats = [extract_features(net, paths, image_size=16, batch_size=4) for net in nets]
    assert len(counted_loads) == 6
    assert feats[0].shape[0] == 6 and not np.allclose(feats[0], feats[1])
    again = extract_features(nets[0], paths, image_size=16, batch_size=4)
    np.testing.assert_array_equal(again, feats[0])
    assert len(counted_loads) == 6
