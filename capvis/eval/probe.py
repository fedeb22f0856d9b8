"""Linear probes on cached features: multinomial logistic regression over a sweep of weight decays,
solved together as one batched problem.

Every weight decay ``lam`` of the sweep is its own strongly convex problem,

    min_{W, b}  (1/N) sum_i CE(x_i W + b, y_i) + (lam / 2) ||W||^2       (the bias is not decayed),

which is scikit-learn's ``LogisticRegression(C=1 / (lam * N))`` (multinomial, L2). All problems
share the feature matrix, so their weights are stacked as ``(S, D+1, K)`` and every iteration costs
two large matrix products (logits and gradient, in row chunks to bound memory) for the whole sweep.
The solver is L-BFGS in compact form (a handful of batched products per iteration whatever the
history length), started from a preconditioner that undoes the features' correlations
(:class:`_Preconditioner`: 5.7x fewer seconds on the demo's four probe tasks), with per-problem Armijo
backtracking and per-problem convergence: a problem that converges leaves the working set and costs
nothing more. Classes without a training row are set to their optimum (never predicted) rather than
solved for. float64 on the CPU by default, any device
and dtype torch offers (CUDA: float32 by default).

:func:`probe_accuracy` is the evaluation protocol: standardise the features with train statistics,
fit the sweep on a seeded 80% of the training rows, pick the weight decay with the best top-1 on the
held-out 20% (ties go to the larger weight decay), refit on every training row, report test top-1 %.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from capvis.errors import ConfigError, DataError

WEIGHT_DECAYS: tuple[float, ...] = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)
_CHUNK_ELEMENTS = 1 << 24  # logits held at once (S * rows * K), ~128 MB in float64
# Below this many flops per iteration a CPU solve runs on one thread: the problem's ops are too small to
# gain from intra-op threads, whose synchronisation then costs more than it saves (30x more, measured,
# on a 2-core machine that other processes keep busy).
_SERIAL_FLOPS = 1e9


@contextmanager
def _cpu_threads(device: torch.device, flops: float) -> Iterator[None]:
    """One intra-op thread for small CPU problems (restored afterwards), else torch's setting."""
    before = torch.get_num_threads()
    serial = device.type == "cpu" and flops < _SERIAL_FLOPS and before > 1
    if serial:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if serial:
            torch.set_num_threads(before)


@dataclass
class ProbeFit:
    """Solutions of a sweep: ``weight`` (S, D, K), ``bias`` (S, K), one row per weight decay."""

    weight: Tensor
    bias: Tensor
    weight_decays: tuple[float, ...]
    iterations: Tensor  # (S,) iterations each problem ran
    converged: Tensor  # (S,) bool: gradient max-norm fell below tol

    def logits(self, x: Tensor) -> Tensor:
        """(S, N, K) logits of every problem on rows ``x`` (N, D)."""
        x = x.to(self.weight.device, self.weight.dtype)
        return torch.matmul(x, self.weight) + self.bias[:, None, :]


def _augment(x: Tensor) -> Tensor:
    return torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype, device=x.device)], dim=1)  # (N, D+1)


