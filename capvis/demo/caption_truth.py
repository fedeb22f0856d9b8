"""Are generated captions true of the picture? CaptionWorld knows every object's colour and shape,
so a caption's claims can be checked instead of compared with reference sentences.

A *mention* is a colour word followed, within two words (size adjectives, a number word), by a shape
noun or its plural: "a big red disc" -> (red, circle); "two blue stars" -> (blue, star). Its precision
is the share of mentions whose (colour, shape) is in the image; recall is the share of the image's
distinct (colour, shape) objects that some mention names. Shape nouns alone are scored the same way.

A false mention is wrong in one of three ways, which point at different fixes: its shape is in no object
(the ConvNet does not see the shape), its colour is in no object, or both are there but on different
objects (the head binds them wrongly). Where the colour picks out a single object, the pair (that
object's shape, the shape said) is one cell of a shape confusion matrix.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from capvis.world.vocab import COLOR_NAMES, SHAPE_WORDS, plural

_NOUNS: dict[str, str] = {w: shape for shape, words in SHAPE_WORDS.items() for n in words for w in (n, plural(n))}
_LOOKAHEAD = 3  # colour, then at most two words, then the noun
ERROR_KINDS = ("wrong_shape", "wrong_colour", "misbound")  # how a false mention is false, in this order


def mentions(caption: str) -> tuple[list[tuple[str, str]], list[str]]:
    """``(colour-shape mentions, shape mentions)`` of one caption, in order."""
    words = re.findall(r"[a-z]+", caption.lower())
    pairs = []
    for i, word in enumerate(words):
        if word in COLOR_NAMES:
            noun = next((words[j] for j in range(i + 1, min(i + 1 + _LOOKAHEAD, len(words)))
                         if words[j] in _NOUNS), None)
            if noun is not None:
                pairs.append((word, _NOUNS[noun]))
    return pairs, [_NOUNS[w] for w in words if w in _NOUNS]


def caption_truth(captions: Mapping[int, str], objects: Mapping[int, Sequence[tuple[str, str]]]) -> dict[str, float]:
    """Precision of colour-shape and shape mentions, and recall of the images' objects, in %.

    Args:
        captions: image id -> generated caption.
        objects: image id -> the image's objects as ``(colour, shape)``.
    """
    said = true = shape_said = shape_true = named = total = vague = 0
    errors: Counter[str] = Counter()
    for image_id, caption in captions.items():
        present = {obj[:2] for obj in objects[image_id]}  # (colour, shape), whatever follows
        pairs, shapes = mentions(caption)
        present_shapes, present_colours = {s for _, s in present}, {c for c, _ in present}
        said, true = said + len(pairs), true + sum(p in present for p in pairs)
        errors.update(_error(pair, present_shapes, present_colours) for pair in pairs if pair not in present)
        shape_said, shape_true = shape_said + len(shapes), shape_true + sum(s in present_shapes for s in shapes)
        named, total = named + len(present & set(pairs)), total + len(present)
        vague += not pairs and not shapes
    pct = lambda a, b: round(100.0 * a / b, 2) if b else 0.0
    return {"color_shape_precision": pct(true, said), "object_recall": pct(named, total),
            "shape_precision": pct(shape_true, shape_said), "mentions_per_caption": round(said / max(len(captions), 1), 2),
            "vague_captions": pct(vague, len(captions)), "captions": len(captions),
            **{f"{kind}_mentions": pct(errors[kind], said) for kind in ERROR_KINDS}}


def _error(pair: tuple[str, str], shapes: set[str], colours: set[str]) -> str:
    """Which way the false mention ``pair`` is false, given the image's shapes and colours (a shape in no
    object counts first)."""
    colour, shape = pair
    if shape not in shapes:
        return "wrong_shape"
    return "wrong_colour" if colour not in colours else "misbound"


def _resolved(captions: Mapping[int, str], objects: Mapping[int, Sequence[tuple]]) -> Iterator[tuple[tuple, str]]:
    """``(the object meant, the shape said)`` for each mention whose colour belongs to exactly one object of the
    image, so which object the caption meant is known. Objects are ``(colour, shape, ...)`` tuples."""
    for image_id, caption in captions.items():
        by_colour: dict[str, list[tuple]] = {}
        for obj in objects[image_id]:
            by_colour.setdefault(obj[0], []).append(obj)
        for colour, said in mentions(caption)[0]:
            if len(by_colour.get(colour, ())) == 1:
                yield by_colour[colour][0], said


def shape_confusion(captions: Mapping[int, str], objects: Mapping[int, Sequence[tuple[str, str]]]
                    ) -> Counter[tuple[str, str]]:
    """``(true shape, said shape) -> count`` over the mentions whose colour belongs to exactly one object of
    the image; the diagonal counts right shapes."""
    return Counter((obj[1], said) for obj, said in _resolved(captions, objects))


def shape_right_by_size(captions: Mapping[int, str], objects: Mapping[int, Sequence[tuple[str, str, float]]],
                        bins: int = 5) -> list[dict[str, Any]]:
    """Share of the resolved mentions (as in :func:`shape_confusion`) that name the right shape, in ``bins``
    groups of nearly equal count by the object's extent (``objects`` from ``world_objects(..., extent=True)``).
    If small objects were the false ones, the image's resolution would cap caption truth; flat rows say
    the model, not the pixels, is what misses the shape."""
    found = sorted((obj[2], obj[1] == said) for obj, said in _resolved(captions, objects))
    groups = [found[len(found) * i // bins: len(found) * (i + 1) // bins] for i in range(bins)]
    return [{"extent_px": [g[0][0], g[-1][0]], "mentions": len(g),
             "shape_right": round(100.0 * sum(ok for _, ok in g) / len(g), 2)} for g in groups if g]


def world_objects(instances_file: str | Path, *, extent: bool = False) -> dict[int, list[tuple]]:
    """image id -> ``(colour, shape)`` of its objects, from a CaptionWorld ``instances_<split>.json``; with
    ``extent``, ``(colour, shape, the longer side of its box in pixels)``."""
    data = json.loads(Path(instances_file).read_text())
    names = {c["id"]: c["name"] for c in data["categories"]}
    out: dict[int, list[tuple]] = {im["id"]: [] for im in data["images"]}
    for ann in data["annotations"]:
        obj = (ann["color"], names[ann["category_id"]])
        out[ann["image_id"]].append((*obj, max(ann["bbox"][2:])) if extent else obj)
    return out
