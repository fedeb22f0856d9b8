from __future__ import annotations

from capvis.world.export import write_world
from capvis.demo.caption_truth import caption_truth, mentions, shape_confusion, world_objects


def test_mentions_read_colour_shape_pairs_through_sizes_and_counts():
    pairs, shapes = mentions("two big red discs to the left of a small blue box, and a star")
    assert pairs == [("red", "circle"), ("blue", "square")]
    assert shapes == ["circle", "square", "star"]
    assert mentions("a single shape on a fading background") == ([], [])
    assert mentions("red shapes on a plain background and a green thing near a circle") == ([], ["circle"])


def test_precision_and_recall_against_the_objects():
    objects = {1: [("red", "circle"), ("blue", "square")], 2: [("green", "star")]}
    got = caption_truth({1: "a red circle and a green square", 2: "a single shape"}, objects)
    assert got["color_shape_precision"] == 50.0  # red circle true, green square false
    assert got["object_recall"] == round(100 / 3, 2)  # 1 of 3 objects named
    assert got["shape_precision"] == 100.0 and got["vague_captions"] == 50.0


def test_false_mentions_are_split_by_how_they_are_false():
    objects = {1: [("red", "circle"), ("blue", "square")], 2: [("green", "star")]}
    captions = {1: "a red square, a blue square and a pink circle", 2: "a green ring and a yellow ring"}
    got = caption_truth(captions, objects)
    # 5 mentions: blue square true; red square misbound; pink circle wrong colour; green/yellow ring wrong shape
    assert got["color_shape_precision"] == 20.0
    assert (got["wrong_shape_mentions"], got["wrong_colour_mentions"], got["misbound_mentions"]) == (40.0, 20.0, 20.0)
    assert caption_truth({1: "a red circle"}, objects)["misbound_mentions"] == 0.0


def test_shape_confusion_counts_mentions_whose_colour_names_one_object():
    objects = {1: [("red", "circle"), ("blue", "square"), ("blue", "star")], 2: [("green", "star")]}
    captions = {1: "a red square, a blue star and a pink circle", 2: "a green star and two green stars"}
    cells = shape_confusion(captions, objects)
    # red -> the circle, said square; blue names two objects and pink none: not counted; green star twice
    assert cells == {("circle", "square"): 1, ("star", "star"): 2}


def test_confusion_figure_is_written(tmp_path):
    from capvis.demo.report import confusion_figure

    path = confusion_figure({("circle", "square"): 3, ("star", "star"): 5}, tmp_path / "m.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert confusion_figure({}, tmp_path / "empty.png").exists()  # no countable mention: an empty matrix


def test_ground_truth_captions_of_the_world_are_all_true(tmp_path):
    """The world's own captions never lie: every mention they make is true of the scene."""
    write_world(tmp_path, {"test": 60}, seed=3, image_size=32, workers=1)
    import json

    caps = json.loads((tmp_path / "annotations" / "captions_test.json").read_text())["annotations"]
    objects = world_objects(tmp_path / "annotations" / "instances_test.json")
    first = {}
    for ann in caps:
        first.setdefault(ann["image_id"], ann["caption"])
    got = caption_truth(first, objects)
    assert got["color_shape_precision"] == 100.0 and got["shape_precision"] == 100.0
    assert got["captions"] == 60 and got["mentions_per_caption"] > 0.5
