"""Fine-grained single-label tasks: questions whose answer binds an attribute to one object picked out
by a relation (the miniature of the paper's ImageNet-linear column).

Presence tasks (``shape``, ``color_shape``) can be answered from a bag of words; these cannot: the
colour of the *leftmost* object, the shape of the object *above all others*, the colour and shape
of the *largest* object. Each answers from the scene description (the same truth the renderer draws
and the captions describe), and only where the answer is clear-cut:

* only scenes with at least two objects (with one object there is nothing to bind or compare);
* ``leftmost_color`` / ``topmost_shape``: the extreme object's centre must lead every other centre
  by at least :data:`RELATION_MARGIN` of the image side (the margin the captions' "left of" and
  "above" use);
* ``largest_color_shape``: the largest radius must be at least :data:`LARGEST_RATIO` times every
  other (so it is the one large object among small ones; sizes vary by +-10% within a size class).

Otherwise the image has no answer: its label is the empty list, and the evaluations leave it out of
that task (never a tie broken by an arbitrary rule). So every labelled image has exactly one class.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from capvis.world.grammar import RELATION_MARGIN
from capvis.world.scene import WorldObject
from capvis.world.vocab import COLOR_NAMES, SHAPES, color_shape_classes

LARGEST_RATIO = 1.3


@dataclass(frozen=True)
class FineTask:
    """A single-label task: class names and ``answer(objects, image_size) -> class index | None``."""

    classes: tuple[str, ...]
    answer: Callable[[Sequence[WorldObject], int], int | None]


def _leader(objects: Sequence[WorldObject], key: Callable[[WorldObject], float], lead: float) -> WorldObject | None:
    """The object with the smallest ``key`` if it is smaller than every other's by at least ``lead``."""
    if len(objects) < 2:
        return None
    first, second = sorted(objects, key=key)[:2]
    return first if key(second) - key(first) >= lead else None


def leftmost_color(objects: Sequence[WorldObject], image_size: int) -> int | None:
    obj = _leader(objects, lambda o: o.cx, RELATION_MARGIN * image_size)
    return None if obj is None else COLOR_NAMES.index(obj.color)


def topmost_shape(objects: Sequence[WorldObject], image_size: int) -> int | None:
    obj = _leader(objects, lambda o: o.cy, RELATION_MARGIN * image_size)  # y points down
    return None if obj is None else SHAPES.index(obj.shape)


def largest_color_shape(objects: Sequence[WorldObject], image_size: int) -> int | None:
    if len(objects) < 2:
        return None
    first, second = sorted(objects, key=lambda o: -o.radius)[:2]
    if first.radius < LARGEST_RATIO * second.radius:
        return None
    return COLOR_NAMES.index(first.color) * len(SHAPES) + SHAPES.index(first.shape)


FINE_TASKS: dict[str, FineTask] = {
    "leftmost_color": FineTask(COLOR_NAMES, leftmost_color),
    "topmost_shape": FineTask(SHAPES, topmost_shape),
    "largest_color_shape": FineTask(tuple(color_shape_classes()), largest_color_shape),
}


def fine_labels(objects: Sequence[WorldObject], image_size: int) -> dict[str, list[int]]:
    """``{task: [class]}``, or ``{task: []}`` where the scene gives no clear answer."""
    out = {}
    for name, task in FINE_TASKS.items():
        k = task.answer(objects, image_size)
        out[name] = [] if k is None else [k]
    return out
