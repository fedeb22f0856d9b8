"""Sampling a CaptionWorld scene: which objects, where, and on what background.

A scene is a pure description (no pixels), so captions, labels and COCO boxes are all computed from
the same truth the renderer draws. Each scene is seeded from ``(seed, split, index)`` alone, so any
image can be regenerated on its own, in any order and in any worker process, with identical bytes.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, replace
from functools import cached_property

import numpy as np

from capvis.world.shapes import EXTENT, UNIT_AREA, placed_outlines
from capvis.world.vocab import (BACKGROUNDS, COLOR_NAMES, COLORS, COMBO_WEIGHTS, MAX_OBJECTS, SHAPES,
                                    SIZE_RADIUS)

MAX_OVERLAP = 0.1  # largest fraction of the smaller box that another object's box may cover
_ATTEMPTS = 40
_COMBO_CDF = np.cumsum(COMBO_WEIGHTS.ravel())  # colour-major: combo = colour * len(SHAPES) + shape
_STREAM_SCENE, _STREAM_CAPTIONS = 0, 1


@dataclass(frozen=True)
class WorldObject:
    """One shape in a scene; coordinates in pixels (x right, y down)."""

    shape: str
    color: str
    size: str  # "small" | "large"
    cx: float
    cy: float
    radius: float
    angle: float  # radians
    rgb: tuple[int, int, int]  # the colour actually drawn (named colour with slight jitter)

    @cached_property
    def polygons(self) -> tuple[np.ndarray, np.ndarray | None]:
        """Outer polygon (n, 2) and optional hole polygon (a ring's), in pixels."""
        return placed_outlines(self.shape, self.cx, self.cy, self.radius, self.angle)

    @cached_property
    def bbox(self) -> tuple[float, float, float, float]:
        """COCO box ``[x, y, w, h]`` of the outline (shapes are always placed fully inside the image)."""
        outer, _ = self.polygons
        (x0, y0), (x1, y1) = outer.min(axis=0), outer.max(axis=0)
        return float(x0), float(y0), float(x1 - x0), float(y1 - y0)

    @cached_property
    def area(self) -> float:
        """Pixel area of the shape (a ring's hole excluded)."""
        return UNIT_AREA[self.shape] * self.radius**2


@dataclass(frozen=True)
class Background:
    """How the backdrop is painted: ``kind`` in :data:`BACKGROUNDS`, two desaturated colours, a direction."""

    kind: str
    rgb0: tuple[int, int, int]
    rgb1: tuple[int, int, int]
    angle: float  # gradient direction, radians
    noise_std: float
    noise_seed: int
    mirrored: bool = False


@dataclass(frozen=True)
class Scene:
    image_size: int
    background: Background
    objects: tuple[WorldObject, ...]


def stream_rng(seed: int, split: str, index: int, stream: int) -> np.random.Generator:
    """Independent generator for one image: stream 0 draws the scene, stream 1 the captions."""
    return np.random.default_rng([seed, zlib.crc32(split.encode("utf-8")), index, stream])


def caption_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The generator :func:`capvis.world.grammar.captions` uses for image ``index`` of ``split``."""
    return stream_rng(seed, split, index, _STREAM_CAPTIONS)


def _muted_rgb(rng: np.random.Generator) -> tuple[int, int, int]:
    """A desaturated mid-tone (HSV s <= 0.25, v in [0.35, 0.7]) that no object colour is close to."""
    h, s, v = rng.random(), rng.uniform(0.0, 0.25), rng.uniform(0.35, 0.7)
    k = (np.array([5.0, 3.0, 1.0]) + h * 6.0) % 6.0
    rgb = v - v * s * np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0)
    return tuple(int(round(c * 255)) for c in rgb)  # type: ignore[return-value]


def _background(rng: np.random.Generator) -> Background:
    kind = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
    return Background(kind=kind, rgb0=_muted_rgb(rng), rgb1=_muted_rgb(rng),
                      angle=float(rng.uniform(0, 2 * np.pi)),
                      noise_std=float(rng.uniform(8.0, 20.0)), noise_seed=int(rng.integers(2**31)))


def _overlap(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    """Intersection of two ``[x, y, w, h]`` boxes as a fraction of the smaller one."""
    w = min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0])
    h = min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1])
    if w <= 0 or h <= 0:
        return 0.0
    return w * h / min(a[2] * a[3], b[2] * b[3])


def _place(rng: np.random.Generator, image_size: int, shape: str, color: str, size: str,
           taken: list[tuple[float, float, float, float]]) -> WorldObject | None:
    """Rejection-sample a position (and a mild rotation) whose box barely overlaps the ``taken`` boxes."""
    radius = SIZE_RADIUS[size] * image_size * rng.uniform(0.9, 1.1)
    margin = EXTENT[shape] * radius + 1.0
    centres = rng.uniform(margin, image_size - margin, size=(_ATTEMPTS, 2))
    angles = np.deg2rad(rng.uniform(-12.0, 12.0, size=_ATTEMPTS))
    jitter = rng.integers(-12, 13, size=3)
    rgb = tuple(int(v) for v in np.clip(np.array(COLORS[color]) + jitter, 0, 255))
    for (cx, cy), angle in zip(centres.tolist(), angles.tolist()):
        obj = WorldObject(shape, color, size, cx, cy, float(radius), angle, rgb)  # type: ignore[arg-type]
        if all(_overlap(obj.bbox, box) <= MAX_OVERLAP for box in taken):
            return obj
    return None


def generate_scene(seed: int, split: str, index: int, image_size: int = 64) -> Scene:
    """Sample image ``index`` of ``split``: 1-4 objects with little overlap on a random background.

    Colour and shape come from the long-tailed :data:`COMBO_WEIGHTS`, size is a fair coin. An object
    that finds no free spot is retried small, then dropped, so crowded scenes may hold fewer objects
    than first drawn; counts and labels always come from the result.
    """
    rng = stream_rng(seed, split, index, _STREAM_SCENE)
    background = _background(rng)
    wanted = int(rng.integers(1, MAX_OBJECTS + 1))
    combos = np.searchsorted(_COMBO_CDF, rng.random(wanted), side="right").clip(max=_COMBO_CDF.size - 1)
    large = rng.random(wanted) < 0.5
    objects: list[WorldObject] = []
    taken: list[tuple[float, float, float, float]] = []
    for combo, is_large in zip(combos.tolist(), large.tolist()):
        color, shape = COLOR_NAMES[combo // len(SHAPES)], SHAPES[combo % len(SHAPES)]
        obj = _place(rng, image_size, shape, color, "large" if is_large else "small", taken)
        if obj is None and is_large:
            obj = _place(rng, image_size, shape, color, "small", taken)
        if obj is not None:
            objects.append(obj)
            taken.append(obj.bbox)
    return Scene(image_size=image_size, background=background, objects=tuple(objects))


def flip_scene(scene: Scene) -> Scene:
    """The same scene mirrored left-right (what a horizontal-flip augmentation shows).

    Outlines are mirror symmetric, so mirroring an object is negating its x offset and rotation.
    """
    size = scene.image_size
    objects = tuple(replace(o, cx=size - o.cx, angle=-o.angle) for o in scene.objects)
    bg = scene.background
    background = replace(bg, angle=float(np.pi - bg.angle), mirrored=not bg.mirrored)
    return replace(scene, background=background, objects=objects)
