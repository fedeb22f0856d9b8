"""Time the VOC07 SVM step on VOC2007-sized synthetic features.

5011 trainval / 4952 test rows of 2048-d non-negative features (like ReLU-then-pooled ResNet-50
features), 20 classes with VOC-like prevalence and ~3% "difficult" labels, and a weak per-class
signal so the SVMs have something to learn. Seeded, so every run sees the same data. The last
line of output is one JSON object with ``seconds`` (wall time of ``train_eval_svms``).

    python bench/voc07_svm.py --workers 2
"""

from __future__ import annotations

import argparse
import json
import time
import warnings

import numpy as np

from capvis.eval.svm import train_eval_svms


def synthetic_voc07(n_train: int, n_test: int, dims: int, classes: int, seed: int):
    rng = np.random.default_rng(seed)
    prevalence = rng.uniform(0.03, 0.2, size=classes)  # VOC07: ~2% (sheep) to ~40% (person)
    protos = np.abs(rng.normal(size=(classes, dims))).astype(np.float32)

    def split(n: int):
        y = (rng.random((n, classes)) < prevalence).astype(np.int8)  # (N, K)
        x = np.abs(rng.normal(size=(n, dims))).astype(np.float32)  # (N, D)
        x += 0.09 * (y @ protos)
        y[(rng.random((n, classes)) < 0.03)] = -1
        return x, y

    return (*split(n_train), *split(n_test))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--train-rows", type=int, default=5011)
    p.add_argument("--test-rows", type=int, default=4952)
    p.add_argument("--dims", type=int, default=2048)
    p.add_argument("--classes", type=int, default=20)
    p.add_argument("--workers", type=int, default=None, help="default: os.cpu_count()")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    data = synthetic_voc07(args.train_rows, args.test_rows, args.dims, args.classes, args.seed)
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = train_eval_svms(*data, workers=args.workers)
    seconds = time.perf_counter() - start
    costs = {}
    for c in result.per_class:
        costs[c.cost] = costs.get(c.cost, 0) + 1
    print(f"chosen costs: {costs}; skipped: {result.skipped or 'none'}")
    print(json.dumps({
        "seconds": round(seconds, 2), "rows": [args.train_rows, args.test_rows],
        "dims": args.dims, "classes": args.classes, "workers": args.workers,
        "mAP": round(result.map, 2),
    }))


if __name__ == "__main__":
    main()
