"""Annotation readers: COCO captions JSON (real layout), JSONL, CSV, and errors that name file and entry."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from capvis.data.annotations import ImageRecord, read_caption_texts, read_records
from capvis.errors import DataError


def test_coco_records_one_per_image(coco_fixture: Path) -> None:
    records = read_records(coco_fixture)
    root = coco_fixture.parent.parent / "train2017"
    assert [r.image_id for r in records] == [1000, 1007, 1014, 1021]
    data = json.loads(coco_fixture.read_text())
    assert [r.captions for r in records] == [
        [a["caption"] for a in data["annotations"] if a["image_id"] == r.image_id] for r in records]
    assert records[0].captions[1] == "A brown dog is running left!"
    assert all(r.path == root / f"{r.image_id:012d}.jpg" and r.path.is_file() for r in records)
    assert records[0].categories is None


def test_coco_explicit_images_dir_and_missing_dir(coco_fixture: Path, tmp_path: Path) -> None:
    assert read_records(coco_fixture, tmp_path)[0].path.parent == tmp_path
    with pytest.raises(DataError, match="nowhere"):
        read_records(coco_fixture, tmp_path / "nowhere")


def test_coco_skips_images_without_captions(tmp_path: Path) -> None:
    data = {"images": [{"id": 1, "file_name": "a.jpg"}, {"id": 2, "file_name": "b.jpg"}],
            "annotations": [{"image_id": 2, "caption": "a cat"}, {"image_id": 2, "caption": "a kitten"}]}
    path = tmp_path / "caps.json"
    path.write_text(json.dumps(data))
    assert read_records(path) == [ImageRecord(2, tmp_path / "b.jpg", ["a cat", "a kitten"])]


def test_jsonl_caption_and_captions(tmp_path: Path) -> None:
    path = tmp_path / "data" / "pairs.jsonl"
    path.parent.mkdir()
    lines = [{"image": "img/x.jpg", "caption": "a dog"}, {"image": "img/y.jpg", "captions": ["a cat", "a pet"]},
             {"image": "img/x.jpg", "caption": "a puppy"}]
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    records = read_records(path)
    assert [(r.image_id, r.path, r.captions) for r in records] == [
        (0, path.parent / "img/x.jpg", ["a dog", "a puppy"]), (1, path.parent / "img/y.jpg", ["a cat", "a pet"])]


def test_csv_rows_of_one_image_merge(tmp_path: Path) -> None:
    path = tmp_path / "pairs.csv"
    path.write_text('image,caption\nb.jpg,"a dog, running"\na.jpg,a cat\nb.jpg,a puppy\n', encoding="utf-8")
    records = read_records(path)
    assert [(r.image_id, r.path.name, r.captions) for r in records] == [
        (0, "b.jpg", ["a dog, running", "a puppy"]), (1, "a.jpg", ["a cat"])]
    assert read_caption_texts([path]) == ["a dog, running", "a puppy", "a cat"]


def test_read_caption_texts_needs_no_images(tmp_path: Path, coco_fixture: Path) -> None:
    lonely = tmp_path / "captions_val2017.json"  # no val2017 folder anywhere
    lonely.write_text(json.dumps({"images": [{"id": 3, "file_name": "z.jpg"}],
                                  "annotations": [{"image_id": 3, "caption": "a boat"}]}))
    assert read_caption_texts([coco_fixture, lonely])[-1] == "a boat"


def test_malformed_json_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "captions_train2017.json"
    path.write_text('{"images": [],\n "annotations": [\n  {"image_id": 1, "caption": "x"},,\n]}')
    with pytest.raises(DataError, match=r"captions_train2017\.json: line 3, column"):
        read_records(path)


def test_bad_jsonl_line_and_missing_fields(tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl"
    path.write_text('{"image": "a.jpg", "caption": "ok"}\n{"image": "b.jpg", "caption": \n')
    with pytest.raises(DataError, match=r"p\.jsonl:2"):
        read_records(path)
    path.write_text('{"image": "a.jpg", "caption": "ok"}\n{"image": "b.jpg"}\n')
    with pytest.raises(DataError, match=r"p\.jsonl: line 2: missing 'caption'"):
        read_records(path)
    coco = tmp_path / "c.json"
    coco.write_text(json.dumps({"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": [{"image_id": 1}]}))
    with pytest.raises(DataError, match=r"c\.json: annotations\[0\] lacks a valid 'caption'"):
        read_records(coco)


def test_csv_missing_column_and_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "p.csv"
    path.write_text("image,text\na.jpg,a dog\n")
    with pytest.raises(DataError, match=r"p\.csv: CSV header lacks column\(s\) caption"):
        read_records(path)
    with pytest.raises(DataError, match="absent.jsonl"):
        read_records(tmp_path / "absent.jsonl")
