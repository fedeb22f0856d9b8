"""Annotation readers: COCO captions JSON, JSONL and CSV image-caption files -> :class:`ImageRecord` lists.

Every format becomes one record per *image* carrying all of its captions, because VirTex samples a
caption each time an image is visited. Every error names the file and the entry (line, row or
annotation index), so a broken annotation file is fixed without a debugger.
"""

from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

from capvis.errors import DataError

_COCO_NAME = re.compile(r"^captions_(?P<split>.+)\.json$")


@dataclass
class ImageRecord:
    """One image and all its captions; ``categories`` (instance class indices) only for datasets that have them."""

    image_id: int
    path: Path
    captions: list[str]
    categories: list[int] | None = None


def read_records(annotation_file: str | Path, images_dir: str | Path | None = None) -> list[ImageRecord]:
    """Records of a COCO captions JSON, a JSONL or a CSV file (format from the suffix).

    ``images_dir`` defaults to ``<root>/<split>`` for ``<root>/annotations/captions_<split>.json`` and
    to the annotation file's folder for JSONL/CSV (image paths are relative to the file).
    """
    return _read(Path(annotation_file), images_dir, check_images=True)


def read_caption_texts(files: Sequence[str | Path]) -> list[str]:
    """All captions of ``files`` (any supported format), for training a vocabulary; images are not needed."""
    texts: list[str] = []
    for f in files:
        for record in _read(Path(f), None, check_images=False):
            texts.extend(record.captions)
    return texts


def _read(path: Path, images_dir: str | Path | None, check_images: bool) -> list[ImageRecord]:
    if not path.is_file():
        raise DataError(f"annotation file not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _merge(path, _jsonl_rows(path), Path(images_dir) if images_dir else path.parent)
    if suffix == ".csv":
        return _merge(path, _csv_rows(path), Path(images_dir) if images_dir else path.parent)
    if suffix == ".json":
        data = _load_json(path)
        if isinstance(data, list):  # a JSON list of {"image", "caption(s)"} objects, like JSONL
            rows = ((f"entry {k}", item) for k, item in enumerate(data))
            return _merge(path, rows, Path(images_dir) if images_dir else path.parent)
        root = Path(images_dir) if images_dir else default_coco_images_dir(path)
        if check_images and not root.is_dir():
            raise DataError(f"image folder {root} for {path} not found (set data.train_images / data.val_images)")
        return _coco_records(path, data, root)
    raise DataError(f"{path}: unknown annotation format {suffix!r} (expected .json, .jsonl or .csv)")


def default_coco_images_dir(annotation_file: Path) -> Path:
    """``<root>/annotations/captions_train2017.json`` -> ``<root>/train2017`` (COCO's layout)."""
    match = _COCO_NAME.match(annotation_file.name)
    if not match:
        return annotation_file.parent
    base = annotation_file.parent
    if base.name == "annotations":
        base = base.parent
    return base / match.group("split")


def _load_json(path: Path) -> Any:
    try:
        with path.open(encoding="utf-8") as fh:
            return json.load(fh)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: line {exc.lineno}, column {exc.colno}: malformed JSON ({exc.msg})") from None
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def _coco_records(path: Path, data: Any, root: Path) -> list[ImageRecord]:
    if not isinstance(data, dict) or "images" not in data or "annotations" not in data:
        raise DataError(f"{path}: not a COCO captions file (needs top-level 'images' and 'annotations')")
    files: dict[int, str] = {}
    for k, image in enumerate(data["images"]):
        try:
            files[int(image["id"])] = str(image["file_name"])
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(f"{path}: images[{k}] lacks a valid {_field(exc, 'id/file_name')}") from None
    captions: dict[int, list[str]] = {}
    for k, ann in enumerate(data["annotations"]):
        try:
            image_id, caption = int(ann["image_id"]), ann["caption"]
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(f"{path}: annotations[{k}] lacks a valid {_field(exc, 'image_id/caption')}") from None
        if image_id not in files:
            raise DataError(f"{path}: annotations[{k}] refers to unknown image_id {image_id}")
        if not isinstance(caption, str):
            raise DataError(f"{path}: annotations[{k}] caption is not a string")
        captions.setdefault(image_id, []).append(caption)
    # Images without captions cannot be trained on; COCO's order of images is kept.
    return [ImageRecord(i, root / name, captions[i]) for i, name in files.items() if i in captions]


def _field(exc: Exception, default: str) -> str:
    return f"'{exc.args[0]}'" if isinstance(exc, KeyError) else default


def _jsonl_rows(path: Path) -> Iterator[tuple[str, Any]]:
    try:
        with path.open(encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    yield f"line {lineno}", json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(f"{path}:{lineno}: malformed JSON at column {exc.colno} ({exc.msg})") from None
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc.reason})") from None


def _csv_rows(path: Path) -> Iterator[tuple[str, Any]]:
    try:
        with path.open(encoding="utf-8-sig", newline="") as fh:
            reader = csv.DictReader(fh)
            missing = {"image", "caption"} - set(reader.fieldnames or ())
            if missing:
                raise DataError(f"{path}: CSV header lacks column(s) {', '.join(sorted(missing))} "
                                f"(found {reader.fieldnames})")
            for row in reader:
                yield f"line {reader.line_num}", row
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc.reason})") from None
    except csv.Error as exc:
        raise DataError(f"{path}: malformed CSV ({exc})") from None


def _merge(path: Path, rows: Iterator[tuple[str, Any]], root: Path) -> list[ImageRecord]:
    """Rows of ``{"image", "caption" | "captions"}`` -> one record per image, ids in order of first appearance."""
    records: dict[str, ImageRecord] = {}
    for where, row in rows:
        if not isinstance(row, dict):
            raise DataError(f"{path}: {where}: expected an object with 'image' and 'caption', got {type(row).__name__}")
        image = row.get("image")
        if not isinstance(image, str) or not image:
            raise DataError(f"{path}: {where}: missing or empty 'image' field")
        captions = _row_captions(path, where, row)
        record = records.get(image)
        if record is None:
            record = records[image] = ImageRecord(len(records), root / image, [])
        record.captions.extend(captions)
    return [r for r in records.values() if r.captions]


def _row_captions(path: Path, where: str, row: dict[str, Any]) -> list[str]:
    if "captions" in row and row["captions"] not in (None, ""):
        value = row["captions"]
        if not isinstance(value, list) or not all(isinstance(c, str) for c in value):
            raise DataError(f"{path}: {where}: 'captions' must be a list of strings")
        return [c for c in value if c.strip()]
    value = row.get("caption")
    if not isinstance(value, str):
        raise DataError(f"{path}: {where}: missing 'caption' (or 'captions') field")
    return [value] if value.strip() else []
