"""Per-word attention overlays (paper Figure 6): where the caption head looks while emitting each word.

Decoding with ``return_attention=True`` gives, for every emitted token, the last Transformer layer's
cross-attention over the visual grid, averaged over heads (``(n_tokens, h, w)``, rows sum to 1).
SentencePiece may split a word into several pieces; :func:`word_maps` merges those into one word
with the mean of its pieces' maps. Each map is upsampled bilinearly to the image and drawn over it
as a heatmap, one panel per word, with matplotlib's object API (no pyplot, so no global state).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from torch import Tensor

WORD_START = "\u2581"  # SentencePiece's word-boundary mark
MAX_COLUMNS = 5


def word_maps(pieces: Sequence[str], maps: Tensor) -> tuple[list[str], Tensor]:
    """Merge subword pieces into words: ``pieces`` (N,) and ``maps`` (N, h, w) -> words and (W, h, w).

    A piece starting with the word-boundary mark (or the first piece) opens a new word; the map of a
    word is the mean of its pieces' maps. Pieces that are only the mark are dropped.
    """
    words: list[str] = []
    groups: list[list[int]] = []
    for i, piece in enumerate(pieces):
        text = piece.replace(WORD_START, "")
        if piece.startswith(WORD_START) or not groups:
            if not text:
                continue
            words.append(text)
            groups.append([i])
        else:
            words[-1] += text
            groups[-1].append(i)
    if not groups:
        return [], maps.new_zeros((0, *maps.shape[1:]))
    return words, torch.stack([maps[g].mean(dim=0) for g in groups])  # (W, h, w)


def upsample(maps: Tensor, size: tuple[int, int]) -> Tensor:
    """(N, h, w) attention -> (N, H, W), bilinear, each map rescaled to [0, 1] for display."""
    up = F.interpolate(maps.float().unsqueeze(1), size=size, mode="bilinear", align_corners=False)[:, 0]
    lo = up.flatten(1).min(dim=1).values.view(-1, 1, 1)
    hi = up.flatten(1).max(dim=1).values.view(-1, 1, 1)
    return (up - lo) / (hi - lo).clamp(min=1e-12)  # (N, H, W)


def _hwc(image: Tensor | np.ndarray) -> np.ndarray:
    """uint8 image as (H, W, 3), from (3, H, W) tensors/arrays or (H, W, 3) arrays."""
    array = image.detach().cpu().numpy() if isinstance(image, Tensor) else np.asarray(image)
    if array.ndim == 3 and array.shape[0] in (1, 3) and array.shape[-1] not in (1, 3):
        array = array.transpose(1, 2, 0)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    return array.astype(np.uint8)


def attention_figure(image_uint8: Tensor | np.ndarray, words: Sequence[str], maps: Tensor, *,
                     alpha: float = 0.5, cmap: str = "jet", panel_inches: float = 2.2) -> Figure:
    """A figure with one panel per word: the image with the word's attention as a heatmap over it.

    Args:
        image_uint8: the image the model saw (after resize and crop), (3, H, W) or (H, W, 3).
        words: one label per map.
        maps: (len(words), h, w) attention over the visual grid.
        alpha: heatmap opacity.
    """
    if len(words) != maps.shape[0]:
        raise ValueError(f"{len(words)} words but {maps.shape[0]} attention maps")
    image = _hwc(image_uint8)
    height, width = image.shape[:2]
    heat = upsample(maps, (height, width)).numpy() if len(words) else np.zeros((0, height, width))
    n = max(len(words), 1)
    cols = min(n, MAX_COLUMNS)
    rows = -(-n // cols)
    fig = Figure(figsize=(cols * panel_inches, rows * (panel_inches + 0.3)))
    for k in range(rows * cols):
        ax = fig.add_subplot(rows, cols, k + 1)
        ax.set_axis_off()
        if k >= len(words) and k > 0:
            continue
        ax.imshow(image, extent=(0, width, height, 0))
        if k < len(words):
            ax.imshow(heat[k], cmap=cmap, alpha=alpha, extent=(0, width, height, 0), vmin=0.0, vmax=1.0)
            ax.set_title(words[k], fontsize=11)
    fig.tight_layout()
    return fig


def save_attention(path: str | Path, image_uint8: Tensor | np.ndarray, words: Sequence[str], maps: Tensor, *,
                   dpi: int = 100, **kwargs: object) -> Path:
    """Write :func:`attention_figure` to ``path`` (format from the suffix, e.g. ``.png``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig = attention_figure(image_uint8, words, maps, **kwargs)
    fig.savefig(path, dpi=dpi)
    return path
