"""Shape outlines as polygons, shared by layout (bounding boxes), drawing and COCO segmentation.

Every unit outline is centred on the origin with radius about 1, y pointing down, and mirror
symmetric about the vertical axis; so mirroring a placed shape is the same as negating its rotation,
which is what makes a horizontally flipped scene an ordinary scene (see ``flip_scene``).
"""

from __future__ import annotations

import numpy as np


def _regular(n: int, radius: float, start_deg: float = -90.0) -> np.ndarray:
    angles = np.deg2rad(start_deg + 360.0 * np.arange(n) / n)
    return np.stack([radius * np.cos(angles), radius * np.sin(angles)], axis=1)  # (n, 2)


def _star(points: int = 5, outer: float = 1.15, inner: float = 0.48) -> np.ndarray:
    radii = np.where(np.arange(2 * points) % 2 == 0, outer, inner)
    angles = np.deg2rad(-90.0 + 180.0 * np.arange(2 * points) / points)
    return np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)  # (2p, 2)


def _cross(arm: float = 1.0, half: float = 0.34) -> np.ndarray:
    a, h = arm, half
    return np.array([(-h, -a), (h, -a), (h, -h), (a, -h), (a, h), (h, h),
                     (h, a), (-h, a), (-h, h), (-a, h), (-a, -h), (-h, -h)], dtype=float)


# shape -> (outer outline, hole outline or None); radius ~1, sized so that areas look comparable.
UNIT_OUTLINES: dict[str, tuple[np.ndarray, np.ndarray | None]] = {
    "circle": (_regular(48, 1.0), None),
    "square": (np.array([(-0.82, -0.82), (0.82, -0.82), (0.82, 0.82), (-0.82, 0.82)]), None),
    "triangle": (_regular(3, 1.2) + np.array([0.0, 0.15]), None),
    "diamond": (np.array([(0.0, -1.15), (0.78, 0.0), (0.0, 1.15), (-0.78, 0.0)]), None),
    "star": (_star(), None),
    "cross": (_cross(), None),
    "ring": (_regular(48, 1.0), _regular(48, 0.55)),
    "hexagon": (_regular(6, 1.0), None),
}
# Area of each unit shape (a ring's hole excluded); a placed shape's area is this times radius squared.
UNIT_AREA: dict[str, float] = {}
# Largest distance of an outline point from the centre, for placement margins.
EXTENT: dict[str, float] = {k: float(np.linalg.norm(v[0], axis=1).max()) for k, v in UNIT_OUTLINES.items()}


def placed_outlines(shape: str, cx: float, cy: float, radius: float, angle: float,
                    ) -> tuple[np.ndarray, np.ndarray | None]:
    """Outer (and hole) polygon of a shape placed in pixel coordinates.

    Args:
        cx, cy: centre in pixels (x right, y down; pixel i covers [i, i+1)).
        radius: scale in pixels.
        angle: rotation in radians (clockwise on screen).
    """
    cos, sin = np.cos(angle), np.sin(angle)
    rot = np.array([[cos, sin], [-sin, cos]])
    outer, hole = UNIT_OUTLINES[shape]
    place = lambda pts: pts @ rot * radius + np.array([cx, cy])  # noqa: E731  (n, 2)
    return place(outer), (None if hole is None else place(hole))


def polygon_area(points: np.ndarray) -> float:
    """Shoelace area of a simple polygon (n, 2)."""
    x, y = points[:, 0], points[:, 1]
    return float(abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))) / 2.0)


UNIT_AREA.update({name: polygon_area(outer) - (0.0 if hole is None else polygon_area(hole))
                  for name, (outer, hole) in UNIT_OUTLINES.items()})
