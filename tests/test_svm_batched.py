"""The batched SVM solver against scikit-learn: AP, the solution of one problem, and the whole protocol."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score
from sklearn.model_selection import StratifiedKFold
from sklearn.svm import LinearSVC

from capvis.cli import main
from capvis.errors import ConfigError
from capvis.eval.svm import l2_normalize, train_eval_svms
from capvis.eval import svm_batched
from capvis.eval.svm_batched import average_precision, solve_squared_hinge, stratified_folds


def random_data(seed=0, n_train=240, n_test=160, dim=24, k=4, signal=0.8):
    """Overlapping classes (a weak per-class signal) with ~5% 'difficult' labels."""
    rng = np.random.default_rng(seed)
    protos = rng.normal(size=(k, dim))

    def split(n):
        y = (rng.random((n, k)) < 0.3).astype(np.int64)
        x = rng.normal(size=(n, dim)) + signal * y @ protos
        y[rng.random((n, k)) < 0.05] = -1
        return x.astype(np.float32), y

    return (*split(n_train), *split(n_test))


def separable_data(seed=0, n_train=150, n_test=120, dim=16, k=3):
    """Every class linearly separable with a wide margin (CV AP ties at 100 for several costs)."""
    rng = np.random.default_rng(seed)
    protos = 3.0 * np.eye(k, dim)

    def split(n):
        y = (rng.random((n, k)) < 0.35).astype(np.int64)
        x = np.abs(rng.normal(size=(n, dim))) * 0.3 + y @ protos
        return x.astype(np.float32), y

    return (*split(n_train), *split(n_test))


def exact_svc(cost: float) -> LinearSVC:
    """The protocol's LinearSVC, run to a tight tolerance so its solution is the exact optimum."""
    return LinearSVC(C=cost, class_weight={1: 2, -1: 1}, dual=True, tol=1e-8, max_iter=100_000)


def test_average_precision_equals_sklearn_with_ties_and_masks() -> None:
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 6, size=(300, 7)).astype(np.float64)  # many ties
    scores[:, 3] = rng.normal(size=300)  # and one column without ties
    positive = rng.random((300, 7)) < 0.3
    valid = rng.random((300, 7)) < 0.7
    got = average_precision(torch.from_numpy(scores), torch.from_numpy(positive), torch.from_numpy(valid))
    want = [average_precision_score(positive[valid[:, j], j], scores[valid[:, j], j]) for j in range(7)]
    np.testing.assert_allclose(got.numpy(), want, rtol=0, atol=1e-12)
    full = average_precision(torch.from_numpy(scores), torch.from_numpy(positive))
    np.testing.assert_allclose(full.numpy(), [average_precision_score(positive[:, j], scores[:, j])
                                              for j in range(7)], rtol=0, atol=1e-12)


def test_folds_are_sklearns_stratified_kfold() -> None:
    y = np.where(random_data()[1] == 1, 1, -1)
    fold = stratified_folds(y, 3)
    for k in range(y.shape[1]):
        for f, (_, held_out) in enumerate(StratifiedKFold(3).split(np.zeros(len(y)), y[:, k])):
            assert (np.flatnonzero(fold[:, k] == f) == held_out).all()


