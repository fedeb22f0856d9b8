"""Attention overlays: subword pieces merge into words, maps upsample to the image, figures save as PNG."""

from __future__ import annotations

import torch
from matplotlib.figure import Figure

from capvis.eval.attention import attention_figure, save_attention, upsample, word_maps


def test_word_maps_merges_pieces_by_mean() -> None:
    maps = torch.arange(4 * 2 * 2, dtype=torch.float32).view(4, 2, 2)
    words, merged = word_maps(["\u2581a", "\u2581red", "dish", "\u2581cube"], maps)
    assert words == ["a", "reddish", "cube"]
    assert merged.shape == (3, 2, 2)
    assert torch.equal(merged[1], (maps[1] + maps[2]) / 2) and torch.equal(merged[2], maps[3])


def test_upsample_is_bilinear_and_rescaled() -> None:
    maps = torch.tensor([[[0.0, 1.0], [0.0, 1.0]]])  # attention on the right column
    up = upsample(maps, (8, 8))
    assert up.shape == (1, 8, 8) and float(up.min()) == 0.0 and float(up.max()) == 1.0
    assert bool((up[0, :, 1:] >= up[0, :, :-1]).all())  # increases to the right, smoothly
    assert 0 < float(up[0, 0, 3]) < 1


def test_attention_figure_one_panel_per_word(tmp_path) -> None:
    image = torch.randint(0, 256, (3, 32, 40), dtype=torch.uint8)
    maps = torch.rand(7, 4, 5).softmax(dim=-1)
    fig = attention_figure(image, [f"w{i}" for i in range(7)], maps)
    assert isinstance(fig, Figure)
    titled = [ax for ax in fig.axes if ax.get_title()]
    assert [ax.get_title() for ax in titled] == [f"w{i}" for i in range(7)]
    assert all(len(ax.get_images()) == 2 for ax in titled)  # image + heatmap
    path = save_attention(tmp_path / "sub" / "x.png", image.permute(1, 2, 0).numpy(), ["a"], maps[:1])
    assert path.read_bytes()[:4] == b"\x89PNG"
