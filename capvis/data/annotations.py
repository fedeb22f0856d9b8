"""Annotation readers: COCO captions JSON, JSONL and CSV image-caption files -> :class:`ImageRecord` lists.

Every format becomes one record per *image* carrying all of its captions, because VirTex samples a
caption each time an image is visited. Every error names the file and the entry (line, row or
annotation index), so a broken annotation file is fixed without a debugger.

A file that cannot be parsed (malformed JSON, a JSONL line that is not JSON, a CSV without the
needed columns) fails at start-up. Single bad *entries* are skipped with a counted warning instead:
a caption that is empty or whitespace, a JSONL/CSV line (or a COCO caption) that is not valid UTF-8.
Once the whole file is read, more than ``max_bad_fraction`` of its entries being bad is a DataError
(the file is read completely, so the share is exact; see :mod:`capvis.data.robust`).
"""

from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

from capvis.data.robust import BadSampleBudget
from capvis.errors import DataError

_COCO_NAME = re.compile(r"^captions_(?P<split>.+)\.json$")


@dataclass
class ImageRecord:
    """One image and all its captions; ``categories`` (instance class indices) only for datasets that have them."""

    image_id: int
    path: Path
    captions: list[str]
    categories: list[int] | None = None


def read_records(annotation_file: str | Path, images_dir: str | Path | None = None, *,
                 max_bad_fraction: float = 0.01) -> list[ImageRecord]:
    """Records of a COCO captions JSON, a JSONL or a CSV file (format from the suffix).

    ``images_dir`` defaults to ``<root>/<split>`` for ``<root>/annotations/captions_<split>.json`` and
    to the annotation file's folder for JSONL/CSV (image paths are relative to the file).
    Bad entries (empty or non-UTF-8 captions) are skipped with a warning, up to ``max_bad_fraction``.
    """
    return _read(Path(annotation_file), images_dir, check_images=True, max_bad_fraction=max_bad_fraction)


def read_caption_texts(files: Sequence[str | Path], *, max_bad_fraction: float = 0.01) -> list[str]:
    """All captions of ``files`` (any supported format), for training a vocabulary; images are not needed."""
    texts: list[str] = []
    for f in files:
        for record in _read(Path(f), None, check_images=False, max_bad_fraction=max_bad_fraction):
            texts.extend(record.captions)
    return texts


def _read(path: Path, images_dir: str | Path | None, check_images: bool,
          max_bad_fraction: float = 0.01) -> list[ImageRecord]:
    if not path.is_file():
        raise DataError(f"annotation file not found: {path}")
    budget = BadSampleBudget(max_bad_fraction, what="annotation entries")
    records = _read_format(path, images_dir, check_images, budget)
    if budget.bad and budget.bad > max_bad_fraction * budget.seen:  # the whole file is known: exact share
        share = 100 * budget.bad / budget.seen
        raise DataError(f"{path}: {budget.bad} of {budget.seen} entries are bad ({share:.1f}%), "
                        f"more than data.max_bad_fraction={max_bad_fraction:g} (see the warnings above)")
    return records


def _read_format(path: Path, images_dir: str | Path | None, check_images: bool,
                 budget: BadSampleBudget) -> list[ImageRecord]:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _merge(path, _jsonl_rows(path, budget), Path(images_dir) if images_dir else path.parent, budget)
    if suffix == ".csv":
        return _merge(path, _csv_rows(path, budget), Path(images_dir) if images_dir else path.parent, budget)
    if suffix == ".json":
        data = _load_json(path)
        if isinstance(data, list):  # a JSON list of {"image", "caption(s)"} objects, like JSONL
            rows = ((f"entry {k}", item) for k, item in enumerate(data))
            return _merge(path, rows, Path(images_dir) if images_dir else path.parent, budget)
        root = Path(images_dir) if images_dir else default_coco_images_dir(path)
        if check_images and not root.is_dir():
            raise DataError(f"image folder {root} for {path} not found (set data.train_images / data.val_images)")
        return _coco_records(path, data, root, budget)
    raise DataError(f"{path}: unknown annotation format {suffix!r} (expected .json, .jsonl or .csv)")


def _undecodable(text: str) -> bool:
    """Whether ``text`` holds bytes that were not UTF-8 (``surrogateescape`` turned them into lone surrogates)."""
    return any("\ud800" <= c <= "\udfff" for c in text)


def _caption_problem(caption: str) -> str | None:
    """Why a caption cannot be used, or None."""
    if not caption.strip():
        return "empty caption"
    if _undecodable(caption):
        return "caption is not valid UTF-8"
    return None


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
    """Parse a JSON file; invalid UTF-8 bytes become lone surrogates (their captions are skipped later)."""
    try:
        with path.open(encoding="utf-8", errors="surrogateescape") as fh:
            return json.load(fh)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: line {exc.lineno}, column {exc.colno}: malformed JSON ({exc.msg})") from None