def _loss_grad(theta: Tensor, xa: Tensor, y: Tensor, lam: Tensor) -> tuple[Tensor, Tensor]:
    """Objective (S,) and gradient (S, D+1, K) of every problem at ``theta`` (S, D+1, K)."""
    s, d1, k = theta.shape
    n = len(xa)
    step = max(1, _CHUNK_ELEMENTS // max(1, s * k))
    loss = theta.new_zeros(s)
    g = theta.new_zeros(d1, s * k)
    columns = theta.transpose(0, 1).reshape(d1, s * k)  # every problem's weights side by side: one GEMM
    for lo in range(0, n, step):
        xc, yc = xa[lo:lo + step], y[lo:lo + step]
        z = (xc @ columns).view(len(xc), s, k)  # (n, S, K): the features are read once, not once a problem
        lse = torch.logsumexp(z, dim=2)  # (n, S)
        target = yc.view(-1, 1, 1).expand(-1, s, 1)
        loss += (lse - z.gather(2, target).squeeze(2)).sum(dim=0)
        p = torch.exp(z - lse[..., None])  # softmax (n, S, K); minus the one-hot target below
        p.scatter_add_(2, target, p.new_full((len(yc), s, 1), -1.0))
        g += xc.T @ p.view(len(xc), s * k)  # (D+1, S*K)
    g = g.view(d1, s, k).transpose(0, 1).contiguous()  # (S, D+1, K)
    w = theta[:, :-1]  # the bias row is not decayed
    loss = loss / n + 0.5 * lam * w.pow(2).sum(dim=(1, 2))
    g /= n
    g[:, :-1] += lam[:, None, None] * w
    return loss, g


def _dot(a: Tensor, b: Tensor) -> Tensor:
    """Per-problem inner products of (S, D+1, K) stacks -> (S,)."""
    return torch.linalg.vecdot(a.flatten(1), b.flatten(1))


class _Preconditioner:
    """L-BFGS's initial inverse Hessian, per problem ``(c * Sigma + lam * I)^-1`` with ``Sigma = X^T X / N``
    (bias column included) and ``c`` the softmax curvature of the start point (``1 / K``).

    Frozen features are strongly correlated (their covariance's eigenvalues span 3e-4 to 67 on the demo's
    256-d features), so the weakly regularised problems are badly conditioned and plain L-BFGS takes
    hundreds of iterations. This undoes the correlations before the first step; it changes the path,
    never the solution (each problem is strictly convex). One eigendecomposition, then two GEMMs a use.
    """

    def __init__(self, xa: Tensor, lam: Tensor, num_classes: int) -> None:
        e, self.v = torch.linalg.eigh(xa.T @ xa / len(xa))
        self.inv = 1.0 / (e.clamp_min(0.0)[None, :] / num_classes + lam[:, None])  # (S, D+1)

    def select(self, keep: Tensor) -> None:
        self.inv = self.inv[keep]

    def __call__(self, g: Tensor) -> Tensor:
        """M g for (S, D+1, K) stacks: every problem's columns side by side, so one GEMM each way."""
        s, d1, k = g.shape
        u = (self.v.T @ g.transpose(0, 1).reshape(d1, s * k)).view(d1, s, k) * self.inv.T[:, :, None]
        return (self.v @ u.view(d1, s * k)).view(d1, s, k).transpose(0, 1)


class _History:
    """L-BFGS curvature pairs of S problems for the compact form of the inverse Hessian (Byrd, Nocedal &
    Schnabel 1994) with a preconditioned start ``H0 = gamma * M``: ``-H g`` costs a handful of batched
    products whatever the history length.

    Pairs live in a ring of ``length`` slots (S, length, P), written in place, with ``M y`` beside each
    change ``y``; ``sy[:, i, j]`` holds ``s_i . y_j`` for the pairs present when slot j was written,
    ``yy`` the changes' Gram matrix in M (``y_i . M y_j``). In chronological order only the upper
    triangle of ``sy`` is used, which is exactly what stays valid. An empty slot, or a pair that failed
    the curvature condition for a problem, is zeros: inert.
    """

    def __init__(self, g: Tensor, length: int, precondition: _Preconditioner) -> None:
        s, p = g.shape[0], g[0].numel()
        self.shape, self.precondition = g.shape[1:], precondition
        self.steps, self.changes = g.new_zeros(s, length, p), g.new_zeros(s, length, p)
        self.scaled = g.new_zeros(s, length, p)  # M y of each change
        self.sy, self.yy = g.new_zeros(s, length, length), g.new_zeros(s, length, length)
        self.next = 0  # slot of the next pair; slots next, next+1, ... run oldest to newest
        self.gamma = 1.0 / precondition(g).abs().amax(dim=(1, 2)).clamp_min(1.0)  # first step: at most unit length

    def push(self, step: Tensor, change: Tensor) -> None:
        """Store the pair (S, P) x 2 over the oldest; zeroed for problems where s . y is not > 0."""
        scaled = self.precondition(change.view(-1, *self.shape)).flatten(1)
        sy, yy = torch.linalg.vecdot(step, change), torch.linalg.vecdot(change, scaled)
        useful = (sy > 1e-12 * yy.clamp_min(0.0).sqrt().clamp_min(1e-300)) & (yy > 0)
        self.gamma = torch.where(useful, sy / yy.clamp_min(1e-300), self.gamma)
        keep, k = useful.to(step.dtype)[:, None], self.next
        self.steps[:, k], self.changes[:, k], self.scaled[:, k] = step * keep, change * keep, scaled * keep
        self.sy[:, :, k] = (self.steps @ self.changes[:, k, :, None])[..., 0]
        self.yy[:, :, k] = self.yy[:, k, :] = (self.changes @ self.scaled[:, k, :, None])[..., 0]
        self.next = (k + 1) % self.steps.shape[1]

    def select(self, keep: Tensor) -> None:
        """Keep the problems where ``keep`` (S,) is true (the others left the working set)."""
        self.steps, self.changes, self.scaled, self.sy, self.yy, self.gamma = (
            v[keep] for v in (self.steps, self.changes, self.scaled, self.sy, self.yy, self.gamma))
        self.precondition.select(keep)

    def direction(self, g: Tensor) -> Tensor:
        """``-H g`` for every problem, (S, D+1, K)."""
        length = self.steps.shape[1]
        order = (self.next + torch.arange(length, device=g.device)) % length  # oldest first
        flat, gamma = g.flatten(1)[..., None], self.gamma[:, None, None]  # (S, P, 1), (S, 1, 1)
        a, b = (self.steps @ flat)[:, order], (self.scaled @ flat)[:, order]  # (S, m, 1): S^T g, (MY)^T g
        r = self.sy[:, order][:, :, order].triu()
        diag = r.diagonal(dim1=1, dim2=2)
        inert = torch.diag_embed((diag <= 0).to(g.dtype))  # unit diagonal for empty pairs: R stays invertible
        r = r + inert
        u = torch.linalg.solve_triangular(r, a, upper=True)  # R^-1 S^T g
        rhs = (torch.diag_embed(diag) + inert + gamma * self.yy[:, order][:, :, order]) @ u - gamma * b
        top = torch.linalg.solve_triangular(r.transpose(1, 2), rhs, upper=False)  # R^-T (...)
        slots_top, slots_u = torch.empty_like(top), torch.empty_like(u)
        slots_top[:, order], slots_u[:, order] = top, u
        back = slots_top.transpose(1, 2) @ self.steps - gamma * (slots_u.transpose(1, 2) @ self.scaled)  # (S, 1, P)
        return -(self.gamma[:, None, None] * self.precondition(g) + back.view_as(g))


def fit_softmax_probes(x: Tensor | np.ndarray, y: Tensor | np.ndarray, num_classes: int,
                       weight_decays: Sequence[float] = WEIGHT_DECAYS, *, max_iter: int = 500,
                       tol: float = 1e-4, history: int = 10, device: str | torch.device = "cpu",
                       dtype: torch.dtype | None = None, init: ProbeFit | None = None) -> ProbeFit:
    """Fit one multinomial logistic regression per weight decay, all at once (see module docstring).

    Args:
        x: (N, D) features; y: (N,) class indices in [0, num_classes).
        tol: a problem has converged when its gradient's max-norm is below ``tol``.
        dtype: default float64 on the CPU, float32 elsewhere.
        init: warm start (a fit with the same shapes and number of problems).
    """
    device = torch.device(device)
    dtype = dtype or (torch.float64 if device.type == "cpu" else torch.float32)
    lams = [float(v) for v in weight_decays]
    if not lams or min(lams) <= 0:
        raise DataError(f"weight decays must be positive, got {lams}")
    xa = _augment(torch.as_tensor(x).to(device, dtype))
    y = torch.as_tensor(y).to(device, torch.long)
    if xa.ndim != 2 or y.shape != (len(xa),) or not len(y):
        raise DataError(f"probe needs (N, D) features and N labels, got {tuple(xa.shape)} and {tuple(y.shape)}")
    if int(y.min()) < 0 or int(y.max()) >= num_classes:
        raise DataError(f"probe labels must lie in [0, {num_classes})")
    lam = torch.tensor(lams, device=device, dtype=dtype)
    s, d1 = len(lams), xa.shape[1]
    present = torch.unique(y)  # the problem is solved over these classes only (see _expand)
    theta = torch.zeros(s, d1, len(present), device=device, dtype=dtype)
    if init is not None:
        start = torch.cat([init.weight, init.bias[:, None]], dim=1).to(device, dtype)[:, :, present]
        theta = torch.where(start.isfinite(), start, 0.0)  # a class unseen before starts at zero
    with _cpu_threads(device, 4.0 * s * len(xa) * d1 * len(present)):
        fit = _lbfgs(theta, xa, torch.searchsorted(present, y), lam, tuple(lams), max_iter=max_iter, tol=tol,
                     history=history)
    return _expand(fit, present, num_classes)


def _expand(fit: ProbeFit, present: Tensor, num_classes: int) -> ProbeFit:
    """The fit over the classes present in the training rows, as one over all ``num_classes``.

    A class without a training row has no minimiser: its unregularised bias runs to -inf and its
    weights to zero, and a solver that keeps it spends most of its iterations on that tail (10x on
    the demo's 80-class task, of which 56 occur). Its optimum is written directly instead: weights 0,
    bias -inf, so it is never predicted (scikit-learn fits only the classes it sees, to the same effect).
    """
    if len(present) == num_classes:
        return fit
    s, d = fit.weight.shape[:2]
    weight = fit.weight.new_zeros(s, d, num_classes)
    bias = fit.bias.new_full((s, num_classes), float("-inf"))
    weight[:, :, present], bias[:, present] = fit.weight, fit.bias
    return ProbeFit(weight, bias, fit.weight_decays, fit.iterations, fit.converged)


def _lbfgs(theta: Tensor, xa: Tensor, y: Tensor, lam: Tensor, lams: tuple[float, ...], *, max_iter: int,
           tol: float, history: int) -> ProbeFit:
    """The batched L-BFGS loop of :func:`fit_softmax_probes` from the start point ``theta``.

    The working set holds the unconverged problems only: a problem that converges (or can no longer
    decrease its objective) is written out and dropped, so it costs nothing from then on.
    """
    out, grad_norm = theta.clone(), theta.new_zeros(len(theta))
    iterations = torch.zeros(len(theta), dtype=torch.long, device=theta.device)
    work = torch.arange(len(theta), device=theta.device)  # problem index of each working row
    f, g = _loss_grad(theta, xa, y, lam)
    hist = _History(g, history, _Preconditioner(xa, lam, theta.shape[2]))
    finished = g.abs().amax(dim=(1, 2)) <= tol
    for _ in range(max_iter + 1):
        if bool(finished.any()):  # retire: write out, shrink every working tensor
            out[work[finished]], grad_norm[work[finished]] = theta[finished], g[finished].abs().amax(dim=(1, 2))
            keep = ~finished
            theta, f, g, lam, work = theta[keep], f[keep], g[keep], lam[keep], work[keep]
            hist.select(keep)
        if not len(work) or _ == max_iter:
            break
        d = hist.direction(g)
        slope = _dot(g, d)
        d = torch.where((slope >= 0)[:, None, None], -g, d)  # not a descent direction: steepest descent
        slope = _dot(g, d)
        new_theta, new_f, new_g = theta.clone(), f.clone(), g.clone()
        pending = torch.arange(len(work), device=theta.device)
        t = torch.ones(len(work), dtype=theta.dtype, device=theta.device)
        for _ls in range(40):  # Armijo backtracking, each problem its own step length
            trial = theta[pending] + t[:, None, None] * d[pending]
            ft, gt = _loss_grad(trial, xa, y, lam[pending])
            ok = ft <= f[pending] + 1e-4 * t * slope[pending]
            done = pending[ok]
            new_theta[done], new_f[done], new_g[done] = trial[ok], ft[ok], gt[ok]
            pending, t = pending[~ok], 0.5 * t[~ok]
            if not len(pending):
                break
        hist.push((new_theta - theta).flatten(1), (new_g - g).flatten(1))  # zero where nothing moved
        theta, f, g = new_theta, new_f, new_g
        iterations[work] += 1
        finished = g.abs().amax(dim=(1, 2)) <= tol
        finished[pending] = True  # no step decreased f: at the limit of precision
    if len(work):  # hit max_iter
        out[work], grad_norm[work] = theta, g.abs().amax(dim=(1, 2))
    return ProbeFit(out[:, :-1].contiguous(), out[:, -1].contiguous(), lams, iterations, grad_norm <= tol)


@dataclass
class ProbeResult:
    """A probe's outcome; accuracies in percent."""

    top1: float
    top5: float
    weight_decay: float
    holdout_top1: dict[float, float] = field(default_factory=dict)
    train_rows: int = 0
    test_rows: int = 0
    classes: int = 0
    converged: bool = True

    def to_dict(self) -> dict:
        return {"top1": self.top1, "top5": self.top5, "weight_decay": self.weight_decay,
                "holdout_top1": {str(k): v for k, v in self.holdout_top1.items()}, "train_rows": self.train_rows,
                "test_rows": self.test_rows, "classes": self.classes, "converged": self.converged}


def _topk(logits: Tensor, y: Tensor, k: int) -> float:
    top = logits.topk(min(k, logits.shape[-1]), dim=-1).indices  # (..., N, k)
    return 100.0 * (top == y[..., None]).any(dim=-1).double().mean(dim=-1)


def holdout_split(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded (fit rows, held-out rows) of ``range(n)``; at least one row on each side."""
    order = np.random.default_rng(seed).permutation(n)
    n_hold = min(n - 1, max(1, int(round(fraction * n))))
    return np.sort(order[n_hold:]), np.sort(order[:n_hold])


def probe_accuracy(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
                   num_classes: int, *, weight_decays: Sequence[float] = WEIGHT_DECAYS, holdout: float = 0.2,
                   seed: int = 0, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                   max_iter: int = 500) -> ProbeResult:
    """The linear-probe protocol on frozen features (module docstring): top-1/top-5 % on the test rows."""
    train_x, test_x = np.asarray(train_x, np.float64), np.asarray(test_x, np.float64)
    train_y, test_y = np.asarray(train_y, np.int64), np.asarray(test_y, np.int64)
    if len(train_x) < 2 or not len(test_x):
        raise DataError(f"probe needs at least 2 training rows and 1 test row, got {len(train_x)} and {len(test_x)}")
    if train_x.shape[1:] != test_x.shape[1:]:
        raise DataError(f"train/test feature widths differ: {train_x.shape} vs {test_x.shape}")
    mean, std = train_x.mean(axis=0), train_x.std(axis=0)
    std = np.where(std > 1e-8 * max(1.0, float(std.max(initial=0.0))), std, 1.0)  # constant columns stay 0
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    fit_rows, hold_rows = holdout_split(len(train_x), holdout, seed)
    kwargs = dict(device=device, dtype=dtype, max_iter=max_iter)
    sweep = fit_softmax_probes(train_x[fit_rows], train_y[fit_rows], num_classes, weight_decays, **kwargs)
    hold_y = torch.as_tensor(train_y[hold_rows], device=sweep.weight.device)
    held = _topk(sweep.logits(torch.as_tensor(train_x[hold_rows])), hold_y, 1).cpu().tolist()  # (S,)
    best = max(range(len(held)), key=lambda i: (held[i], sweep.weight_decays[i]))  # ties: larger decay
    lam = sweep.weight_decays[best]
    warm = ProbeFit(sweep.weight[best:best + 1], sweep.bias[best:best + 1], (lam,), sweep.iterations[:1],
                    sweep.converged[:1])
    final = fit_softmax_probes(train_x, train_y, num_classes, (lam,), init=warm, **kwargs)
    logits = final.logits(torch.as_tensor(test_x))[0]
    y = torch.as_tensor(test_y, device=logits.device)
    return ProbeResult(top1=float(_topk(logits, y, 1)), top5=float(_topk(logits, y, 5)), weight_decay=lam,
                       holdout_top1=dict(zip(sweep.weight_decays, held)), train_rows=len(train_x),
                       test_rows=len(test_x), classes=num_classes, converged=bool(final.converged.all()))


def parse_weight_decays(text: str | None) -> tuple[float, ...]:
    """``"1e-4,1e-2"`` -> ``(1e-4, 1e-2)`` (``None``: :data:`WEIGHT_DECAYS`); ConfigError unless all are > 0."""
    if text is None:
        return WEIGHT_DECAYS
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ConfigError(f"--weight-decays {text!r} must be comma-separated numbers") from None
    if not values or not all(math.isfinite(v) and v > 0 for v in values):
        raise ConfigError(f"--weight-decays {text!r} must be positive numbers")
    return values


def check_holdout(fraction: float) -> float:
    """The held-out share of the training rows must lie in (0, 1)."""
    if not 0 < fraction < 1:
        raise ConfigError(f"--holdout must lie in (0, 1), got {fraction}")
    return fraction


def chance_top1(train_y: np.ndarray, test_y: np.ndarray) -> float:
    """Top-1 % of always answering the most frequent training class (what a useless probe gets)."""
    if not len(test_y):
        return math.nan
    majority = np.bincount(np.asarray(train_y)).argmax()
    return 100.0 * float(np.mean(np.asarray(test_y) == majority))
