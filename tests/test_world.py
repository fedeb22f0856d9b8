"""CaptionWorld: determinism, true captions (also after a flip), COCO/label files, the CLI, speed."""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from capvis.cli import main
from capvis.data.labels import label_matrix, read_label_file, write_label_file
from capvis.world import (SHAPES, Scene, caption_rng, captions, flip_scene, generate_scene, relations,
                               render, write_world)
from capvis.world.fine import LARGEST_RATIO
from capvis.world.grammar import RELATION_MARGIN
from capvis.world.vocab import COLORS, NUMBER_WORDS, SHAPE_WORDS, SIZE_WORDS, plural
from capvis.errors import DataError

SCENES = 300
NOUN = {w: s for s, words in SHAPE_WORDS.items() for w in words}
PLURAL_NOUN = {plural(w): s for w, s in NOUN.items()}
SIZE = {w: s for s, words in SIZE_WORDS.items() for w in words}
SPATIAL = {("to", "the", "left", "of"): "left", ("to", "the", "right", "of"): "right", ("above",): "above",
           ("below",): "below"}
SIDE_LEAD = ("on", "top", "bottom")  # "on the left", "in the top left", "in the bottom right"


def _scenes(split: str = "train", n: int = SCENES) -> list[tuple[Scene, list[str]]]:
    return [(s, captions(s, caption_rng(0, split, i))) for i, s in
            ((i, generate_scene(0, split, i)) for i in range(n))]


def _matches(obj, attrs: list[str]) -> bool:
    *mods, noun = attrs
    return NOUN[noun] == obj.shape and all(
        (SIZE[m] == obj.size) if m in SIZE else (m == obj.color) for m in mods)


def _noun_phrase_after(words: list[str], start: int) -> list[str]:
    """Attributes + noun of the phrase beginning with an article at ``start``."""
    assert words[start] in ("a", "an"), words
    end = start + 1
    while words[end] not in NOUN:
        end += 1
    return words[start + 1:end + 1]


def _check_spatial(scene: Scene, caption: str) -> int:
    """Assert every left/right/above/below claim in the caption; return how many were checked."""
    words, checked = caption.replace(",", "").replace(":", "").split(), 0
    for k in range(len(words)):
        for phrase, rel in SPATIAL.items():
            if tuple(words[k:k + len(phrase)]) != phrase or k == 0 or words[k - 1] not in NOUN:
                continue
            start = max(i for i in range(k) if words[i] in ("a", "an"))
            left_np, right_np = words[start + 1:k], _noun_phrase_after(words, k + len(phrase))
            ok = False
            for a in scene.objects:
                for b in scene.objects:
                    if a is b or not (_matches(a, left_np) and _matches(b, right_np)):
                        continue
                    ok |= {"left": a.cx < b.cx, "right": a.cx > b.cx, "above": a.cy < b.cy,
                           "below": a.cy > b.cy}[rel]
            assert ok, (caption, scene.objects)
            checked += 1
        if words[k] in ("left", "right") and words[k - 1] == "the" and words[k - 2] in SIDE_LEAD:
            start = max(i for i in range(k) if words[i] in ("a", "an"))
            np_words = words[start + 1:words.index(next(w for w in words[start:] if w in NOUN), start) + 1]
            side = [o.cx < scene.image_size / 2 if words[k] == "left" else o.cx > scene.image_size / 2
                    for o in scene.objects if _matches(o, np_words)]
            assert any(side), (caption, scene.objects)
            checked += 1
    return checked


def _swap_left_right(text: str) -> str:
    return " ".join({"left": "right", "right": "left"}.get(w, w) for w in text.split())


def test_same_seed_same_bytes_other_seed_differs() -> None:
    for index in range(5):
        a, b = generate_scene(7, "train", index), generate_scene(7, "train", index)
        assert render(a).tobytes() == render(b).tobytes()
        assert captions(a, caption_rng(7, "train", index)) == captions(b, caption_rng(7, "train", index))
    image = render(generate_scene(7, "train", 0))
    assert image.shape == (64, 64, 3) and image.dtype == np.uint8
    assert image.tobytes() != render(generate_scene(8, "train", 0)).tobytes()
    assert image.tobytes() != render(generate_scene(7, "val", 0)).tobytes()
    assert render(generate_scene(7, "train", 0, image_size=96)).shape == (96, 96, 3)


def test_five_distinct_captions_and_object_counts() -> None:
    counts = Counter()
    for scene, caps in _scenes():
        assert len(caps) == 5 and len(set(caps)) == 5, caps
        assert all(c and c == c.strip() for c in caps)
        counts[len(scene.objects)] += 1
    assert set(counts) == {1, 2, 3, 4}


def test_every_caption_names_a_colour_or_a_shape() -> None:
    """No hedging caption ("a single shape on a fading background"): each one carries a visual attribute."""
    attributes = set(COLORS) | {w for words in SHAPE_WORDS.values() for w in words}
    attributes |= {plural(w) for w in attributes}
    for _, caps in _scenes():
        for caption in caps:
            assert attributes & set(caption.replace(",", " ").replace(":", " ").split()), caption