@pytest.mark.parametrize("preconditioned", [True, False])
@pytest.mark.parametrize("make", [random_data, separable_data])
@pytest.mark.parametrize(("hessian_dtype", "tol", "atol"), [(torch.float32, 1e-6, 1e-5), (None, 1e-10, 1e-7)])
def test_solution_equals_linearsvc(make, hessian_dtype, tol, atol, preconditioned, monkeypatch) -> None:
    """Pure float64 (default) and float32 Hessian products both reach LinearSVC's optimum, with the
    preconditioned conjugate gradients (few features) and the plain ones (many)."""
    if not preconditioned:
        monkeypatch.setattr(svm_batched, "PRECONDITION_MAX_FEATURES", 0)
    train_x, train_y, _, _ = make()
    x = l2_normalize(train_x).astype(np.float64)
    y = np.where(train_y == 1, 1.0, -1.0)  # (N, K)
    costs = (0.1, 1.0, 10.0)
    weight = np.where(y > 0, 2.0, 1.0)
    xb = torch.from_numpy(np.hstack([x, np.ones((len(x), 1))]))
    y_cols = np.repeat(y, len(costs), axis=1)  # columns (class, cost)
    c_cols = np.concatenate([weight[:, [k]] * np.array(costs) for k in range(y.shape[1])], axis=1)
    w, z, converged = solve_squared_hinge(xb, torch.from_numpy(y_cols), torch.from_numpy(c_cols), tol=tol,
                                          hessian_dtype=hessian_dtype)
    assert converged.all()
    for col in range(y_cols.shape[1]):
        k, cost = divmod(col, len(costs))
        svc = exact_svc(costs[cost]).fit(x, y[:, k])
        ref = np.append(svc.coef_[0], svc.intercept_[0])
        scale = max(1.0, np.abs(ref).max())
        np.testing.assert_allclose(w[:, col].numpy(), ref, rtol=0, atol=atol * scale)
        np.testing.assert_allclose(z[:, col].numpy(), svc.decision_function(x), rtol=0, atol=atol * scale)


def test_preconditioning_cuts_conjugate_gradient_steps() -> None:
    """Non-negative features share one dominant direction; at a large cost the Newton system is
    ill-conditioned along it. With the same step budget the preconditioned solve is far closer to the
    exact Newton step, and both converge to it."""
    rng = np.random.default_rng(0)
    x = torch.from_numpy(np.abs(rng.normal(size=(400, 64))) + 3.0)
    curv2 = torch.from_numpy(np.where(rng.random((400, 3)) < 0.3, 20.0, 0.0))  # active rows at C = 10
    grad = torch.from_numpy(rng.normal(size=(64, 3)))
    hessian = torch.eye(64, dtype=torch.float64) + torch.einsum("np,nm,nq->mpq", x, curv2, x)
    exact = -torch.linalg.solve(hessian, grad.T.unsqueeze(-1))[..., 0].T
    plain = (x.new_zeros(0), x.new_zeros(64, 0))
    basis = svm_batched._preconditioner(x)
    assert basis[1].shape == (64, 64)

    def error(basis, steps: int) -> float:
        s, xs = svm_batched._conjugate_gradient(x, curv2, grad, torch.zeros(3, dtype=torch.float64), steps, basis)
        torch.testing.assert_close(xs, x @ s)
        return float(((s - exact).norm(dim=0) / exact.norm(dim=0)).max())

    assert error(basis, 30) < 1e-5 < error(plain, 30)
    assert error(basis, 30) * 20 < error(plain, 30)
    assert error(basis, 200) < 1e-10 and error(plain, 200) < 1e-10


def test_held_out_rows_do_not_change_the_solution() -> None:
    """A zero cost removes a row from a problem: same optimum as fitting without it."""
    train_x, train_y, _, _ = random_data(seed=3)
    x = l2_normalize(train_x).astype(np.float64)
    y = np.where(train_y[:, 0] == 1, 1.0, -1.0)
    keep = np.arange(len(x)) % 3 != 0
    c = np.where(y > 0, 2.0, 1.0) * keep
    xb = torch.from_numpy(np.hstack([x, np.ones((len(x), 1))]))
    w, z, _ = solve_squared_hinge(xb, torch.from_numpy(y[:, None]), torch.from_numpy(c[:, None]), tol=1e-6)
    svc = exact_svc(1.0).fit(x[keep], y[keep])
    np.testing.assert_allclose(z[~keep, 0].numpy(), svc.decision_function(x[~keep]), atol=1e-6)


@pytest.mark.parametrize("make", [random_data, separable_data])
def test_protocol_matches_liblinear(make) -> None:
    data = make()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lib = train_eval_svms(*data, workers=1, solver="liblinear")
    bat = train_eval_svms(*data, solver="batched")
    assert bat.costs == lib.costs  # same chosen C per class
    for b, r in zip(bat.per_class, lib.per_class):
        assert b.ap == pytest.approx(r.ap, abs=1e-3 * 100)  # AP (a fraction) to 1e-3
        assert b.cv_ap == pytest.approx(r.cv_ap, abs=1e-3 * 100)  # same folds, same CV scores
    assert bat.map == pytest.approx(lib.map, abs=0.1)
    assert 50.0 < bat.map <= 100.0


