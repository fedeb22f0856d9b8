"""Reader for the PASCAL VOC2007 classification layout (``VOCdevkit/VOC2007``).

The VOC07 SVM protocol needs, per split, the image files and an ``(N, 20)`` label matrix. VOC
stores one file per class and split, ``ImageSets/Main/<class>_<split>.txt``, with lines like
``000005 -1``: ``1`` present, ``-1`` absent, ``0`` difficult. capvis (like the original VirTex
``VOC07ClassificationDataset``) recodes them to ``1`` present, ``0`` absent, ``-1`` difficult,
the convention of :func:`capvis.eval.svm.train_eval_svms`. Classes are the sorted names of the
``*_trainval.txt`` files, so trainval and test share one column order.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from capvis.errors import DataError

# VOC code -> capvis code: present stays 1, absent (-1) becomes 0, difficult (0) becomes -1.
_RECODE = {"1": 1, "-1": 0, "0": -1}


def voc07_root(root: str | Path) -> Path:
    """Accept either ``.../VOC2007`` or the ``VOCdevkit`` folder that holds it."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"VOC2007 root {root} is not a directory")
    if not (root / "ImageSets").is_dir() and (root / "VOC2007" / "ImageSets").is_dir():
        root = root / "VOC2007"
    return root


def voc07_classes(root: str | Path) -> list[str]:
    """Class names from the sorted ``ImageSets/Main/*_trainval.txt`` file names."""
    main = voc07_root(root) / "ImageSets" / "Main"
    if not main.is_dir():
        raise DataError(f"missing directory {main} (expected VOCdevkit/VOC2007/ImageSets/Main)")
    classes = sorted(p.name[: -len("_trainval.txt")] for p in main.glob("*_trainval.txt"))
    if not classes:
        raise DataError(f"no <class>_trainval.txt files in {main}")
    return classes


def _read_class_file(path: Path) -> dict[str, int]:
    if not path.is_file():
        raise DataError(f"missing VOC label file {path}")
    labels: dict[str, int] = {}
    for lineno, line in enumerate(path.read_text().splitlines(), start=1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 2 or parts[1] not in _RECODE:
            raise DataError(f"{path}:{lineno}: expected '<image id> <1|0|-1>', got {line!r}")
        labels[parts[0]] = _RECODE[parts[1]]
    return labels


def read_voc07(root: str | Path, split: str) -> tuple[list[Path], np.ndarray, list[str]]:
    """Images, labels and class names of one VOC2007 split.

    Args:
        root: ``VOCdevkit/VOC2007`` (or ``VOCdevkit``).
        split: ``trainval`` or ``test`` (``train``/``val`` work too).

    Returns:
        ``(image_paths, labels, classes)``: ``JPEGImages/<id>.jpg`` paths in the order of the
        first class file, an ``(N, K)`` int8 matrix in {1, 0, -1} (present, absent, difficult),
        and the K class names.
    """
    root = voc07_root(root)
    classes = voc07_classes(root)
    main = root / "ImageSets" / "Main"
    per_class = [_read_class_file(main / f"{c}_{split}.txt") for c in classes]
    ids = list(per_class[0])
    for c, lab in zip(classes, per_class):
        if lab.keys() != per_class[0].keys():
            raise DataError(
                f"{main / f'{c}_{split}.txt'} lists different images than "
                f"{main / f'{classes[0]}_{split}.txt'}"
            )
    if not ids:
        raise DataError(f"{main / f'{classes[0]}_{split}.txt'} lists no images")
    labels = np.array([[lab[i] for lab in per_class] for i in ids], dtype=np.int8)  # (N, K)

    images = root / "JPEGImages"
    if not images.is_dir():
        raise DataError(f"missing directory {images}")
    paths = [images / f"{i}.jpg" for i in ids]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise DataError(f"{len(missing)} of {len(paths)} images missing, first: {missing[0]}")
    return paths, labels, classes
