"""Time the VOC07 SVM step on VOC2007-sized synthetic features.

5011 trainval / 4952 test rows of 2048-d non-negative features (like ReLU-then-pooled ResNet-50
features), 20 classes with VOC-like prevalence and ~3% "difficult" labels, and a weak per-class
signal so the SVMs have something to learn. Seeded, so every run sees the same data. The last
line of output is one JSON object with ``seconds`` (wall time of ``train_eval_svms``), the mAP, and
``gemm_gflops``: the float64 matrix-product speed measured just before, so figures taken on a busy
machine can be compared.

    python bench/voc07_svm.py --solver batched      # default: every class x cost x fold in one solve
    python bench/voc07_svm.py --solver liblinear --workers 2
"""

from __future__ import annotations

import argparse
import json
import time
import warnings

import numpy as np
import torch

from capvis.eval.svm import SOLVERS, train_eval_svms


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


def gemm_gflops(repeats: int = 3) -> float:
    """Best-of-``repeats`` float64 (5011 x 2048) @ (2048 x 240) throughput: the machine's state now."""
    a, b = torch.randn(5011, 2048, dtype=torch.float64), torch.randn(2048, 240, dtype=torch.float64)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * a.shape[0] * a.shape[1] * b.shape[1] / best / 1e9


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--train-rows", type=int, default=5011)
    p.add_argument("--test-rows", type=int, default=4952)
    p.add_argument("--dims", type=int, default=2048)
    p.add_argument("--classes", type=int, default=20)
    p.add_argument("--workers", type=int, default=None, help="liblinear processes (default: os.cpu_count())")
    p.add_argument("--solver", choices=sorted(SOLVERS), default="batched")
    p.add_argument("--device", default="cpu", help="batched solver: cpu, cuda, ...")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    data = synthetic_voc07(args.train_rows, args.test_rows, args.dims, args.classes, args.seed)
    gflops = gemm_gflops()
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = train_eval_svms(*data, workers=args.workers, solver=args.solver, device=args.device)
    seconds = time.perf_counter() - start
    costs = {}
    for c in result.per_class:
        costs[c.cost] = costs.get(c.cost, 0) + 1
    print(f"chosen costs: {costs}; skipped: {result.skipped or 'none'}")
    print(json.dumps({
        "solver": args.solver, "seconds": round(seconds, 2), "rows": [args.train_rows, args.test_rows],
        "dims": args.dims, "classes": args.classes, "workers": args.workers,
        "threads": torch.get_num_threads(),
        "device": args.device, "gemm_gflops": round(gflops, 1), "mAP": round(result.map, 3),
        "ap": {c.name: round(c.ap, 3) for c in result.per_class}, "cost": result.costs,
    }))


if __name__ == "__main__":
    main()