def test_separable_ties_keep_the_smallest_cost() -> None:
    res = train_eval_svms(*separable_data(), solver="batched")
    for c in res.per_class:
        best = max(c.cv_ap.values())
        assert c.cost == min(cost for cost, ap in c.cv_ap.items() if ap == best)
    assert any(list(c.cv_ap.values()).count(100.0) > 1 for c in res.per_class)  # the tie case happens


def test_chunks_and_skips_give_the_same_classes() -> None:
    train_x, train_y, test_x, test_y = random_data(seed=5, k=5)
    test_y[:, 1] = np.where(test_y[:, 1] == 1, 0, test_y[:, 1])  # class 1: no test positives
    with pytest.warns(UserWarning, match="skipping class '1'"):
        whole = train_eval_svms(train_x, train_y, test_x, test_y)
    assert [c.name for c in whole.per_class] == ["0", "2", "3", "4"] and "1" in whole.skipped
    x, xt, kept = l2_normalize(train_x), l2_normalize(test_x), [0, 2, 3, 4]
    args = (x, train_y[:, kept], xt, test_y[:, kept], (0.01, 0.1, 1.0, 10.0), 3)
    one = svm_batched.protocol(*args, tol=1e-7)
    tiny = svm_batched.protocol(*args, tol=1e-7, memory=1)  # one class per chunk
    assert [r["ap"] for r in tiny] == pytest.approx([r["ap"] for r in one], abs=1e-6)
    assert [r["cost"] for r in tiny] == [r["cost"] for r in one]
    # the public entry point is the same solve at its default tolerance (class 2's CV APs at C=0.1 and
    # C=1 lie 0.05 apart, so a looser solve may choose the other: compare like with like)
    default = svm_batched.protocol(*args)
    assert [c.cost for c in whole.per_class] == [r["cost"] for r in default]
    assert [c.ap for c in whole.per_class] == pytest.approx([r["ap"] for r in default], abs=1e-9)
    assert [r["ap"] for r in one] == pytest.approx([c.ap for c in whole.per_class], abs=1.0)


def test_unknown_solver_is_one_error() -> None:
    with pytest.raises(ConfigError, match="unknown SVM solver 'sgd'"):
        train_eval_svms(*random_data(), solver="sgd")


def _label_file(path, y: np.ndarray) -> str:
    entries = [{"file_name": f"{i:04d}.jpg", "image_id": i,
                "labels": {"tags": np.flatnonzero(row == 1).tolist()}} for i, row in enumerate(y)]
    path.write_text(json.dumps({"tasks": {"tags": {"classes": [f"c{k}" for k in range(y.shape[1])]}},
                                "images": entries}))
    return str(path)


def test_eval_svm_solver_flag(tmp_path, capsys) -> None:
    """``capvis eval svm --solver`` on cached features: both solvers, the same chosen C and close APs."""
    train_x, train_y, test_x, test_y = random_data(seed=7)
    train_y, test_y = np.where(train_y == -1, 0, train_y), np.where(test_y == -1, 0, test_y)  # no 'difficult'
    np.save(tmp_path / "train.npy", train_x)
    np.save(tmp_path / "test.npy", test_x)
    argv = ["eval", "svm", "--train", _label_file(tmp_path / "train.json", train_y),
            "--test", _label_file(tmp_path / "test.json", test_y),
            "--features-train", str(tmp_path / "train.npy"), "--features-test", str(tmp_path / "test.npy"),
            "--workers", "1"]
    out = {}
    for solver in ("batched", "liblinear"):
        capsys.readouterr()
        assert main([*argv, "--solver", solver]) == 0
        out[solver] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    direct = train_eval_svms(train_x, train_y, test_x, test_y, class_names=["c0", "c1", "c2", "c3"])
    assert out["batched"]["mAP"]["tags"] == pytest.approx(direct.map, abs=1e-9)
    assert out["batched"]["ap"]["tags"] == pytest.approx(out["liblinear"]["ap"]["tags"], abs=0.1)
    with pytest.raises(SystemExit):  # argparse rejects an unknown solver
        main([*argv, "--solver", "sgd"])