def _coco_records(path: Path, data: Any, root: Path, budget: BadSampleBudget) -> list[ImageRecord]:
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
        problem = _caption_problem(caption)
        if problem:
            budget.record_bad(f"{path}: annotations[{k}]", problem)
            continue
        budget.good()
        captions.setdefault(image_id, []).append(caption)
    # Images without captions cannot be trained on; COCO's order of images is kept.
    return [ImageRecord(i, root / name, captions[i]) for i, name in files.items() if i in captions]


def _field(exc: Exception, default: str) -> str:
    return f"'{exc.args[0]}'" if isinstance(exc, KeyError) else default


def _jsonl_rows(path: Path, budget: BadSampleBudget) -> Iterator[tuple[str, Any]]:
    with path.open(encoding="utf-8", errors="surrogateescape") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            if _undecodable(line):
                budget.record_bad(f"{path}:{lineno}", "line is not valid UTF-8")
                continue
            try:
                yield f"line {lineno}", json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{lineno}: malformed JSON at column {exc.colno} ({exc.msg})") from None


def _csv_rows(path: Path, budget: BadSampleBudget) -> Iterator[tuple[str, Any]]:
    try:
        with path.open(encoding="utf-8-sig", errors="surrogateescape", newline="") as fh:
            reader = csv.DictReader(fh)
            missing = {"image", "caption"} - set(reader.fieldnames or ())
            if missing:
                raise DataError(f"{path}: CSV header lacks column(s) {', '.join(sorted(missing))} "
                                f"(found {reader.fieldnames})")
            for row in reader:
                if any(isinstance(v, str) and _undecodable(v) for v in row.values()):
                    budget.record_bad(f"{path}: line {reader.line_num}", "row is not valid UTF-8")
                    continue
                yield f"line {reader.line_num}", row
    except csv.Error as exc:
        raise DataError(f"{path}: malformed CSV ({exc})") from None


def _merge(path: Path, rows: Iterator[tuple[str, Any]], root: Path, budget: BadSampleBudget) -> list[ImageRecord]:
    """Rows of ``{"image", "caption" | "captions"}`` -> one record per image, ids in order of first appearance."""
    records: dict[str, ImageRecord] = {}
    for where, row in rows:
        if not isinstance(row, dict):
            raise DataError(f"{path}: {where}: expected an object with 'image' and 'caption', got {type(row).__name__}")
        image = row.get("image")
        if not isinstance(image, str) or not image:
            raise DataError(f"{path}: {where}: missing or empty 'image' field")
        captions = []
        for caption in _row_captions(path, where, row):
            problem = _caption_problem(caption)
            if problem:
                budget.record_bad(f"{path}: {where}", problem)
            else:
                budget.good()
                captions.append(caption)
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
        return list(value)
    value = row.get("caption")
    if not isinstance(value, str):
        raise DataError(f"{path}: {where}: missing 'caption' (or 'captions') field")
    return [value]


# -- instance categories (multilabel_classification) ------------------------------------------------


def instances_file_for(annotation_file: str | Path) -> Path:
    """``.../captions_<split>.json`` -> ``.../instances_<split>.json`` (COCO's and CaptionWorld's layout)."""
    path = Path(annotation_file)
    match = _COCO_NAME.match(path.name)
    return path.with_name(f"instances_{match.group('split')}.json") if match else path.with_name("instances.json")


def attach_categories(records: list[ImageRecord], instances_file: str | Path) -> tuple[list[ImageRecord], list[str]]:
    """Set each record's ``categories`` from a COCO instances JSON, matched by ``image_id``.

    Category ids (1..90 in COCO, with gaps) become contiguous indices in id order; a record whose image
    has no instances gets ``[]``. Returns the records and the category names in index order.
    """
    path = Path(instances_file)
    if not path.is_file():
        raise DataError(f"instances file not found: {path} (needed for instance-category targets)")
    data = _load_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("categories"), list) or "annotations" not in data:
        raise DataError(f"{path}: not a COCO instances file (needs top-level 'categories' and 'annotations')")
    try:
        cats = sorted((int(c["id"]), str(c["name"])) for c in data["categories"])
    except (KeyError, TypeError, ValueError):
        raise DataError(f"{path}: every category needs an integer 'id' and a 'name'") from None
    index = {cat_id: k for k, (cat_id, _) in enumerate(cats)}
    present: dict[int, set[int]] = {}
    for k, ann in enumerate(data["annotations"]):
        try:
            image_id, cat_id = int(ann["image_id"]), int(ann["category_id"])
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(f"{path}: annotations[{k}] lacks a valid {_field(exc, 'image_id/category_id')}") from None
        if cat_id not in index:
            raise DataError(f"{path}: annotations[{k}] has unknown category_id {cat_id}")
        present.setdefault(image_id, set()).add(index[cat_id])
    for record in records:
        record.categories = sorted(present.get(record.image_id, ()))
    return records, [name for _, name in cats]
