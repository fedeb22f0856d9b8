"""The VOC07 linear-SVM protocol on feature matrices (VirTex paper, Appendix A.1).

VirTex scores a frozen backbone by training one linear SVM per class on pooled features and
reporting test mAP. This module reproduces ``scripts/clf_voc07.py`` of the original code on
plain ``numpy`` arrays, so it serves VOC2007 and any other multi-label dataset alike:

* labels are ``(N, K)`` matrices with ``1`` = present, ``0`` = absent, ``-1`` = difficult;
* training treats every non-``1`` label as negative (difficult images are negatives);
* testing excludes ``-1`` rows of that class from its AP;
* per class, ``C`` is chosen among ``costs`` by the mean ``folds``-fold ``cross_val_score``
  with ``scoring="average_precision"`` (unshuffled stratified folds, sklearn's default for a
  classifier); ties keep the first (smallest, with the default order) cost, because the
  original replaces its best only on a strictly greater mean;
* the chosen SVM is refit on all training rows and scored with sklearn's
  ``average_precision_score`` on ``decision_function`` (not VOC's 11-point AP).

Features are L2-normalised row-wise here (``normalize=True``); the original does it inside its
feature extractor, so pass ``normalize=False`` only for features that are already normalised or
to study the effect.

Two solvers give the same protocol (``solver=``, a registry): ``batched`` (default,
:mod:`capvis.eval.svm_batched`) solves every class x cost x fold at once as a primal Newton method in
torch, ~10x faster than the original on VOC07; ``liblinear`` runs sklearn's ``LinearSVC`` per class in
parallel processes (joblib), as the original's Pool does, for exact reproduction.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from joblib import Parallel, delayed
from sklearn.exceptions import ConvergenceWarning
from sklearn.metrics import average_precision_score
from sklearn.model_selection import cross_val_score
from sklearn.svm import LinearSVC

from capvis.errors import ConfigError, DataError
from capvis.eval import svm_batched

logger = logging.getLogger(__name__)

VOC07_COSTS: tuple[float, ...] = (0.01, 0.1, 1.0, 10.0)


@dataclass
class ClassResult:
    """Outcome of one class's SVM; AP values are in percent (x100), as the paper reports them.

    ``convergence_warnings`` counts the fits (CV and refit) that stopped at the iteration cap.
    """

    name: str
    ap: float
    cost: float
    cv_ap: dict[float, float]
    convergence_warnings: int = 0


@dataclass
class SVMResult:
    """Per-class results plus their mean.

    ``map`` is in percent (x100) like the paper's tables (VirTex R-50: 88.7). Classes listed in
    ``skipped`` (no positives in train or test, or too few for ``folds``-fold CV) are not in
    ``per_class`` and do not count towards ``map``; ``map`` is NaN if every class was skipped.
    """

    map: float
    per_class: list[ClassResult]
    skipped: dict[str, str] = field(default_factory=dict)

    @property
    def ap(self) -> dict[str, float]:
        return {c.name: c.ap for c in self.per_class}

    @property
    def costs(self) -> dict[str, float]:
        return {c.name: c.cost for c in self.per_class}

    def to_dict(self) -> dict:
        """JSON-friendly summary (what ``capvis eval`` prints)."""
        return {
            "mAP": self.map,
            "ap": self.ap,
            "cost": self.costs,
            "skipped": dict(self.skipped),
        }


def make_svm(cost: float, *, random_state: int | None = 0) -> LinearSVC:
    """The original's classifier; ``dual=True`` is explicit since sklearn's default became "auto".

    ``random_state`` seeds liblinear's coordinate-descent order. The original left it unset,
    which makes the last digits of AP vary between runs; a fixed seed makes results repeatable.
    """
    return LinearSVC(
        C=cost,
        class_weight={1: 2, -1: 1},
        penalty="l2",
        loss="squared_hinge",
        dual=True,
        max_iter=2000,
        tol=1e-4,
        random_state=random_state,
    )


def l2_normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Row-wise L2 normalisation (as ``F.normalize(features, dim=-1)`` in the original)."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, eps)


def _skip_reason(train_col: np.ndarray, test_col: np.ndarray, folds: int) -> str | None:
    n_pos = int((train_col == 1).sum())
    n_neg = int(len(train_col) - n_pos)
    if n_pos == 0:
        return "no positives in train"
    if n_pos < folds or n_neg < folds:
        return f"fewer than {folds} positives or negatives in train for {folds}-fold CV"
    test_eval = test_col[test_col != -1]
    if not (test_eval == 1).any():
        return "no positives in test"
    return None


def train_eval_one_class(
    name: str,
    train_x: np.ndarray,
    train_col: np.ndarray,
    test_x: np.ndarray,
    test_col: np.ndarray,
    costs: Sequence[float] = VOC07_COSTS,
    folds: int = 3,
    random_state: int | None = 0,
) -> ClassResult:
    """Cost selection by CV, refit on all train rows, AP on the non-difficult test rows."""
    y_train = np.where(train_col == 1, 1, -1)  # difficult and absent are both negatives
    n_warn = 0
    cv_ap: dict[float, float] = {}
    best_cost, best_score = costs[0], -np.inf
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        for cost in costs:
            scores = cross_val_score(
                make_svm(cost, random_state=random_state), train_x, y_train,
                cv=folds, scoring="average_precision",
            )
            cv_ap[float(cost)] = float(scores.mean()) * 100.0
            if scores.mean() > best_score:  # strict: ties keep the earlier cost
                best_cost, best_score = cost, scores.mean()
        clf = make_svm(best_cost, random_state=random_state).fit(train_x, y_train)
        n_warn = sum(issubclass(w.category, ConvergenceWarning) for w in caught)
    keep = test_col != -1
    scores_test = clf.decision_function(test_x[keep])
    ap = average_precision_score(test_col[keep] == 1, scores_test)
    return ClassResult(name, float(ap) * 100.0, float(best_cost), cv_ap, n_warn)


def _check_shapes(train_x, train_y, test_x, test_y) -> None:
    if train_x.ndim != 2 or test_x.ndim != 2:
        raise DataError(f"features must be 2-D (N, D); got {train_x.shape} and {test_x.shape}")
    if train_y.ndim != 2 or test_y.ndim != 2:
        raise DataError(f"labels must be 2-D (N, K); got {train_y.shape} and {test_y.shape}")
    if len(train_x) != len(train_y) or len(test_x) != len(test_y):
        raise DataError(
            f"feature/label row mismatch: train {len(train_x)} vs {len(train_y)}, "
            f"test {len(test_x)} vs {len(test_y)}"
        )
    if train_x.shape[1] != test_x.shape[1] or train_y.shape[1] != test_y.shape[1]:
        raise DataError(
            f"train/test width mismatch: features {train_x.shape[1]} vs {test_x.shape[1]}, "
            f"classes {train_y.shape[1]} vs {test_y.shape[1]}"
        )
    for name, y in (("train", train_y), ("test", test_y)):
        bad = np.setdiff1d(np.unique(y), [-1, 0, 1])
        if bad.size:
            raise DataError(f"{name} labels must be in {{1, 0, -1}}; found {bad[:5].tolist()}")


def _liblinear(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
               names: list[str], costs: tuple[float, ...], folds: int, *, workers: int | None,
               random_state: int | None, device: str | torch.device) -> list[ClassResult]:
    """One sklearn ``LinearSVC`` problem at a time, classes in parallel processes."""
    jobs = [delayed(train_eval_one_class)(name, train_x, train_y[:, j], test_x, test_y[:, j], costs, folds,
                                          random_state) for j, name in enumerate(names)]
    n_workers = max(1, min(workers or os.cpu_count() or 1, max(1, len(jobs))))
    results = Parallel(n_jobs=n_workers)(jobs) if jobs else []
    for r in results:
        if r.convergence_warnings:
            logger.info("SVM class %s: %d fits hit max_iter", r.name, r.convergence_warnings)
    return list(results)


def _batched(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
             names: list[str], costs: tuple[float, ...], folds: int, *, workers: int | None,
             random_state: int | None, device: str | torch.device) -> list[ClassResult]:
    """Every class x cost x fold as one batched Newton solve (``workers``/``random_state`` unused)."""
    if not names:
        return []
    out = svm_batched.protocol(train_x, train_y, test_x, test_y, costs, folds, device=device)
    results = [ClassResult(name, r["ap"], r["cost"], r["cv_ap"], r["not_converged"])
               for name, r in zip(names, out)]
    for r in results:
        if r.convergence_warnings:
            logger.warning("SVM class %s: %d problems hit the iteration cap", r.name, r.convergence_warnings)
    return results


SOLVERS = {"batched": _batched, "liblinear": _liblinear}


def train_eval_svms(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    costs: Sequence[float] = VOC07_COSTS,
    folds: int = 3,
    workers: int | None = None,
    *,
    class_names: Sequence[str] | None = None,
    normalize: bool = True,
    random_state: int | None = 0,
    solver: str = "batched",
    device: str | torch.device = "cpu",
) -> SVMResult:
    """Run the VOC07 SVM protocol for every class and average the test APs.

    Args:
        train_x: (N_train, D) features.
        train_y: (N_train, K) labels in {1, 0, -1}; non-1 is negative for training.
        test_x: (N_test, D) features.
        test_y: (N_test, K) labels in {1, 0, -1}; -1 rows are left out of that class's AP.
        costs: candidate SVM costs C, tried in this order (ties keep the earlier one).
        folds: cross-validation folds for choosing C.
        workers: ``liblinear``: processes running classes in parallel; default ``os.cpu_count()``;
            1 runs in-process. ``batched`` uses torch's threads instead.
        class_names: names for the K columns (default "0".."K-1").
        normalize: L2-normalise feature rows first (the original normalises at extraction).
        random_state: liblinear seed, for repeatable results.
        solver: ``batched`` (all problems in one torch solve) or ``liblinear`` (sklearn, exact).
        device: where the ``batched`` solver runs (``cpu``, ``cuda``, ...).

    Returns:
        SVMResult with per-class AP and cost, and mAP, all in percent.
    """
    if solver not in SOLVERS:
        raise ConfigError(f"unknown SVM solver {solver!r}; known: {', '.join(SOLVERS)}")
    train_x, test_x = np.asarray(train_x), np.asarray(test_x)
    train_y, test_y = np.asarray(train_y), np.asarray(test_y)
    _check_shapes(train_x, train_y, test_x, test_y)
    k = train_y.shape[1]
    names = [str(i) for i in range(k)] if class_names is None else [str(c) for c in class_names]
    if len(names) != k:
        raise DataError(f"{len(names)} class names for {k} label columns")
    if normalize:
        train_x, test_x = l2_normalize(train_x), l2_normalize(test_x)

    skipped: dict[str, str] = {}
    kept = []
    for j, name in enumerate(names):
        reason = _skip_reason(train_y[:, j], test_y[:, j], folds)
        if reason is not None:
            warnings.warn(f"SVM: skipping class {name!r}: {reason}; it is left out of mAP",
                          stacklevel=2)
            skipped[name] = reason
        else:
            kept.append(j)
    results = SOLVERS[solver](train_x, train_y[:, kept], test_x, test_y[:, kept], [names[j] for j in kept],
                              tuple(costs), folds, workers=workers, random_state=random_state, device=device)
    mean = float(np.mean([r.ap for r in results])) if results else float("nan")
    return SVMResult(map=mean, per_class=results, skipped=skipped)
