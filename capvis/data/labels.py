"""Downstream-label files: the small format the evaluations read, for CaptionWorld or your own data.

Pretraining never sees these labels; evaluations (VOC07 SVMs, linear probes) use them to score frozen
features. One JSON file per split::

    {
      "tasks":  {"shape": {"classes": ["circle", "square", ...]},
                 "count": {"classes": ["1", "2", "3", "4"]}},
      "images": [{"image_id": 1, "file_name": "000000000001.jpg",
                  "labels": {"shape": [0, 3], "count": [1]}}]
    }

* ``tasks`` maps a task name to its ordered class names; a label is an index into that list.
* Every image lists every task; a task's value is the list of class indices present (multi-label,
  VOC07-style; an empty list is allowed). A single-label task (such as ``count``) stores a
  one-element list, or an empty one for an image without an answer (left out of that task). The
  evaluations tell the kinds apart by the data alone: multi-label when any image lists more than one
  class (:func:`capvis.eval.downstream.task_kind`).
* ``file_name`` is relative to the split's image folder (``DIR/<split>/`` for CaptionWorld);
  ``image_id`` is optional and, when given, is the id used in the COCO files of the same split.

CaptionWorld writes ``labels_<split>.json`` with tasks ``shape``, ``color_shape`` (multi-label), ``count``
and the fine-grained ``leftmost_color``, ``topmost_shape``, ``largest_color_shape`` (single-label,
:mod:`capvis.world.fine`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from capvis.errors import DataError


def _check_tasks(path: Path, raw: Any) -> dict[str, list[str]]:
    if not isinstance(raw, dict) or not raw:
        raise DataError(f"{path}: 'tasks' must be a non-empty object mapping task name to "
                        "{'classes': [...]}")
    tasks: dict[str, list[str]] = {}
    for name, spec in raw.items():
        classes = spec.get("classes") if isinstance(spec, dict) else None
        if not isinstance(classes, list) or not classes or not all(isinstance(c, str) for c in classes):
            raise DataError(f"{path}: task {name!r} needs 'classes', a non-empty list of strings")
        if len(set(classes)) != len(classes):
            raise DataError(f"{path}: task {name!r} has duplicate class names")
        tasks[name] = classes
    return tasks


def _check_entry(path: Path, position: int, entry: Any, tasks: dict[str, list[str]]) -> dict:
    where = f"{path}: images[{position}]"
    if not isinstance(entry, dict) or not isinstance(entry.get("file_name"), str) or not entry["file_name"]:
        raise DataError(f"{where} needs a non-empty string 'file_name'")
    labels = entry.get("labels")
    if not isinstance(labels, dict):
        raise DataError(f"{where} ({entry['file_name']}) needs a 'labels' object")
    for task, classes in tasks.items():
        values = labels.get(task)
        if not isinstance(values, list):
            raise DataError(f"{where} ({entry['file_name']}) has no list of labels for task {task!r}")
        for v in values:
            if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < len(classes):
                raise DataError(f"{where} ({entry['file_name']}): label {v!r} of task {task!r} "
                                f"is not a class index in [0, {len(classes)})")
    unknown = set(labels) - set(tasks)
    if unknown:
        raise DataError(f"{where} ({entry['file_name']}) has labels for unknown task(s) {sorted(unknown)}")
    return entry


def read_label_file(path: str | Path) -> tuple[dict[str, list[str]], list[dict]]:
    """Read and validate a label file.

    Returns:
        ``(tasks, entries)``: task name -> class names, and the image entries in file order (each a dict
        with ``file_name``, ``labels`` and, if present, ``image_id``).

    Raises:
        DataError: naming the file and what is wrong (missing, not JSON, bad structure, index out of range).
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{path}: label file not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: cannot read label file ({exc})") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON object with 'tasks' and 'images'")
    tasks = _check_tasks(path, data.get("tasks"))
    images = data.get("images")
    if not isinstance(images, list):
        raise DataError(f"{path}: 'images' must be a list")
    return tasks, [_check_entry(path, i, e, tasks) for i, e in enumerate(images)]


def label_matrix(entries: list[dict], task: str, num_classes: int) -> np.ndarray:
    """(N, K) float32 multi-hot matrix of one task, row i for ``entries[i]``."""
    out = np.zeros((len(entries), num_classes), dtype=np.float32)
    for row, entry in enumerate(entries):
        try:
            indices = entry["labels"][task]
        except (KeyError, TypeError):
            name = entry.get("file_name", "?") if isinstance(entry, dict) else "?"
            raise DataError(f"label entry {row} ({name}) has no task {task!r}") from None
        if any(not 0 <= i < num_classes for i in indices):
            raise DataError(f"label entry {row}: task {task!r} index out of range [0, {num_classes})")
        out[row, indices] = 1.0
    return out


def write_label_file(path: str | Path, tasks: dict[str, list[str]], entries: list[dict]) -> Path:
    """Write a label file (the inverse of :func:`read_label_file`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {"tasks": {name: {"classes": list(classes)} for name, classes in tasks.items()}, "images": entries}
    path.write_text(json.dumps(data), encoding="utf-8")
    return path
