"""Drawing a scene into pixels: background in numpy, shapes as anti-aliased PIL polygons.

Each shape is rasterised at 4x inside its own bounding box and box-filtered down to an alpha mask,
then blended over the background. Working per box (not per image) keeps a 64x64 image with four
shapes at a fraction of a millisecond, which is what makes 20,000 images a matter of seconds.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from capvis.world.scene import Background, Scene, WorldObject

SUPERSAMPLE = 4


def _background(bg: Background, size: int) -> np.ndarray:
    """(size, size, 3) float32 backdrop."""
    c0 = np.array(bg.rgb0, dtype=np.float32)
    if bg.kind == "plain":
        return np.broadcast_to(c0, (size, size, 3)).copy()
    if bg.kind == "gradient":
        coords = (np.arange(size, dtype=np.float32) + 0.5) / size - 0.5
        t = np.cos(bg.angle) * coords[None, :] + np.sin(bg.angle) * coords[:, None]  # (H, W)
        t = np.clip(t / np.sqrt(0.5) + 0.5, 0.0, 1.0)[..., None]
        return c0 * (1.0 - t) + np.array(bg.rgb1, dtype=np.float32) * t
    noise = np.random.default_rng(bg.noise_seed).standard_normal((size, size, 3), dtype=np.float32)
    noise *= bg.noise_std
    if bg.mirrored:
        noise = noise[:, ::-1]
    return c0 + noise


def _alpha(points: list[np.ndarray | None], x0: int, y0: int, w: int, h: int) -> np.ndarray:
    """(h, w) coverage in [0, 1] of the first polygon minus the second, inside the box at (x0, y0)."""
    s = SUPERSAMPLE
    mask = Image.new("L", (w * s, h * s), 0)
    draw = ImageDraw.Draw(mask)
    for fill, poly in zip((255, 0), points):
        if poly is not None:
            local = (poly - np.array([x0, y0])) * s - 0.5  # PIL puts pixel centres on integers
            draw.polygon(local.ravel().tolist(), fill=fill)
    small = mask.resize((w, h), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.float32) / 255.0


def _paint(image: np.ndarray, obj: WorldObject) -> None:
    size = image.shape[0]
    outer, hole = obj.polygons
    x0, y0 = np.maximum(np.floor(outer.min(axis=0)).astype(int), 0)
    x1, y1 = np.minimum(np.ceil(outer.max(axis=0)).astype(int), size)
    if x1 <= x0 or y1 <= y0:
        return
    alpha = _alpha([outer, hole], int(x0), int(y0), int(x1 - x0), int(y1 - y0))[..., None]  # (h, w, 1)
    region = image[y0:y1, x0:x1]
    region *= 1.0 - alpha
    region += alpha * np.array(obj.rgb, dtype=np.float32)


def render(scene: Scene) -> np.ndarray:
    """The scene as a (H, W, 3) uint8 RGB image; pure function of the scene (no randomness of its own)."""
    image = _background(scene.background, scene.image_size)
    for obj in scene.objects:
        _paint(image, obj)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)
