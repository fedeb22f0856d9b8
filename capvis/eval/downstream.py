"""Downstream-label files (CaptionWorld's ``labels_<split>.json`` or your own), each task scored by the
protocol that fits it.

The task-type rule (:func:`task_kind`), read from the data and never from a task's name: a task is
**multi-label** when any image, in train or test, lists more than one class; it is then scored by the
VOC07 SVM protocol, one one-vs-rest SVM per class (:func:`capvis.eval.svm.train_eval_svms`), as mAP.
Otherwise it is **single-label** and scored by a linear probe on the frozen features (multinomial
logistic regression, weight decay chosen on a held-out split of the training rows,
:func:`capvis.eval.probe.probe_accuracy`), as top-1 %; images whose list is empty have no answer for
that task and are left out of it. :func:`evaluate_label_tasks` is the one call for a backbone and two
label files (``capvis eval labels``, ``capvis ablate``, the demo). :func:`svm_eval_label_files` runs
the SVM protocol on every task regardless of kind (``capvis eval svm``; a single-label task is then K
one-vs-rest classes). Label files carry no "difficult" marks, so every test row counts.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from capvis.data.labels import label_matrix, read_label_file
from capvis.errors import DataError
from capvis.eval.common import default_images_dir
from capvis.eval.probe import chance_top1, probe_accuracy
from capvis.eval.svm import VOC07_COSTS, SVMResult, train_eval_svms

log = logging.getLogger(__name__)
MULTI_LABEL, SINGLE_LABEL = "multi-label", "single-label"


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
                   costs: Sequence[float] = VOC07_COSTS, folds: int = 3, **svm_options: Any) -> dict[str, SVMResult]:
    """One :class:`SVMResult` per task of ``tasks``, on given feature rows (rows follow the entries);
    ``svm_options`` go to :func:`train_eval_svms` (e.g. ``solver``, ``device``)."""
    results = {}
    for task, classes in tasks.items():
        train_y = label_matrix(train_entries, task, len(classes)).astype(np.int8)  # (N, K) in {0, 1}
        test_y = label_matrix(test_entries, task, len(classes)).astype(np.int8)
        results[task] = train_eval_svms(train_x, train_y, test_x, test_y, costs, folds, workers,
                                        class_names=classes, **svm_options)
        log.info("SVM task %s: mAP %.2f over %d classes", task, results[task].map, len(results[task].per_class))
    return results


def task_kind(task: str, *entry_lists: Sequence[dict]) -> str:
    """``"multi-label"`` if any image of any list has more than one class for ``task``, else ``"single-label"``."""
    multi = any(len(e["labels"][task]) > 1 for entries in entry_lists for e in entries)
    return MULTI_LABEL if multi else SINGLE_LABEL


def single_labels(entries: Sequence[dict], task: str) -> np.ndarray:
    """(N,) class index per entry of a single-label task; -1 where the image has no answer (empty list)."""
    return np.array([e["labels"][task][0] if e["labels"][task] else -1 for e in entries], dtype=np.int64)


def _probe_row(task: str, classes: list[str], train_x: np.ndarray, train_entries: Sequence[dict],
               test_x: np.ndarray, test_entries: Sequence[dict], probe_options: dict[str, Any]) -> dict[str, Any]:
    train_y, test_y = single_labels(train_entries, task), single_labels(test_entries, task)
    fit, score = train_y >= 0, test_y >= 0
    row: dict[str, Any] = {"eval_task": task, "metric": "top1", "protocol": "linear probe", "classes": len(classes),
                           "train_rows": int(fit.sum()), "test_rows": int(score.sum())}
    if fit.sum() < 2 or not score.any():
        log.warning("probe task %s: too few labelled images (train %d, test %d); no score", task, fit.sum(),
                    score.sum())
        return {**row, "value": float("nan")}
    result = probe_accuracy(train_x[fit], train_y[fit], test_x[score], test_y[score], len(classes), **probe_options)
    log.info("probe task %s: top-1 %.2f (weight decay %g, %d train / %d test images)", task, result.top1,
             result.weight_decay, result.train_rows, result.test_rows)
    return {**row, "value": result.top1, "weight_decay": result.weight_decay,
            "chance_top1": chance_top1(train_y[fit], test_y[score])}


def evaluate_feature_tasks(train_x: np.ndarray, train_entries: list[dict], test_x: np.ndarray,
                           test_entries: list[dict], tasks: dict[str, list[str]], *, workers: int | None = None,
                           svm_options: dict[str, Any] | None = None, probe_options: dict[str, Any] | None = None
                           ) -> list[dict[str, Any]]:
    """Every task of ``tasks`` by the protocol of its kind (module docstring), in the order of ``tasks``.

    Returns:
        One row per task: ``{"eval_task", "metric": "mAP" | "top1", "value" (percent, NaN if it cannot
        be scored), "protocol", "classes", ...}`` (probe rows add ``weight_decay`` and ``chance_top1``).
    """
    rows = {}
    multi = {t: c for t, c in tasks.items() if task_kind(t, train_entries, test_entries) == MULTI_LABEL}
    for task, result in svm_eval_tasks(train_x, train_entries, test_x, test_entries, multi, workers=workers,
                                       **(svm_options or {})).items():
        rows[task] = {"eval_task": task, "metric": "mAP", "value": result.map, "protocol": "VOC07 SVM",
                      "classes": len(tasks[task]), "scored_classes": len(result.per_class)}
    for task, classes in tasks.items():
        if task not in multi:
            rows[task] = _probe_row(task, classes, train_x, train_entries, test_x, test_entries,
                                    probe_options or {})
    return [rows[t] for t in tasks]


def label_file_features(backbone: nn.Module, train_labels: str | Path, test_labels: str | Path, *,
                        images_train: str | Path | None = None, images_test: str | Path | None = None,
                        image_size: int = 224, resize: int | None = None, stage: str | None = None,
                        batch_size: int = 64, num_workers: int = 0, device: str = "cpu",
                        compile: str | None = None, cache_dir: str | Path | None = None, source: str = "random"
                        ) -> tuple[dict[str, list[str]], list[dict], np.ndarray, list[dict], np.ndarray]:
    """``(tasks, train_entries, train_x, test_entries, test_x)``: both files read and checked, the frozen
    ``backbone``'s features (eval mode, protocol preprocessing) of their images in file order."""
    from capvis.eval.features import cached_features

    tasks, train_entries, train_paths = label_file_images(train_labels, images_train)
    test_tasks, test_entries, test_paths = label_file_images(test_labels, images_test)
    check_same_tasks(tasks, test_tasks)
    kwargs = dict(image_size=image_size, resize=resize, stage=stage, batch_size=batch_size,
                  num_workers=num_workers, device=device, compile=compile)
    train_x = cached_features(backbone, train_paths, cache_dir=cache_dir, source=source, **kwargs)
    test_x = cached_features(backbone, test_paths, cache_dir=cache_dir, source=source, **kwargs)
    return tasks, train_entries, train_x, test_entries, test_x