def test_spatial_words_are_true_and_survive_a_flip_with_word_swap() -> None:
    checked = 0
    for scene, caps in _scenes():
        flipped = flip_scene(scene)
        for caption in caps:
            checked += _check_spatial(scene, caption)
            _check_spatial(flipped, _swap_left_right(caption))
        for i, phrase, j in relations(scene):
            a, b = scene.objects[i], scene.objects[j]
            if phrase == "to the left of":
                assert a.cx < b.cx and flipped.objects[i].cx > flipped.objects[j].cx
    assert checked > SCENES  # the grammar really does talk about space


def test_flipped_scene_renders_as_mirror_image() -> None:
    scene = generate_scene(3, "train", 11)
    mirrored, flipped = render(scene)[:, ::-1].astype(int), render(flip_scene(scene)).astype(int)
    assert np.abs(mirrored - flipped).mean() < 2.0


def test_counts_in_captions_are_exact() -> None:
    checked = 0
    for scene, caps in _scenes():
        for caption in caps:
            words = caption.replace(",", "").replace(":", "").split()
            for k, word in enumerate(words[:-1]):
                if word not in NUMBER_WORDS:
                    continue
                n, rest = NUMBER_WORDS.index(word), words[k + 1:]
                if rest[0] in ("shapes", "objects"):
                    assert n == len(scene.objects), caption
                elif rest[0] == "other":
                    assert n == len(scene.objects) - 1, caption
                else:
                    end = next(i for i, w in enumerate(rest) if w in PLURAL_NOUN)
                    attrs = rest[:end] + [next(w for w, s in NOUN.items() if s == PLURAL_NOUN[rest[end]])]
                    assert n == sum(_matches(o, attrs) for o in scene.objects), (caption, scene.objects)
                checked += 1
    assert checked > 100


