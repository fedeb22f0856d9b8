"""The VOC07 SVM protocol as one batched solve: every class x cost x fold at once.

liblinear (:mod:`capvis.eval.svm`'s ``liblinear`` path) trains the protocol's 20 x 4 x 3 + 20 SVMs one
by one with sequential coordinate descent. Here they are the columns of one weight matrix over one
shared feature matrix, and each iteration of a primal Newton-CG method is a few large matrix products,
in torch (float64; CPU or CUDA).

The problem is exactly the one ``LinearSVC(dual=True)`` solves in the protocol (L2-regularised squared
hinge, the intercept as a constant feature of value 1 that is regularised too, class weight 2 on
positives)::

    min_w  1/2 |w|^2 + sum_i c_i max(0, 1 - y_i <w, [x_i, 1]>)^2,   c_i = C * class_weight(y_i)

A cross-validation problem is the same problem with ``c_i = 0`` on its held-out rows, so all of them
share the training matrix, and the held-out decision values come for free from ``X @ W``. Folds are
scikit-learn's unshuffled ``StratifiedKFold`` per class (what ``cross_val_score(cv=3)`` uses), C is
chosen by the mean CV AP (ties to the earlier cost), the refit on all rows starts from the mean of the
chosen cost's fold solutions, and AP is :func:`average_precision` (equal to sklearn's
``average_precision_score``, tested).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from sklearn.model_selection import StratifiedKFold
from torch import Tensor

POSITIVE_WEIGHT = 2.0  # the protocol's class_weight {1: 2, -1: 1}
PRECONDITION_MAX_FEATURES = 512  # preconditioned conjugate gradients up to this many features (_conjugate_gradient)
_BYTES_PER_CELL = 8 * 14  # float64 working arrays of shape (N, columns) alive at once, with margin


def average_precision(scores: Tensor, positive: Tensor, valid: Tensor | None = None) -> Tensor:
    """Average precision of every column of ``scores`` (n, M), as sklearn's ``average_precision_score``.

    Rows with ``valid`` False are left out of their column. Tied scores form one threshold, as in
    sklearn: each positive counts the precision at the end of its tie group. A column with no valid
    positive gives NaN.
    """
    if valid is not None:
        scores = scores.masked_fill(~valid, float("-inf"))  # sorted last; they carry no positive
        positive = positive & valid
    order = scores.argsort(dim=0, descending=True)
    s = scores.gather(0, order)
    pos = positive.gather(0, order).to(torch.float64)
    seen = torch.ones_like(pos) if valid is None else valid.gather(0, order).to(torch.float64)
    precision = pos.cumsum(0) / seen.cumsum(0).clamp(min=1)  # (n, M) at every cut-off
    n = s.shape[0]
    rows = torch.arange(n, device=s.device).unsqueeze(1).expand_as(s)
    group_end = torch.ones_like(s, dtype=torch.bool)
    group_end[:-1] = s[1:] != s[:-1]
    end = torch.where(group_end, rows, n - 1).flip(0).cummin(0).values.flip(0)  # (n, M) last row of tie group
    return (pos * precision.gather(0, end)).sum(0) / pos.sum(0)


def solve_squared_hinge(x: Tensor, y: Tensor, c: Tensor, *, w0: Tensor | None = None, tol: float = 1e-4,
                        max_newton: int = 100, max_cg: int = 500, forcing: float = 0.1,
                        hessian_dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Solve ``min_w 1/2 |w|^2 + sum_i c_i max(0, 1 - y_i <w, x_i>)^2`` for every column at once.

    Newton's method on the generalised Hessian ``I + 2 X^T diag(c * active) X``, each step by
    preconditioned conjugate gradients (matrix products with the shared ``x``; one eigendecomposition of
    ``X^T X`` for all columns) and an exact line search. The objective is
    1-strongly convex, so ``|w - w*| <= |grad|``: a column stops once ``|grad| <= tol * |w|``, which
    bounds its relative weight error by about ``tol``.

    Args:
        x: (N, P) shared rows (append the constant-1 column for a regularised intercept).
        y: (N, M) labels in {-1, 1}, one column per problem.
        c: (N, M) per-row costs >= 0; 0 leaves the row out of that problem.
        w0: (P, M) starting point (default 0).
        tol: relative accuracy of the weights.
        forcing: conjugate gradients stop at ``|r| <= min(forcing, sqrt(|grad| / |w|)) |grad|``
            (inexact Newton, superlinear near the solution).
        hessian_dtype: dtype of the Hessian-vector products inside conjugate gradients; None (default):
            ``x``'s dtype. float32 is ~20% faster on VOC07 on CPU and keeps the accuracy down to a
            relative 1e-6 or so (gradients, line search and the stopping test stay in ``x``'s dtype).

    Returns:
        ``(w, z, converged)``: weights (P, M), decision values ``x @ w`` (N, M) and (M,) bool.
    """
    m_all = y.shape[1]
    w_out = x.new_zeros(x.shape[1], m_all) if w0 is None else w0.clone()
    converged = torch.zeros(m_all, dtype=torch.bool, device=x.device)
    x_h = x if hessian_dtype in (None, x.dtype) else x.to(hessian_dtype)
    basis = _preconditioner(x_h)
    # Working set: the columns not converged yet (compacted when some converge).
    live, w = torch.arange(m_all, device=x.device), w_out.clone()
    yz = y * (x @ w) if w0 is not None else torch.zeros_like(y)  # (N, m) signed decision values
    cy = c * y
    for _ in range(max_newton):
        margin = 1 - yz  # (N, m)
        grad = torch.addmm(w, x.T, cy * margin.clamp(min=0), alpha=-2.0)  # (P, m)
        gnorm, wnorm = grad.norm(dim=0), w.norm(dim=0)
        done = gnorm <= tol * wnorm
        if bool(done.any()):
            w_out[:, live[done]], converged[live[done]] = w[:, done], True
            keep = ~done
            if not bool(keep.any()):
                break
            live, w, yz, y, c, cy = live[keep], w[:, keep], yz[:, keep], y[:, keep], c[:, keep], cy[:, keep]
            margin, grad, gnorm, wnorm = margin[:, keep], grad[:, keep], gnorm[keep], wnorm[keep]
        curv = (2 * c).where(margin > 0, 0.0).to(x_h.dtype)  # generalised Hessian weights, times 2
        eta = torch.where(wnorm > 0, (gnorm / wnorm).sqrt(), 1.0).clamp(max=forcing)
        step, xs = _conjugate_gradient(x_h, curv, grad.to(x_h.dtype), (eta * gnorm).to(x_h.dtype), max_cg,
                                       basis)
        step, v = step.to(x.dtype), y * xs.to(x.dtype)  # (P, m), (N, m)
        t = _line_search(w, step, margin, v, c)
        w.addcmul_(step, t)
        yz.addcmul_(v, t)
    else:
        w_out[:, live] = w
    return w_out, x @ w_out, converged


