"""The batched linear probe: the optimum scikit-learn finds, a sweep solved as one problem, the protocol."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression

from capvis.errors import ConfigError, DataError
from capvis.eval.probe import (
    ProbeFit, chance_top1, fit_softmax_probes, holdout_split, parse_weight_decays, probe_accuracy,
)


def _blobs(n: int, d: int, k: int, spread: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(k, d)) * 3
    y = rng.integers(0, k, size=n)
    return centers[y] + spread * rng.normal(size=(n, d)), y


def _soft(n: int = 300, d: int = 12, k: int = 4, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Overlapping classes (labels drawn from a softmax), so the optimum is finite and unique."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d))
    return x, (x @ rng.normal(size=(d, k)) + rng.gumbel(size=(n, k))).argmax(1)


def test_same_optimum_as_sklearn_logistic_regression_at_the_same_regularisation():
    x, y = _soft()
    lams = (1e-3, 1e-1, 3.0)
    fit = fit_softmax_probes(x, y, 4, lams, tol=1e-9, max_iter=3000)
    assert fit.converged.all() and fit.weight.dtype == torch.float64
    logits = fit.logits(torch.from_numpy(x)).numpy()  # (S, N, K)
    for i, lam in enumerate(lams):
        # sklearn: C * sum(loss) + ||W||^2 / 2 (intercept not penalised)  ==  N*C * ours with lam = 1/(N*C)
        ref = LogisticRegression(C=1.0 / (lam * len(x)), tol=1e-12, max_iter=20000).fit(x, y)
        assert np.array_equal(logits[i].argmax(1), ref.predict(x))
        sk = ref.decision_function(x)
        # sklearn's multinomial logits are defined up to a per-row constant: compare centred logits
        ours, sk = logits[i] - logits[i].mean(1, keepdims=True), sk - sk.mean(1, keepdims=True)
        assert np.abs(ours - sk).max() < 1e-4 * max(1.0, np.abs(sk).max()), lam


def test_a_sweep_solved_together_equals_each_problem_alone():
    x, y = _soft(seed=3)
    together = fit_softmax_probes(x, y, 4, (1e-2, 1.0), tol=1e-9)
    for i, lam in enumerate((1e-2, 1.0)):
        alone = fit_softmax_probes(x, y, 4, (lam,), tol=1e-9)
        assert torch.allclose(together.weight[i], alone.weight[0], atol=1e-6)
        assert torch.allclose(together.bias[i], alone.bias[0], atol=1e-6)
    assert together.converged.all() and together.weight[1].norm() < together.weight[0].norm()


def test_separable_features_reach_full_accuracy():
    x, y = _blobs(400, 16, 5, spread=0.3)
    res = probe_accuracy(x[:300], y[:300], x[300:], y[300:], 5)
    assert res.top1 == 100.0 and res.top5 == 100.0 and res.test_rows == 100 and res.converged
    assert set(res.holdout_top1) == {1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0}


def test_random_labels_give_chance_accuracy():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(1500, 32)), rng.integers(0, 5, size=1500)
    res = probe_accuracy(x[:1000], y[:1000], x[1000:], y[1000:], 5)
    assert abs(res.top1 - 20.0) < 6.0  # 500 test rows: chance 20 %, binomial sd ~1.8
    assert res.weight_decay >= 1e-2  # nothing to learn: the held-out split prefers strong decay
    assert abs(chance_top1(y[:1000], y[1000:]) - 20.0) < 6.0


def test_weight_decay_is_chosen_on_held_out_training_rows_only():
    x, y = _blobs(200, 8, 3, spread=2.0, seed=4)
    test_x, test_y = _blobs(100, 8, 3, spread=2.0, seed=5)
    a = probe_accuracy(x, y, test_x, test_y, 3, seed=0)
    b = probe_accuracy(x, y, test_x, 1 - test_y.clip(0, 1), 3, seed=0)  # other test labels: same choice
    assert a.weight_decay == b.weight_decay and a.holdout_top1 == b.holdout_top1
    best = max(a.holdout_top1.values())
    assert a.weight_decay == max(w for w, v in a.holdout_top1.items() if v == best)  # ties: larger decay
    fit_rows, hold_rows = holdout_split(200, 0.2, seed=0)
    assert len(hold_rows) == 40 and not set(fit_rows) & set(hold_rows) and len(fit_rows) + 40 == 200


def test_warm_start_and_unseen_classes():
    x, y = _soft(seed=5)
    cold = fit_softmax_probes(x, y, 6, (1e-2,), tol=1e-8)  # classes 4 and 5 never appear
    warm = fit_softmax_probes(x, y, 6, (1e-2,), tol=1e-8, init=ProbeFit(cold.weight, cold.bias, (1e-2,),
                                                                         cold.iterations, cold.converged))
    assert warm.iterations[0] <= 1 and torch.allclose(warm.weight, cold.weight, atol=1e-6)
    assert (cold.logits(torch.from_numpy(x))[0].argmax(1) < 4).all()
    # an unseen class has no minimiser; its optimum (weights 0, bias -inf) is written, not chased
    assert torch.isneginf(cold.bias[0, 4:]).all() and not cold.weight[0, :, 4:].any()
    seen = fit_softmax_probes(x, y, 4, (1e-2,), tol=1e-8)
    torch.testing.assert_close(cold.weight[..., :4], seen.weight)
    torch.testing.assert_close(cold.bias[:, :4], seen.bias)


def test_bad_inputs_are_one_line_errors():
    x, y = _soft()
    with pytest.raises(DataError, match="labels must lie"):
        fit_softmax_probes(x, y + 10, 4)
    with pytest.raises(DataError, match="positive"):
        fit_softmax_probes(x, y, 4, (0.0,))
    with pytest.raises(DataError, match="widths"):
        probe_accuracy(x, y, x[:, :3], y, 4)
    with pytest.raises(ConfigError, match="weight-decays"):
        parse_weight_decays("1e-3,abc")
    assert parse_weight_decays("1e-3, 1") == (1e-3, 1.0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_gives_the_cpu_solution():
    x, y = _soft()
    cpu = fit_softmax_probes(x, y, 4, (1e-2, 1.0), tol=1e-9)
    gpu = fit_softmax_probes(x, y, 4, (1e-2, 1.0), tol=1e-9, device="cuda", dtype=torch.float64)
    assert gpu.weight.is_cuda and torch.allclose(gpu.weight.cpu(), cpu.weight, atol=1e-6)
    res = probe_accuracy(x[:200], y[:200], x[200:], y[200:], 4, device="cuda")
    assert res.top1 == pytest.approx(probe_accuracy(x[:200], y[:200], x[200:], y[200:], 4).top1, abs=2.0)


def test_the_preconditioner_cuts_iterations_on_correlated_features_not_the_answer(monkeypatch):
    """Frozen features are strongly correlated; L-BFGS started from (c Sigma + lam I)^-1 needs a fraction of
    plain L-BFGS's iterations and reaches the same minimiser."""
    from capvis.eval import probe

    rng = np.random.default_rng(0)
    y = rng.integers(0, 5, 400)
    mix = rng.normal(size=(32, 32)) @ np.diag(np.logspace(0, -2.5, 32))  # columns strongly correlated
    x = (rng.normal(size=(400, 32)) + 2.1 * np.eye(5, 32)[y]) @ mix
    x = (x - x.mean(0)) / x.std(0)
    lams = (1e-4, 1e-2, 1.0)
    fast = fit_softmax_probes(x, y, 5, lams, max_iter=2000)
    exact = fit_softmax_probes(x, y, 5, lams, max_iter=3000, tol=1e-9)

    class Identity:
        def __init__(self, *args):
            pass

        def select(self, keep):
            pass

        def __call__(self, g):
            return g

    monkeypatch.setattr(probe, "_Preconditioner", Identity)
    plain = fit_softmax_probes(x, y, 5, lams, max_iter=2000)
    plain_exact = fit_softmax_probes(x, y, 5, lams, max_iter=3000, tol=1e-9)
    assert fast.converged.all() and plain.converged.all()
    assert int(fast.iterations.sum()) * 2 < int(plain.iterations.sum())  # measured 35 vs 120
    torch.testing.assert_close(exact.weight, plain_exact.weight, atol=1e-5, rtol=1e-4)
