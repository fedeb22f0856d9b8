"""The fixed vocabulary of CaptionWorld: shapes, colours, sizes, their words and how often each appears.

These tables define the world, so they are constants: changing one changes every generated image,
caption and label file. Shape outlines live in :mod:`capvis.world.shapes`. Colour names have no
synonyms on purpose (a colour-shape class must be recoverable from the text), while shape nouns,
size adjectives and sentence openers do, so the captions are varied but never ambiguous.

Object attributes are long-tailed by construction: each (colour, shape) combination has a fixed
frequency rank, and weights decay geometrically with rank (:data:`COMBO_WEIGHTS`). Ranks are laid
out as a Latin square (every tier of 8 ranks holds each shape once, with different colours), so
shape presence stays roughly balanced while colour-shape presence has a head and a long, rare tail.
"""

from __future__ import annotations

import numpy as np

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "star", "cross", "ring", "hexagon")

# Saturated, mutually distinct colours; backgrounds are desaturated mid tones so they never read as these.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 30, 30),
    "green": (30, 165, 50),
    "blue": (35, 70, 220),
    "yellow": (240, 220, 30),
    "purple": (135, 40, 180),
    "orange": (250, 130, 20),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
    "cyan": (30, 210, 220),
    "pink": (250, 125, 195),
}
COLOR_NAMES: tuple[str, ...] = tuple(COLORS)

SIZES: tuple[str, ...] = ("small", "large")
# Object radius as a fraction of the image side (before +-10% jitter).
SIZE_RADIUS: dict[str, float] = {"small": 0.10, "large": 0.175}
SIZE_WORDS: dict[str, tuple[str, ...]] = {"small": ("small", "little"), "large": ("large", "big")}

# Singular noun synonyms per shape (the first is the class name) and their plurals.
SHAPE_WORDS: dict[str, tuple[str, ...]] = {
    "circle": ("circle", "disc"),
    "square": ("square", "box"),
    "triangle": ("triangle",),
    "diamond": ("diamond", "rhombus"),
    "star": ("star",),
    "cross": ("cross", "plus"),
    "ring": ("ring", "hoop"),
    "hexagon": ("hexagon",),
}
PLURALS: dict[str, str] = {"box": "boxes", "cross": "crosses", "plus": "pluses", "rhombus": "rhombuses"}

NUMBER_WORDS: tuple[str, ...] = ("zero", "one", "two", "three", "four", "five", "six")
BACKGROUNDS: tuple[str, ...] = ("plain", "noise", "gradient")
BACKGROUND_WORDS: dict[str, tuple[str, ...]] = {
    "plain": ("plain", "solid", "flat"),
    "noise": ("noisy", "grainy", "speckled"),
    "gradient": ("gradient", "shaded", "fading"),
}

COUNT_CLASSES: tuple[str, ...] = ("1", "2", "3", "4")
MAX_OBJECTS = len(COUNT_CLASSES)

# Geometric decay of combination weight per rank step; 8 ranks per tier -> tier weight ratio 0.55.
_DECAY_PER_RANK = 0.55 ** (1 / len(SHAPES))
_LAYOUT_SEED = 20240601  # fixed: which combinations are rare is a property of the world, not of a seed


def plural(noun: str) -> str:
    """English plural of a shape noun."""
    return PLURALS.get(noun, noun + "s")


def color_shape_classes() -> list[str]:
    """Class names of the colour-shape task, colour-major: ``"red circle", "red square", ...``."""
    return [f"{c} {s}" for c in COLOR_NAMES for s in SHAPES]


def _combo_weights() -> np.ndarray:
    """(colours, shapes) sampling weights, summing to 1, Latin-square ranked (see module docstring)."""
    rng = np.random.default_rng(_LAYOUT_SEED)
    n_shapes, n_colors = len(SHAPES), len(COLOR_NAMES)
    color_perm = rng.permutation(n_colors)
    weights = np.zeros((n_colors, n_shapes))
    for tier in range(n_colors):
        order = rng.permutation(n_shapes)  # position of each shape within this tier
        for shape in range(n_shapes):
            color = color_perm[(shape + tier) % n_colors]
            rank = tier * n_shapes + order[shape]
            weights[color, shape] = _DECAY_PER_RANK**rank
    return weights / weights.sum()


COMBO_WEIGHTS: np.ndarray = _combo_weights()