def _preconditioner(x: Tensor) -> tuple[Tensor, Tensor]:
    """``(lam, q)``: eigenvalues (k,) and eigenvectors (P, k) of ``X^T X``, shared by every column's
    preconditioner; none (k = 0: plain conjugate gradients) above ``PRECONDITION_MAX_FEATURES`` columns."""
    if x.shape[1] > PRECONDITION_MAX_FEATURES:
        return x.new_zeros(0), x.new_zeros(x.shape[1], 0)
    lam, q = torch.linalg.eigh(x.T @ x)
    return lam.clamp(min=0), q


def _conjugate_gradient(x: Tensor, curv2: Tensor, grad: Tensor, stop: Tensor, max_iter: int,
                        basis: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    """Solve ``(I + X^T diag(curv2_m) X) s_m = -grad_m`` for every column m, each to ``|r_m| <= stop_m``.

    Preconditioned by ``I + mean(curv2_m) X^T X`` (the Hessian with the column's curvature weights
    spread evenly over the rows) restricted to ``basis`` (:func:`_preconditioner`), identity elsewhere:
    two thin products a step instead of hundreds of steps at large C, whose Hessians are
    ill-conditioned along the features' main directions. Measured (2 CPU cores): on the demo's learned
    256-d features 496 -> 227 steps and 1.3-1.5x less time; on bench/voc07_svm.py's synthetic features
    equal at 256-512 d, 1.3-1.8x slower at 1,024-2,048 d (its plain solves need few steps, and the
    (P, P) products grow), hence plain conjugate gradients above ``PRECONDITION_MAX_FEATURES``. Runs in ``x``'s dtype (the caller may pass a float32 copy: only
    the Newton direction is approximate, the gradient that decides convergence is not). Finished columns
    leave the products. Returns ``(s, X s)``; ``X s`` is accumulated from the products, not recomputed.
    """
    lam, q = basis
    scaled = lam[:, None] * curv2.mean(dim=0)  # (k, m)
    shrink = scaled / (1.0 + scaled)  # M^-1 = I - q diag(shrink) q^T
    step, xstep = torch.zeros_like(grad), torch.zeros_like(curv2)
    cols = torch.arange(grad.shape[1], device=grad.device)  # columns still in the products
    r = -grad
    z = _precondition(r, q, shrink)
    p = z.clone()
    s, xs = torch.zeros_like(p), torch.zeros_like(curv2)  # partial sums of the columns in ``cols``
    rz = torch.linalg.vecdot(r, z, dim=0)
    stop2 = stop.square()
    going = torch.linalg.vecdot(r, r, dim=0) > stop2  # finished columns are frozen (alpha = 0) until dropped
    for _ in range(max_iter):
        if not bool(going.any()):
            break
        xp = x @ p  # (N, m')
        hp = torch.addmm(p, x.T, curv2 * xp)  # (P, m') Hessian-vector products
        alpha = torch.where(going, rz / torch.linalg.vecdot(p, hp, dim=0), 0.0)
        s.addcmul_(p, alpha)
        xs.addcmul_(xp, alpha)
        r.addcmul_(hp, alpha, value=-1.0)
        z = _precondition(r, q, shrink)
        rz_new = torch.linalg.vecdot(r, z, dim=0)
        p = torch.addcmul(z, p, torch.where(going, rz_new / rz, 0.0))
        rz = rz_new
        going &= torch.linalg.vecdot(r, r, dim=0) > stop2
        if int(going.sum()) <= 0.75 * len(cols):  # drop finished columns from the products
            done = ~going
            step[:, cols[done]], xstep[:, cols[done]] = s[:, done], xs[:, done]
            cols, p, r, rz, stop2, curv2, s, xs, going, shrink = (
                cols[going], p[:, going], r[:, going], rz[going], stop2[going], curv2[:, going], s[:, going],
                xs[:, going], going[going], shrink[:, going])
    step[:, cols], xstep[:, cols] = s, xs
    return step, xstep


def _precondition(r: Tensor, q: Tensor, shrink: Tensor) -> Tensor:
    """``M^-1 r`` with ``M^-1 = I - q diag(shrink) q^T`` per column; ``r`` itself when there is no basis."""
    return r - q @ (shrink * (q.T @ r)) if q.shape[1] else r


def _line_search(w: Tensor, step: Tensor, margin: Tensor, v: Tensor, c: Tensor, *, iters: int = 6,
                 rtol: float = 1e-2) -> Tensor:
    """Minimise ``f(w + t step)`` over t per column (convex, piecewise quadratic in t): safeguarded Newton
    from t = 1 (the Newton step), until ``|f'(t)| <= rtol |f'(0)|`` or ``iters`` steps.

    ``margin`` = 1 - y z and ``v`` = y (X step), so the loss is ``sum_i c_i max(0, margin_i - t v_i)^2``.
    """
    a1, a2 = (w * step).sum(0), (step * step).sum(0)
    cv = c * v
    cvv = cv * v
    slope0 = a1 - 2 * (margin.clamp(min=0) * cv).sum(0)  # f'(0) < 0: a descent direction
    t = torch.ones_like(a1)
    lo, hi = torch.zeros_like(a1), torch.full_like(a1, float("inf"))
    for _ in range(iters):
        h = torch.addcmul(margin, v, t, value=-1).clamp_(min=0)  # (N, m) hinge at t
        slope = a1 + t * a2 - 2 * torch.linalg.vecdot(h, cv, dim=0)
        if bool((slope.abs() <= rtol * slope0.abs()).all()):
            break
        curvature = a2 + 2 * cvv.where(h > 0, 0.0).sum(0)
        lo, hi = torch.where(slope < 0, t, lo), torch.where(slope < 0, hi, t)
        newton = t - slope / curvature
        fallback = torch.where(hi.isinf(), 2 * t, (lo + hi) / 2)
        t = torch.where((newton > lo) & (newton < hi), newton, fallback)
    return t


def stratified_folds(y: np.ndarray, folds: int) -> np.ndarray:
    """(N, K) fold index of every row per class: sklearn's unshuffled ``StratifiedKFold`` on column k."""
    fold = np.empty(y.shape, dtype=np.int64)
    for k in range(y.shape[1]):
        for f, (_, held_out) in enumerate(StratifiedKFold(n_splits=folds).split(np.zeros(len(y)), y[:, k])):
            fold[held_out, k] = f
    return fold


def protocol(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
             costs: Sequence[float], folds: int, *, device: str | torch.device = "cpu",
             dtype: torch.dtype = torch.float64, tol: float = 1e-4, memory: int = 2**30) -> list[dict]:
    """Choose C by CV, refit and score every class; classes go in chunks of about ``memory`` bytes.

    Labels are (N, K) in {1, 0, -1} (1 positive; -1 difficult: negative in training, out of test AP).
    Returns one dict per class: ``ap``, ``cost``, ``cv_ap`` {C: mean CV AP} (percent) and
    ``not_converged`` (problems that hit the iteration cap).
    """
    n, k = train_y.shape
    per_class = len(costs) * folds
    budget = memory // (max(n, len(test_x)) * _BYTES_PER_CELL)
    chunk = max(1, budget // per_class)
    out: list[dict] = []
    for start in range(0, k, chunk):
        cols = slice(start, min(k, start + chunk))
        out += _protocol_chunk(train_x, train_y[:, cols], test_x, test_y[:, cols], costs, folds,
                               device=torch.device(device), dtype=dtype, tol=tol)
    return out


def _with_bias(x: np.ndarray, device: torch.device, dtype: torch.dtype) -> Tensor:
    x = torch.as_tensor(np.asarray(x), device=device).to(dtype)
    return torch.cat([x, x.new_ones(len(x), 1)], dim=1)  # (N, D + 1): liblinear's bias feature


def _protocol_chunk(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
                    costs: Sequence[float], folds: int, *, device: torch.device, dtype: torch.dtype,
                    tol: float) -> list[dict]:
    k, nc = train_y.shape[1], len(costs)
    x = _with_bias(train_x, device, dtype)
    y_pm = torch.as_tensor(np.where(train_y == 1, 1.0, -1.0), device=device, dtype=dtype)  # (N, K)
    fold = torch.as_tensor(stratified_folds(np.where(train_y == 1, 1, -1), folds), device=device)  # (N, K)
    weight = torch.where(y_pm > 0, POSITIVE_WEIGHT, 1.0)
    cost = torch.as_tensor(list(costs), device=device, dtype=dtype)
    f_idx = torch.arange(folds, device=device)
    # Columns ordered (class, cost, fold): (N, K, C, F) -> (N, K*C*F).
    held_out = fold[:, :, None, None] == f_idx  # (N, K, 1, F)
    c = (weight[:, :, None, None] * cost[:, None] * ~held_out).flatten(1)
    y = y_pm[:, :, None, None].expand(-1, -1, nc, folds).flatten(1)
    w, z, conv = solve_squared_hinge(x, y, c, tol=tol)
    cv = average_precision(z, y > 0, held_out.expand(-1, -1, nc, -1).flatten(1)).view(k, nc, folds).mean(-1)
    best = cv.argmax(dim=1)  # (K,) first maximum: ties keep the earlier cost
    # Refit on all rows, from the mean of the chosen cost's fold solutions.
    w0 = w.view(-1, k, nc, folds)[:, torch.arange(k, device=device), best].mean(-1)  # (P, K)
    w_all, _, conv_all = solve_squared_hinge(x, y_pm, weight * cost[best], w0=w0, tol=tol)
    test_scores = _with_bias(test_x, device, dtype) @ w_all  # (N_test, K)
    ty = torch.as_tensor(test_y, device=device)
    ap = average_precision(test_scores, ty == 1, ty != -1)
    missed = (~conv).view(k, -1).sum(1) + (~conv_all)
    cv_l, ap_l, best_l, missed_l = cv.tolist(), ap.tolist(), best.tolist(), missed.tolist()
    return [{"ap": ap_l[j] * 100.0, "cost": float(costs[best_l[j]]),
             "cv_ap": {float(cst): cv_l[j][i] * 100.0 for i, cst in enumerate(costs)},
             "not_converged": int(missed_l[j])} for j in range(k)]
