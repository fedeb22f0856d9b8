"""The VOC07 SVM protocol on downstream-label files (CaptionWorld's ``labels_<split>.json`` or your own).

A label file (format: :mod:`capvis.data.labels`) holds several tasks; each is scored as its own
multi-label problem, one one-vs-rest SVM per class (:func:`capvis.eval.svm.train_eval_svms`), giving
one mAP per task. A single-label task stored as one-element lists (CaptionWorld's ``count``) is thus
K one-vs-rest classes. Label files carry no "difficult" marks, so every test row counts.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from torch import nn

from capvis.data.labels import label_matrix, read_label_file
from capvis.errors import DataError
from capvis.eval.common import default_images_dir
from capvis.eval.svm import VOC07_COSTS, SVMResult, train_eval_svms

log = logging.getLogger(__name__)


def label_file_images(label_file: str | Path, images_dir: str | Path | None = None
                      ) -> tuple[dict[str, list[str]], list[dict], list[Path]]:
    """``(tasks, entries, image_paths)`` of a label file, paths in the order of its ``images``."""
    tasks, entries = read_label_file(label_file)
    root = Path(images_dir) if images_dir else default_images_dir(label_file)
    paths = [root / e["file_name"] for e in entries]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise DataError(f"{label_file}: {len(missing)} of {len(paths)} images missing, first: {missing[0]} "
                        "(set the image folder explicitly)")
    return tasks, entries, paths


def load_feature_file(path: str | Path, entries: list[dict], label_file: str | Path) -> np.ndarray:
    """Rows of a ``capvis features`` .npy, checked against the label file's images (count and, if the
    .json sidecar exists, file names)."""
    path = Path(path)
    try:
        feats = np.load(path)
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read features {path}: {exc}") from None
    if feats.ndim != 2 or len(feats) != len(entries):
        raise DataError(f"{path}: features of shape {feats.shape} but {label_file} lists {len(entries)} images")
    sidecar = path.with_suffix(".json")
    if sidecar.is_file():
        files = json.loads(sidecar.read_text()).get("files", [])
        names = [e["file_name"] for e in entries]
        if files and [Path(f).as_posix() for f in files] != [Path(n).as_posix() for n in names]:
            raise DataError(f"{path}: its rows are not the images of {label_file} in order (see {sidecar})")
    return feats


def check_same_tasks(train: dict[str, list[str]], test: dict[str, list[str]]) -> None:
    if train != test:
        raise DataError("train and test label files define different tasks or class lists: "
                        f"{sorted(train)} vs {sorted(test)}")


def select_tasks(tasks: dict[str, list[str]], names: Sequence[str] | None) -> dict[str, list[str]]:
    """The named tasks (all when ``names`` is empty); DataError for a name the file does not define."""
    if not names:
        return tasks
    unknown = [n for n in names if n not in tasks]
    if unknown:
        raise DataError(f"unknown task(s) {unknown}; the label files define {sorted(tasks)}")
    return {n: tasks[n] for n in names}


def svm_eval_tasks(train_x: np.ndarray, train_entries: list[dict], test_x: np.ndarray, test_entries: list[dict],
                   tasks: dict[str, list[str]], *, workers: int | None = None,
                   costs: Sequence[float] = VOC07_COSTS, folds: int = 3) -> dict[str, SVMResult]:
    """One :class:`SVMResult` per task of ``tasks``, on given feature rows (rows follow the entries)."""
    results = {}
    for task, classes in tasks.items():
        train_y = label_matrix(train_entries, task, len(classes)).astype(np.int8)  # (N, K) in {0, 1}
        test_y = label_matrix(test_entries, task, len(classes)).astype(np.int8)
        results[task] = train_eval_svms(train_x, train_y, test_x, test_y, costs, folds, workers,
                                        class_names=classes)
        log.info("SVM task %s: mAP %.2f over %d classes", task, results[task].map, len(results[task].per_class))
    return results


def svm_eval_label_files(backbone: nn.Module, train_labels: str | Path, test_labels: str | Path, *,
                         images_train: str | Path | None = None, images_test: str | Path | None = None,
                         image_size: int = 224, resize: int | None = None, stage: str = "layer4",
                         batch_size: int = 64, num_workers: int = 0, device: str = "cpu",
                         workers: int | None = None, cache_dir: str | Path | None = None,
                         source: str = "random", tasks: Sequence[str] | None = None, details: bool = False
                         ) -> dict[str, float] | dict[str, SVMResult]:
    """Extract features of both splits with ``backbone`` and run the SVM protocol per task.

    Args:
        backbone: a capvis VisualBackbone (``Pretrained.backbone``); put in eval mode here.
        train_labels, test_labels: downstream-label files (test must define the same tasks).
        images_train, images_test: image folders (default :func:`default_images_dir`).
        image_size, resize: center crop and shorter side (default ``image_size * 256/224``).
        workers: SVM processes (classes in parallel); ``num_workers``: data-loading processes.
        cache_dir, source: feature cache folder and the checkpoint path keying it (``random``: no cache).
        tasks: names of the tasks to score (default: every task of the files).
        details: return the full :class:`SVMResult` per task instead of the mAP alone.

    Returns:
        ``{task: mAP}`` in percent (NaN where every class was skipped), or ``{task: SVMResult}``.
    """
    from capvis.eval.features import cached_features

    all_tasks, train_entries, train_paths = label_file_images(train_labels, images_train)
    test_tasks, test_entries, test_paths = label_file_images(test_labels, images_test)
    check_same_tasks(all_tasks, test_tasks)
    selected = select_tasks(all_tasks, tasks)
    kwargs = dict(image_size=image_size, resize=resize, stage=stage, batch_size=batch_size,
                  num_workers=num_workers, device=device)
    train_x = cached_features(backbone, train_paths, cache_dir=cache_dir, source=source, **kwargs)
    test_x = cached_features(backbone, test_paths, cache_dir=cache_dir, source=source, **kwargs)
    results = svm_eval_tasks(train_x, train_entries, test_x, test_entries, selected, workers=workers)
    return results if details else {task: r.map for task, r in results.items()}
