"""The VOC07 SVM protocol against an independent scikit-learn computation on the same features."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from sklearn.metrics import average_precision_score
from sklearn.model_selection import cross_val_score
from sklearn.preprocessing import normalize
from sklearn.svm import LinearSVC

from capvis.errors import DataError
from capvis.eval.svm import train_eval_svms

COSTS = (0.01, 0.1, 1.0, 10.0)


def make_data(seed=0, n_train=200, n_test=150, dim=32, k=4):
    """Features with a weak per-class signal; about 5% of the labels are 'difficult' (-1)."""
    rng = np.random.default_rng(seed)
    protos = rng.normal(size=(k, dim))

    def split(n):
        y = (rng.random((n, k)) < 0.3).astype(np.int64)
        x = rng.normal(size=(n, dim)) + 0.8 * y @ protos
        y[rng.random((n, k)) < 0.05] = -1
        return x.astype(np.float32), y

    return (*split(n_train), *split(n_test))


def reference_map(train_x, train_y, test_x, test_y):
    """Straightforward per-class loop, written from the protocol description only."""
    train_x, test_x = normalize(train_x), normalize(test_x)
    aps = []
    for j in range(train_y.shape[1]):
        y = np.where(train_y[:, j] == 1, 1, -1)
        best_c, best_mean = None, -1.0
        for c in COSTS:
            svm = LinearSVC(C=c, class_weight={1: 2, -1: 1}, penalty="l2", loss="squared_hinge",
                            dual=True, max_iter=2000, tol=1e-4, random_state=0)
            mean = cross_val_score(svm, train_x, y, cv=3, scoring="average_precision").mean()
            if mean > best_mean:
                best_c, best_mean = c, mean
        svm = LinearSVC(C=best_c, class_weight={1: 2, -1: 1}, penalty="l2", loss="squared_hinge",
                        dual=True, max_iter=2000, tol=1e-4, random_state=0).fit(train_x, y)
        keep = test_y[:, j] != -1
        aps.append(average_precision_score(test_y[keep, j] == 1, svm.decision_function(test_x[keep])))
    return 100.0 * float(np.mean(aps))


@pytest.fixture(scope="module")
def data():
    return make_data()


@pytest.fixture(scope="module", params=["liblinear", "batched"])
def solver(request):
    return request.param


@pytest.fixture(scope="module")
def result(data, solver):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return train_eval_svms(*data, workers=1, solver=solver)


def test_matches_independent_sklearn(data, result, solver):
    # liblinear is the reference's own computation; the batched solver reaches the same optimum to ~1e-4
    assert result.map == pytest.approx(reference_map(*data), abs=1e-9 if solver == "liblinear" else 0.1)
    assert len(result.per_class) == 4 and not result.skipped
    assert all(c.cost in COSTS for c in result.per_class)
    assert 50.0 < result.map <= 100.0  # percent, and the signal is learnable


def test_parallel_workers_same_result(data, result, solver):
    par = train_eval_svms(*data, workers=2, solver=solver)
    assert par.map == pytest.approx(result.map, abs=1e-9)
    assert par.costs == result.costs


def test_difficult_test_rows_excluded(data, result, solver):
    train_x, train_y, test_x, test_y = data
    scrambled = test_x.copy()
    hard = (test_y == -1).any(axis=1)
    assert hard.any()
    # Changing only rows that are difficult for class 0 must leave class 0's AP unchanged.
    rows = test_y[:, 0] == -1
    scrambled[rows] = np.random.default_rng(1).normal(size=(rows.sum(), test_x.shape[1]))
    again = train_eval_svms(train_x, train_y, scrambled, test_y, workers=1, solver=solver)
    assert again.per_class[0].ap == pytest.approx(result.per_class[0].ap, abs=1e-9)


def test_difficult_train_rows_are_negatives(data, result, solver):
    train_x, train_y, test_x, test_y = data
    as_zero = np.where(train_y == -1, 0, train_y)
    assert (train_y == -1).any()
    again = train_eval_svms(train_x, as_zero, test_x, test_y, workers=1, solver=solver)
    assert again.map == pytest.approx(result.map, abs=1e-9)


def test_class_without_test_positives_is_skipped(data, solver):
    train_x, train_y, test_x, test_y = data
    test_y = test_y.copy()
    test_y[:, 2] = np.where(test_y[:, 2] == 1, -1, test_y[:, 2])  # only negatives/difficult left
    with pytest.warns(UserWarning, match="skipping class 'c'"):
        out = train_eval_svms(train_x, train_y, test_x, test_y, workers=1, solver=solver,
                              class_names=["a", "b", "c", "d"])
    assert set(out.ap) == {"a", "b", "d"} and "c" in out.skipped
    assert out.map == pytest.approx(np.mean(list(out.ap.values())))


def test_bad_labels_raise(data):
    train_x, train_y, test_x, test_y = data
    with pytest.raises(DataError, match="labels must be in"):
        train_eval_svms(train_x, train_y * 2, test_x, test_y, workers=1)
    with pytest.raises(DataError, match="row mismatch"):
        train_eval_svms(train_x[:-1], train_y, test_x, test_y, workers=1)
