"""VOC2007 reader on a tiny fake VOCdevkit written by the test."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from capvis.errors import DataError
from capvis.eval.voc07 import read_voc07

# VOC codes: 1 present, -1 absent, 0 difficult
VOC = {
    "trainval": {"dog": {"000005": 1, "000007": -1, "000009": 0},
                 "cat": {"000005": -1, "000007": 1, "000009": 1},
                 "bird": {"000005": 0, "000007": -1, "000009": -1}},
    "test": {"dog": {"000001": -1, "000002": 1},
             "cat": {"000001": 1, "000002": 0},
             "bird": {"000001": -1, "000002": -1}},
}


def write_voc(root, images=True):
    voc = root / "VOCdevkit" / "VOC2007"
    main = voc / "ImageSets" / "Main"
    main.mkdir(parents=True)
    (voc / "JPEGImages").mkdir()
    for split, classes in VOC.items():
        ids = list(next(iter(classes.values())))
        (main / f"{split}.txt").write_text("\n".join(ids) + "\n")  # not a class file
        for cls, labels in classes.items():
            (main / f"{cls}_{split}.txt").write_text(
                "".join(f"{i} {v:2d}\n" for i, v in labels.items()))
        if images:
            for i in ids:
                Image.new("RGB", (8, 6), (10, 20, 30)).save(voc / "JPEGImages" / f"{i}.jpg")
    return voc


def test_reads_trainval_and_test(tmp_path):
    voc = write_voc(tmp_path)
    paths, labels, classes = read_voc07(voc, "trainval")
    assert classes == ["bird", "cat", "dog"]
    assert [p.name for p in paths] == ["000005.jpg", "000007.jpg", "000009.jpg"]
    assert all(p.is_file() for p in paths)
    # rows: images; columns: bird, cat, dog; 1 present, 0 absent, -1 difficult
    np.testing.assert_array_equal(labels, [[-1, 0, 1], [0, 1, 0], [0, 1, -1]])
    paths, labels, classes = read_voc07(tmp_path / "VOCdevkit", "test")  # VOCdevkit works too
    assert [p.stem for p in paths] == ["000001", "000002"]
    np.testing.assert_array_equal(labels, [[0, 1, 0], [0, -1, 1]])


def test_missing_image_named(tmp_path):
    voc = write_voc(tmp_path)
    (voc / "JPEGImages" / "000007.jpg").unlink()
    with pytest.raises(DataError, match="000007.jpg"):
        read_voc07(voc, "trainval")


def test_missing_split_file_named(tmp_path):
    voc = write_voc(tmp_path)
    (voc / "ImageSets" / "Main" / "cat_test.txt").unlink()
    with pytest.raises(DataError, match="cat_test.txt"):
        read_voc07(voc, "test")


def test_missing_layout(tmp_path):
    with pytest.raises(DataError, match="ImageSets"):
        read_voc07(tmp_path, "trainval")
    with pytest.raises(DataError, match="not a directory"):
        read_voc07(tmp_path / "nope", "trainval")


def test_malformed_line(tmp_path):
    voc = write_voc(tmp_path)
    (voc / "ImageSets" / "Main" / "dog_test.txt").write_text("000001 -1\n000002 yes\n")
    with pytest.raises(DataError, match=r"dog_test.txt:2"):
        read_voc07(voc, "test")