def evaluate_label_tasks(backbone: nn.Module, train_labels: str | Path, test_labels: str | Path, *,
                         tasks: Sequence[str] | None = None, workers: int | None = None,
                         svm_options: dict[str, Any] | None = None, probe_options: dict[str, Any] | None = None,
                         **feature_options: Any) -> list[dict[str, Any]]:
    """Score ``backbone`` on every task of two label files, each by the protocol of its kind.

    ``feature_options`` are those of :func:`label_file_features` (image folders, ``image_size``,
    ``resize``, ``device``, cache, ...); ``tasks`` selects tasks by name (default: all). Returns the
    rows of :func:`evaluate_feature_tasks`.
    """
    all_tasks, train_entries, train_x, test_entries, test_x = label_file_features(
        backbone, train_labels, test_labels, **feature_options)
    return evaluate_feature_tasks(train_x, train_entries, test_x, test_entries, select_tasks(all_tasks, tasks),
                                  workers=workers, svm_options=svm_options, probe_options=probe_options)


def svm_eval_label_files(backbone: nn.Module, train_labels: str | Path, test_labels: str | Path, *,
                         images_train: str | Path | None = None, images_test: str | Path | None = None,
                         image_size: int = 224, resize: int | None = None, stage: str | None = None,
                         batch_size: int = 64, num_workers: int = 0, device: str = "cpu",
                         workers: int | None = None, cache_dir: str | Path | None = None,
                         source: str = "random", tasks: Sequence[str] | None = None, details: bool = False,
                         **svm_options: Any) -> dict[str, float] | dict[str, SVMResult]:
    """Extract features of both splits with ``backbone`` and run the SVM protocol on every task.

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
    all_tasks, train_entries, train_x, test_entries, test_x = label_file_features(
        backbone, train_labels, test_labels, images_train=images_train, images_test=images_test,
        image_size=image_size, resize=resize, stage=stage, batch_size=batch_size, num_workers=num_workers,
        device=device, cache_dir=cache_dir, source=source)
    results = svm_eval_tasks(train_x, train_entries, test_x, test_entries, select_tasks(all_tasks, tasks),
                             workers=workers, **svm_options)
    return results if details else {task: r.map for task, r in results.items()}