def test_color_shape_frequencies_are_long_tailed() -> None:
    freq = Counter((o.color, o.shape) for s, _ in _scenes(n=1500) for o in s.objects)
    classes = len(COLORS) * len(SHAPES)
    assert classes >= 64
    values = sorted([freq.get((c, s), 0) for c in COLORS for s in SHAPES], reverse=True)
    assert values[0] >= 8 * max(values[classes // 2], 1)
    shape_freq = Counter(shape for (_, shape), n in freq.items() for _ in range(n))
    assert max(shape_freq.values()) < 2 * min(shape_freq.values())  # shape classes stay balanced


def test_render_speed() -> None:
    start = time.perf_counter()
    for index in range(2000):
        render(generate_scene(0, "train", index))
    assert time.perf_counter() - start < 10.0


def _load(path: Path) -> dict:
    return json.loads(path.read_text())


def test_cli_writes_coco_world_with_matching_labels(tmp_path: Path) -> None:
    out = tmp_path / "world"
    argv = ["world", "--output", str(out), "--train", "20", "--val", "5", "--test", "5", "--seed", "3"]
    assert main(argv) == 0
    seen_ids: set[int] = set()
    for split, n in (("train", 20), ("val", 5), ("test", 5)):
        caps = _load(out / "annotations" / f"captions_{split}.json")
        inst = _load(out / "annotations" / f"instances_{split}.json")
        ids = {im["id"] for im in caps["images"]}
        assert len(ids) == n and not ids & seen_ids and ids == {im["id"] for im in inst["images"]}
        seen_ids |= ids
        assert [c["id"] for c in inst["categories"]] == list(range(1, len(SHAPES) + 1))
        assert Counter(a["image_id"] for a in caps["annotations"]) == {i: 5 for i in ids}
        for im in caps["images"]:
            assert (out / split / im["file_name"]).is_file() and im["width"] == im["height"] == 64
        for ann in inst["annotations"]:
            x, y, w, h = ann["bbox"]
            assert 0 <= x and 0 <= y and x + w <= 64 and y + h <= 64 and w > 0 and h > 0
            assert ann["iscrowd"] == 0 and 0 < ann["area"] <= w * h + 1e-6 and ann["image_id"] in ids
        tasks, entries = read_label_file(out / "annotations" / f"labels_{split}.json")
        assert list(tasks)[:3] == ["shape", "color_shape", "count"] and len(tasks["color_shape"]) >= 64
        assert set(tasks) - {"shape", "color_shape", "count"} == {"leftmost_color", "topmost_shape",
                                                                  "largest_color_shape"}
        assert tasks["count"] == ["1", "2", "3", "4"]
        by_image = {i: [a for a in inst["annotations"] if a["image_id"] == i] for i in ids}
        for entry in entries:
            objs = by_image[entry["image_id"]]
            assert entry["labels"]["shape"] == sorted({a["category_id"] - 1 for a in objs})
            assert entry["labels"]["count"] == [len(objs) - 1]
            names = {f"{a['color']} {SHAPES[a['category_id'] - 1]}" for a in objs}
            assert {tasks["color_shape"][k] for k in entry["labels"]["color_shape"]} == names
            assert (out / split / entry["file_name"]).is_file()
        matrix = label_matrix(entries, "shape", len(tasks["shape"]))
        assert matrix.shape == (n, len(SHAPES))
        assert matrix.sum() == sum(len(e["labels"]["shape"]) for e in entries)


def test_written_world_is_byte_identical_for_same_seed(tmp_path: Path) -> None:
    a = write_world(tmp_path / "a", {"train": 6, "val": 0}, seed=1, workers=1)
    write_world(tmp_path / "b", {"train": 6}, seed=1, workers=1)
    write_world(tmp_path / "c", {"train": 6}, seed=2, workers=1)
    assert a["splits"] == {"train": 6} and not (tmp_path / "a" / "val").exists()
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert len(files) == 6 + 3
    for rel in files:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel
    assert (tmp_path / "a" / files[-1]).read_bytes() != (tmp_path / "c" / files[-1]).read_bytes()


def test_cli_rejects_bad_arguments(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["world", "--output", str(tmp_path), "--train", "1", "--image-size", "8"]) == 2
    assert "--image-size" in capsys.readouterr().err
    assert main(["world", "--output", str(tmp_path), "--train", "0", "--val", "0", "--test", "0"]) == 2


@pytest.mark.parametrize("content, complaint", [
    ("{not json", "cannot read"),
    ('{"tasks": {}, "images": []}', "tasks"),
    ('{"tasks": {"t": {"classes": ["a"]}}, "images": [{"file_name": "x.jpg", "labels": {"t": [3]}}]}',
     "[0, 1)"),
    ('{"tasks": {"t": {"classes": ["a"]}}, "images": [{"file_name": "x.jpg", "labels": {}}]}', "'t'"),
    ('{"tasks": {"t": {"classes": ["a"]}}, "images": [{"labels": {"t": []}}]}', "file_name"),
])
def test_label_file_errors_name_file_and_problem(tmp_path: Path, content: str, complaint: str) -> None:
    path = tmp_path / "labels.json"
    path.write_text(content)
    with pytest.raises(DataError, match="labels.json") as info:
        read_label_file(path)
    assert complaint in str(info.value)
    with pytest.raises(DataError, match="not found"):
        read_label_file(tmp_path / "missing.json")


def test_label_file_round_trip(tmp_path: Path) -> None:
    entries = [{"file_name": "a.jpg", "labels": {"t": [0, 2]}}, {"file_name": "b.jpg", "labels": {"t": []}}]
    tasks, read = read_label_file(write_label_file(tmp_path / "l.json", {"t": ["x", "y", "z"]}, entries))
    assert tasks == {"t": ["x", "y", "z"]} and read == entries
    assert label_matrix(read, "t", 3).tolist() == [[1, 0, 1], [0, 0, 0]]


def _nearest_color(rgb: np.ndarray) -> str:
    return min(COLORS, key=lambda name: float(np.sum((np.array(COLORS[name], float) - rgb) ** 2)))


def _clear_leader(objs, key, lead: float):
    """Brute force: the object whose ``key`` is below every other's by ``lead``, else None."""
    for a in objs:
        if all(key(b) - key(a) >= lead for b in objs if b is not a):
            return a
    return None


def test_fine_grained_labels_are_true_to_the_rendered_scene(tmp_path: Path) -> None:
    n, margin = 300, RELATION_MARGIN * 64
    write_world(tmp_path, {"train": n}, seed=5, workers=1)
    tasks, entries = read_label_file(tmp_path / "annotations" / "labels_train.json")
    assert tasks["leftmost_color"] == list(COLORS) and tasks["topmost_shape"] == list(SHAPES)
    assert len(tasks["largest_color_shape"]) == len(COLORS) * len(SHAPES)
    labelled, pixel_ok, pixel_checked = Counter(), 0, 0
    for index, entry in enumerate(entries):
        scene = generate_scene(5, "train", index)
        objs, labels = scene.objects, entry["labels"]
        many = len(objs) >= 2
        left = _clear_leader(objs, lambda o: o.cx, margin) if many else None
        top = _clear_leader(objs, lambda o: o.cy, margin) if many else None
        big = next((a for a in objs if many and all(a.radius >= LARGEST_RATIO * b.radius for b in objs
                                                    if b is not a)), None)
        expected = {"leftmost_color": None if left is None else left.color,
                    "topmost_shape": None if top is None else top.shape,
                    "largest_color_shape": None if big is None else f"{big.color} {big.shape}"}
        for task, want in expected.items():
            got = labels[task]
            assert len(got) <= 1, (task, got)  # never more than one class
            assert (tasks[task][got[0]] if got else None) == want, (index, task, got, objs)
            labelled[task] += bool(got)
        if left is not None:  # the pixels at the leftmost object's interior show the labelled colour
            image = render(scene).astype(float)
            y = left.cy - (0.775 * left.radius if left.shape == "ring" else 0.0)  # a ring's band, not its hole
            pixel_checked += 1
            pixel_ok += _nearest_color(image[int(y), int(left.cx)]) == tasks["leftmost_color"][labels[
                "leftmost_color"][0]]
    assert all(0.2 * n < labelled[t] < 0.8 * n for t in expected), labelled  # neither trivial nor empty
    assert pixel_ok >= 0.95 * pixel_checked and pixel_checked > 0.2 * n
