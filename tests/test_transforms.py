"""Transforms: whole-word left/right swap tied to the flip, exact mirroring, eval resize + center crop."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from capvis.config import DataConfig
from capvis.data.transforms import (IMAGENET_MEAN, IMAGENET_STD, TrainTransform, build_eval_transform,
                                    build_train_transform, swap_left_right)


def _image(h: int = 40, w: int = 56) -> torch.Tensor:
    return torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize(("text", "expected"), [
    ("a dog on the left, a cat on the right.", "a dog on the right, a cat on the left."),
    ("bright copyright leftover righteous", "bright copyright leftover righteous"),
    ("Left hand; RIGHT foot", "Right hand; LEFT foot"),
    ("left-right", "right-left"),
])
def test_swap_left_right_whole_words(text: str, expected: str) -> None:
    assert swap_left_right(text) == expected


def test_flip_swaps_caption_and_mirrors_image() -> None:
    cfg = DataConfig(image_size=32, color_jitter_p=1.0)
    always = build_train_transform(dataclasses.replace(cfg, hflip_p=1.0))
    never = build_train_transform(dataclasses.replace(cfg, hflip_p=0.0))
    image, caption = _image(), "a bright dog on the left"
    flipped, cap_f = always(image, caption, torch.Generator().manual_seed(7))
    plain, cap_p = never(image, caption, torch.Generator().manual_seed(7))
    assert cap_f == "a bright dog on the right" and cap_p == caption
    assert flipped.shape == (3, 32, 32) and flipped.dtype == torch.float32
    torch.testing.assert_close(flipped, plain.flip(-1), atol=1e-5, rtol=0)  # same crop and jitter, mirrored


def test_train_transform_is_seeded_and_leaves_global_rng_alone() -> None:
    t = build_train_transform(DataConfig(image_size=24))
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = t(_image(), "x", torch.Generator().manual_seed(3))[0]
    b = t(_image(), "x", torch.Generator().manual_seed(3))[0]
    c = t(_image(), "x", torch.Generator().manual_seed(4))[0]
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(torch.get_rng_state(), state)


def test_crop_params_respect_scale_and_ratio() -> None:
    t = TrainTransform(size=16, crop_scale=(0.2, 1.0))
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        top, left, h, w = t.crop_params(60, 80, g)
        assert 0 <= top <= 60 - h and 0 <= left <= 80 - w
        assert 0.2 * 4800 * 0.8 <= h * w <= 4800  # rounding slack on the low end


def test_eval_transform_resizes_shorter_side_and_center_crops() -> None:
    image = torch.zeros(3, 40, 80, dtype=torch.uint8)
    image[:, :, 20:60] = 255  # the central square is white
    out = build_eval_transform(20)(image)
    assert out.shape == (3, 20, 20)
    white = (1.0 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    torch.testing.assert_close(out[:, 10, 10], white, atol=1e-4, rtol=0)
    assert build_eval_transform(16, resize=20)(image).shape == (3, 16, 16)
