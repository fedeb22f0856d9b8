from __future__ import annotations

from capvis.world.export import write_world
from capvis.demo.caption_truth import caption_truth, mentions, shape_confusion, shape_right_by_size, world_objects


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


def test_shape_right_by_size_bins_resolved_mentions_by_extent():
    objects = {1: [("red", "circle", 10.0), ("blue", "square", 30.0)], 2: [("green", "star", 12.0)],
               3: [("pink", "ring", 28.0), ("pink", "cross", 5.0)]}
    captions = {1: "a red square and a blue square", 2: "a green star", 3: "a pink ring"}
    # resolved: red -> circle (10 px, wrong), blue -> square (30 px, right), green -> star (12 px, right);
    # pink names two objects: not counted
    rows = shape_right_by_size(captions, objects, bins=2)
    assert rows == [{"extent_px": [10.0, 10.0], "mentions": 1, "shape_right": 0.0},
                    {"extent_px": [12.0, 30.0], "mentions": 2, "shape_right": 100.0}]
    assert shape_right_by_size(captions, objects, bins=1)[0]["shape_right"] == 66.67
    assert shape_right_by_size({1: "a big circle"}, objects) == []  # no colour-shape mention: no rows
    # the extent a third field changes nothing of the truth figures or the matrix
    plain = {k: [o[:2] for o in v] for k, v in objects.items()}
    assert caption_truth(captions, objects) == caption_truth(captions, plain)
    assert shape_confusion(captions, objects) == shape_confusion(captions, plain)


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
    sized = world_objects(tmp_path / "annotations" / "instances_test.json", extent=True)
    assert all(0 < o[2] <= 32 and o[:2] == plain for i in objects for o, plain in zip(sized[i], objects[i]))
    assert all(row["shape_right"] == 100.0 for row in shape_right_by_size(first, sized, bins=3))
    assert got["captions"] == 60 and got["mentions_per_caption"] > 0.5
