"""Captions for a scene: a small grammar with synonyms, counts, attributes and spatial relations.

Every statement a caption makes is true of the scene: counts are exact per (colour, shape) group,
and "left", "right", "above", "below" compare object centres with a margin of
:data:`RELATION_MARGIN` of the image side (and only along the dominant axis), so a horizontally
flipped image with "left" and "right" swapped in its captions is still correctly described. That
keeps flip augmentation legal for captioning (VirTex swaps the words when it flips).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from capvis.world.scene import Scene, WorldObject
from capvis.world.vocab import BACKGROUND_WORDS, NUMBER_WORDS, SHAPE_WORDS, SIZE_WORDS, plural

CAPTIONS_PER_IMAGE = 5
RELATION_MARGIN = 0.12  # fraction of the image side two centres must differ by for left/right/above/below
NEXT_TO_DISTANCE = 0.45  # centres closer than this fraction of the side (side by side) are "next to"
_OPENERS = ("a picture of", "an image of", "an image showing", "this picture shows", "a photo of", "")

Relation = tuple[int, str, int]  # (subject index, phrase, object index)


def _pick(rng: np.random.Generator, options: Sequence[str]) -> str:
    return options[int(rng.integers(len(options)))]


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _join(parts: Sequence[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def noun_phrase(obj: WorldObject, rng: np.random.Generator, p_size: float = 0.6, p_color: float = 0.9) -> str:
    """``"a small blue star"``; size and colour are each left out now and then."""
    words = []
    if rng.random() < p_size:
        words.append(_pick(rng, SIZE_WORDS[obj.size]))
    if rng.random() < p_color:
        words.append(obj.color)
    words.append(_pick(rng, SHAPE_WORDS[obj.shape]))
    return f"{_article(words[0])} {' '.join(words)}"


def _group_phrases(objects: Sequence[WorldObject], rng: np.random.Generator, with_color: bool) -> list[str]:
    """One phrase per (colour, shape) group, or per shape: ``"two red circles"``, exact counts."""
    key: Callable[[WorldObject], tuple[str, ...]] = (lambda o: (o.color, o.shape)) if with_color else (
        lambda o: (o.shape,))
    groups: dict[tuple[str, ...], list[WorldObject]] = {}
    for obj in objects:
        groups.setdefault(key(obj), []).append(obj)
    phrases = []
    for members in groups.values():
        sizes = {o.size for o in members}
        words = [_pick(rng, SIZE_WORDS[members[0].size])] if len(sizes) == 1 and rng.random() < 0.4 else []
        words += [members[0].color] if with_color else []
        noun = _pick(rng, SHAPE_WORDS[members[0].shape])
        if len(members) == 1:
            phrases.append(f"{_article((words + [noun])[0])} {' '.join(words + [noun])}")
        else:
            phrases.append(" ".join([NUMBER_WORDS[len(members)], *words, plural(noun)]))
    order = rng.permutation(len(phrases))
    return [phrases[i] for i in order]


def relations(scene: Scene) -> list[Relation]:
    """All clearly true pairwise relations ``(i, "to the left of" | ... | "next to", j)``."""
    margin, near = RELATION_MARGIN * scene.image_size, NEXT_TO_DISTANCE * scene.image_size
    found: list[Relation] = []
    for i, a in enumerate(scene.objects):
        for j, b in enumerate(scene.objects):
            if i == j:
                continue
            dx, dy = b.cx - a.cx, b.cy - a.cy
            if abs(dx) >= margin and abs(dx) >= abs(dy):
                found.append((i, "to the left of" if dx > 0 else "to the right of", j))
                if np.hypot(dx, dy) < near and abs(dy) < margin:
                    found.append((i, "next to", j))
            elif abs(dy) >= margin and abs(dy) > abs(dx):
                found.append((i, "above" if dy > 0 else "below", j))
    return found


def position_phrase(obj: WorldObject, image_size: int) -> str | None:
    """Where one object sits in the frame (``"on the left"``, ``"in the top right"``), if clear."""
    x, y = obj.cx / image_size, obj.cy / image_size
    h = "left" if x < 0.38 else "right" if x > 0.62 else ""
    v = "top" if y < 0.38 else "bottom" if y > 0.62 else ""
    if h and v:
        return f"in the {v} {h}"
    if h:
        return f"on the {h}"
    if v:
        return f"at the {v}"
    return "in the middle" if abs(x - 0.5) < 0.1 and abs(y - 0.5) < 0.1 else None


def _background(scene: Scene, rng: np.random.Generator) -> str:
    return f"on a {_pick(rng, BACKGROUND_WORDS[scene.background.kind])} background"


def _inventory(scene: Scene, rng: np.random.Generator) -> str:
    groups = _group_phrases(scene.objects, rng, with_color=True)
    opener = _pick(rng, _OPENERS + ("there is",))
    if opener == "there is" and not groups[0].startswith(("a ", "an ")):
        opener = "there are"
    text = f"{opener} {_join(groups)}".strip()
    return f"{text} {_background(scene, rng)}" if rng.random() < 0.3 else text


def _relation(scene: Scene, rng: np.random.Generator) -> str | None:
    found = relations(scene)
    if not found:
        obj = scene.objects[int(rng.integers(len(scene.objects)))]
        where = position_phrase(obj, scene.image_size)
        return None if where is None else f"{noun_phrase(obj, rng)} {where}"
    i, phrase, j = found[int(rng.integers(len(found)))]
    a, b = scene.objects[i], scene.objects[j]
    prefix = _pick(rng, ("", "", "there is ", "in this image, ", "a picture with "))
    return f"{prefix}{noun_phrase(a, rng)} {phrase} {noun_phrase(b, rng)}"


def _count(scene: Scene, rng: np.random.Generator) -> str:
    """The count, always with what is counted: a caption that names neither a colour nor a shape
    ("a single shape on a fading background", 13% of captions before) lets a captioner hedge."""
    n = len(scene.objects)
    if n == 1:
        return f"a single {noun_phrase(scene.objects[0], rng).split(' ', 1)[1]} {_background(scene, rng)}"
    thing = _pick(rng, ("shapes", "objects"))
    opener = _pick(rng, ("an image with ", ""))
    return f"{opener}{NUMBER_WORDS[n]} {thing}: {_join(_group_phrases(scene.objects, rng, rng.random() < 0.5))}"


def _shapes_only(scene: Scene, rng: np.random.Generator) -> str:
    return f"{_join(_group_phrases(scene.objects, rng, with_color=False))} {_background(scene, rng)}"


def _colors(scene: Scene, rng: np.random.Generator) -> str:
    names = list(dict.fromkeys(o.color for o in scene.objects))
    names = [names[i] for i in rng.permutation(len(names))]
    if len(scene.objects) == 1:
        return f"{_article(names[0])} {names[0]} shape {_background(scene, rng)}"
    return f"{_join(names)} shapes {_background(scene, rng)}"


def _focus(scene: Scene, rng: np.random.Generator) -> str:
    largest = max(scene.objects, key=lambda o: o.radius)
    others = len(scene.objects) - 1
    head = noun_phrase(largest, rng, p_size=0.3, p_color=1.0)
    if others == 0:
        return f"{_pick(rng, _OPENERS[:-1])} {head}"
    tail = "one other shape" if others == 1 else f"{NUMBER_WORDS[others]} other shapes"
    return f"{head} and {tail}"


_TEMPLATES = (_inventory, _relation, _count, _shapes_only, _relation, _focus, _colors, _inventory)


def captions(scene: Scene, rng: np.random.Generator, n: int = CAPTIONS_PER_IMAGE) -> list[str]:
    """``n`` distinct captions, lower case without final period (the tokenizer normalises anyway).

    Templates go in a fixed order (inventory, relation, count, ...) with random word choices, then
    repeat with fresh choices until ``n`` distinct sentences exist; an empty scene gets a fixed caption.
    """
    if not scene.objects:
        return [f"a {w} background with no shapes" for w in ("plain", "blank", "bare", "flat", "clear")][:n]
    out: list[str] = []
    for attempt in range(20 * n):
        text = _TEMPLATES[attempt % len(_TEMPLATES)](scene, rng)
        if text and text not in out:
            out.append(text)
            if len(out) == n:
                break
    return out
