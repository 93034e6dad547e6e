"""The Levenberg–Marquardt kernel of ``lm.py``, compiled with Numba, one curve at a time.

The PyTorch kernel runs ~35 passes over ``[K, N]`` tensors per iteration and ~130 small
operations at a few microseconds each: memory traffic bounds it for batches, per-operation
overhead for single fits. This kernel runs the same algorithm (same damping, geodesic
acceleration, acceptance and stopping rules, same constants) for one curve after another,
with the curve's points, Jacobian rows and registers in cache. It serves expression models
(their program is data it can interpret, see ``compiled_program``) with plain least squares,
in float64 on the CPU; everything else takes the PyTorch kernel. Both give each curve the
same answer to rounding (tests compare them curve by curve).

Two things differ from the PyTorch kernel, neither changing the arithmetic of a curve:
masked points are dropped before the fit instead of zeroed in every pass, and a step whose
damped system cannot be factorised is rejected without evaluating its (NaN) trial point.
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass

import numba
import numpy as np
import torch

from ..loop import Problem
from ..models import Model
from ..parameters import ParameterSpace
from . import lm
from .compiled_program import PER_CURVE, PER_POINT, SCALAR, Code, encode, run
from .lm import LMStatus

_JIT = {"cache": True, "nogil": True, "error_model": "numpy", "fastmath": {"reassoc", "contract"}}
_RUNNING, _FTOL, _XTOL, _GTOL, _MAX_ITER, _NON_FINITE, _SINGULAR = (
    int(LMStatus.RUNNING), int(LMStatus.FTOL), int(LMStatus.XTOL), int(LMStatus.GTOL),
    int(LMStatus.MAX_ITER), int(LMStatus.NON_FINITE), int(LMStatus.SINGULAR),
)  # fmt: skip
_LAMBDA0, _LAMBDA_MIN, _LAMBDA_MAX = lm._LAMBDA0, lm._LAMBDA_MIN, lm._LAMBDA_MAX
_ACCEPT, _SCALE_DECAY, _H = lm._ACCEPT, lm._SCALE_DECAY, lm._GEODESIC_H
_ALPHA, _NEAR_TRUST, _GOOD_GAIN = lm._GEODESIC_ALPHA, lm._NEAR_TRUST, lm._GOOD_GAIN
_NO_BOUND, _BOTH, _LOWER, _UPPER = range(4)
# GRADFIT_COMPILED=0 sends every fit to the PyTorch kernel (to compare, or to rule this out)
ENABLED = os.environ.get("GRADFIT_COMPILED", "1") != "0"


def _codes(model: Model) -> tuple[Code, Code] | None:
    """Value and value-with-derivatives programs of an expression model, as arrays."""
    programs = model.programs
    if programs is None or len(model.independent) != 1:
        return None
    (name,) = model.independent
    value, full = (encode(p, name, model.param_names) for p in programs)
    return None if value is None or full is None else (value, full)


def supports(problem: Problem, robust: object, theta: torch.Tensor) -> bool:
    """Whether this kernel can fit ``problem`` (else use ``lm.levenberg_marquardt``)."""
    return (
        ENABLED
        and robust is None
        and theta.dtype == torch.float64
        and theta.device.type == "cpu"
        and isinstance(problem.x, torch.Tensor)
        and problem.y.device.type == "cpu"
        and _codes(problem.model) is not None
    )


@dataclass
class CompiledFit:
    """Per-curve outcome of :func:`fit_curves` (NumPy arrays), with statistics at the solution."""

    theta: np.ndarray  # (K, F) as lm.LMResult
    cost: np.ndarray  # (K,)
    n_iter: np.ndarray  # (K,)
    status: np.ndarray  # (K,) LMStatus codes
    n_eval: int
    variance: np.ndarray  # (K, F) diagonal of (JᵀJ)⁻¹ in the model's parameters; NaN: singular
    chi2: np.ndarray  # (K,) Σ r² of the weighted residuals
    r2: np.ndarray  # (K,) 1 - SS_res / SS_tot (NaN for a constant curve)
    n_points: np.ndarray  # (K,) valid points
    rows: np.ndarray | None  # (K, F + 1, N) the kernel's rows at theta, if asked for
    history: np.ndarray | None  # (K, max_iter) cost after each iteration, if asked for


def fit_curves(
    problem: Problem,
    theta0: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    ftol: float = lm.DEFAULT_FTOL,
    xtol: float = lm.DEFAULT_XTOL,
    gtol: float = lm.DEFAULT_GTOL,
    max_iter: int = lm.DEFAULT_MAX_ITER,
    geodesic: bool = True,
    rows: bool = False,
    history: bool = False,
) -> CompiledFit:
    """``lm.levenberg_marquardt`` for ``problem``'s K curves (see :func:`supports`).

    ``mask`` (K, N) marks valid points. With ``history``, the cost after each iteration
    (NaN once a curve stopped).
    """
    codes = _codes(problem.model)
    assert codes is not None, "check supports() first"
    value, full = codes
    N = problem.y.shape[-1]
    y = _array(problem.y).reshape(-1, N)
    K = y.shape[0]
    x = _array(problem.x).reshape(-1, N)
    sigma = problem.loss.sigma
    sigma_a = _array(sigma).reshape(-1, N) if sigma is not None else np.ones((0, N))
    mask_a = mask.numpy().reshape(-1, N) if mask is not None else np.ones((0, N), dtype=bool)
    fixed, free, kind, lo, hi = _space_arrays(problem.space)
    tols = _tolerances(ftol, xtol, gtol)
    F = len(free)
    theta = np.array(theta0.detach().reshape(K, F).numpy(), dtype=np.float64)  # a copy
    cost, chi2, r2 = np.empty(K), np.empty(K), np.empty(K)
    n_iter, status, n_points = (np.empty(K, dtype=np.int64) for _ in range(3))
    variance = np.empty((K, F))
    rows_a = np.zeros((K if rows else 0, F + 1, N))
    costs = np.full((K, max_iter) if history else (0, 0), math.nan)
    n_eval = _fit_curves(
        value.op, value.a, value.b, value.c, value.rate, value.outputs,
        full.op, full.a, full.b, full.c, full.rate, full.outputs,
        x, y, sigma_a, mask_a, fixed, free, kind, lo, hi, tols, max_iter, geodesic,
        theta, cost, n_iter, status, variance, chi2, r2, n_points, rows_a, costs,
    )  # fmt: skip
    return CompiledFit(
        theta, cost, n_iter, status, n_eval, variance, chi2, r2, n_points,
        rows_a if rows else None, costs if history else None,
    )  # fmt: skip


def _space_arrays(space: ParameterSpace) -> tuple[np.ndarray, ...]:
    return _bound_arrays(space.fixed, space.lower, space.upper)


@functools.lru_cache(maxsize=64)
def _bound_arrays(
    fixed_values: tuple[float | None, ...],
    lower: tuple[float | None, ...],
    upper: tuple[float | None, ...],
) -> tuple[np.ndarray, ...]:
    """Fixed values (NaN: free), free indices, transform kinds and bounds, for the kernel."""
    fixed = np.array([math.nan if v is None else v for v in fixed_values], dtype=np.float64)
    free = np.array([i for i, v in enumerate(fixed_values) if v is None], dtype=np.int64)
    kind = np.array([_kind(lower[i], upper[i]) for i in free], dtype=np.int64)
    lo = np.array([lower[i] or 0.0 for i in free], dtype=np.float64)
    hi = np.array([upper[i] or 0.0 for i in free], dtype=np.float64)
    return fixed, free, kind, lo, hi


@functools.lru_cache(maxsize=64)
def _tolerances(ftol: float, xtol: float, gtol: float) -> np.ndarray:
    """As ``lm.levenberg_marquardt``: raised to eps; the actual reduction not below noise."""
    eps = float(np.finfo(np.float64).eps)
    noise = lm._COST_NOISE * eps
    return np.array([max(ftol, eps), max(ftol, noise), noise, max(xtol, eps), max(gtol, eps)])


def _array(t: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(t.detach().numpy(), dtype=np.float64)


def _kind(lower: float | None, upper: float | None) -> int:
    if lower is not None and upper is not None:
        return _BOTH
    if lower is not None:
        return _LOWER
    return _UPPER if upper is not None else _NO_BOUND


@numba.njit(**_JIT)
def _to_params(theta, fixed, free, kind, lo, hi, params, chain):
    """MINUIT's bound transforms (``ParameterSpace.to_params``) and their derivatives."""
    for i in range(fixed.shape[0]):
        params[i] = fixed[i]
    for j in range(free.shape[0]):
        t, k = theta[j], kind[j]
        if k == _NO_BOUND:
            params[free[j]], chain[j] = t, 1.0
        elif k == _BOTH:
            params[free[j]] = lo[j] + (hi[j] - lo[j]) * (math.sin(t) + 1) / 2
            chain[j] = (hi[j] - lo[j]) / 2 * math.cos(t)
        else:
            root = math.sqrt(t * t + 1)
            if k == _LOWER:
                params[free[j]], chain[j] = lo[j] - 1 + root, t / root
            else:
                params[free[j]], chain[j] = hi[j] + 1 - root, -t / root


@numba.njit(**_JIT)
def _cholesky(A, L):
    """Lower factor of the SPD ``A`` into ``L``; False where A is not positive definite."""
    F = A.shape[0]
    for i in range(F):
        for j in range(i + 1):
            s = A[i, j]
            for k in range(j):
                s -= L[i, k] * L[j, k]
            if i == j:
                if not s > 0:
                    return False
                L[i, i] = math.sqrt(s)
            else:
                L[i, j] = s / L[j, j]
    return True


@numba.njit(**_JIT)
def _cholesky_solve(L, b, out):
    F = L.shape[0]
    for i in range(F):
        s = b[i]
        for k in range(i):
            s -= L[i, k] * out[k]
        out[i] = s / L[i, i]
    for i in range(F - 1, -1, -1):
        s = out[i]
        for k in range(i + 1, F):
            s -= L[k, i] * out[k]
        out[i] = s / L[i, i]


@numba.njit(**_JIT)
def _gram(rows, n, hess, grad):
    """JᵀJ and Jᵀr from the rows [J; r] (F + 1, n); returns rᵀr poisoned by a bad JᵀJ."""
    F = hess.shape[0]
    diagonal = 0.0
    for a in range(F):
        for b in range(a, F):
            hess[a, b] = hess[b, a] = _dot(rows[a], rows[b], n)
        grad[a] = _dot(rows[a], rows[F], n)
        diagonal += hess[a, a]
    cost2 = _dot(rows[F], rows[F], n)
    return cost2 + 0.0 * diagonal  # NaN where the Jacobian is not finite


@numba.njit(**_JIT)
def _axpy(u, row, w, n):
    for i in range(n):
        u[i] += w * row[i]


@numba.njit(**_JIT)
def _dot(u, row, n):
    s = 0.0
    for i in range(n):
        s += u[i] * row[i]
    return s


@numba.njit(**_JIT)
def _gtol_hit(grad, hess, cost2, gtol):
    for j in range(grad.shape[0]):  # noqa: SIM110 - Numba compiles loops, not all(generator)
        if not grad[j] * grad[j] <= gtol * gtol * cost2 * hess[j, j]:
            return False
    return True


@numba.njit(**_JIT)
def _fit_curves(
    vop, va, vb, vc, vrate, vout, fop, fa, fb, fc, frate, fout,
    x, y, sigma, mask, fixed, free, kind, lo, hi, tols, max_iter, geodesic,
    theta_out, cost_out, n_iter_out, status_out, variance_out, chi2_out, r2_out, n_out,
    rows_out, costs,
):  # fmt: skip
    """Fit every curve k of y; writes the outputs at row k; returns the evaluations done."""
    K, N = y.shape
    F, P = free.shape[0], fixed.shape[0]
    tol_f, tol_fa, tol_noise, tol_x, tol_g = tols[0], tols[1], tols[2], tols[3], tols[4]
    # per-curve work arrays: a curve's valid points, registers, rows, small matrices
    xs, ys, ss, where = np.empty(N), np.empty(N), np.empty(N), np.empty(N, dtype=np.int64)
    vsc, vpts = np.empty(vop.shape[0]), np.empty((vop.shape[0], N))
    fsc, fpts = np.empty(fop.shape[0]), np.empty((fop.shape[0], N))
    rows, new_rows = np.empty((F + 1, N)), np.empty((F + 1, N))
    u = np.empty(N)
    params, chain = np.empty(P), np.empty(F)
    hess, grad, new_hess, new_grad = np.empty((F, F)), np.empty(F), np.empty((F, F)), np.empty(F)
    A, L = np.empty((F, F)), np.empty((F, F))
    vectors = np.empty((6, F))
    theta, trial, v, s, jtu, scale = vectors[0], vectors[1], vectors[2], vectors[3], vectors[4], \
        vectors[5]  # fmt: skip
    no_bounds = np.zeros(F, dtype=np.int64)
    bounded = False
    for j in range(F):
        bounded |= kind[j] != _NO_BOUND
    n_eval = 0
    for k in range(K):
        # the curve's valid points, in order
        xk = x[k if x.shape[0] > 1 else 0]
        n = 0
        for i in range(N):
            if mask.shape[0] == 0 or mask[k if mask.shape[0] > 1 else 0, i]:
                xs[n], ys[n], where[n] = xk[i], y[k, i], i
                ss[n] = sigma[k if sigma.shape[0] > 1 else 0, i] if sigma.shape[0] > 0 else 1.0
                n += 1
        has_sigma = sigma.shape[0] > 0
        for j in range(F):
            theta[j] = theta_out[k, j]
        _to_params(theta, fixed, free, kind, lo, hi, params, chain)
        run(vop, va, vb, vc, vrate, PER_CURVE, xs, n, params, vsc, vpts)
        run(fop, fa, fb, fc, frate, PER_CURVE, xs, n, params, fsc, fpts)

        # -- the starting point (lm._State.start)
        _rows(fop, fa, fb, fc, frate, fout, xs, ys, ss, has_sigma, n, theta,
              fixed, free, kind, lo, hi, params, chain, fsc, fpts, rows)  # fmt: skip
        n_eval += 1
        cost2 = _gram(rows, n, hess, grad)
        status = _GTOL if _gtol_hit(grad, hess, cost2, tol_g) else _RUNNING
        for j in range(F):
            if hess[j, j] == 0:
                status = _SINGULAR
        if not math.isfinite(cost2):
            status = _NON_FINITE
        lam, nu = _LAMBDA0, 2.0
        for j in range(F):
            scale[j] = hess[j, j]
        it = 0
        while status == _RUNNING and it < max_iter:
            # -- one iteration (lm._iterate)
            for a in range(F):
                for b in range(F):
                    A[a, b] = hess[a, b]
                A[a, a] += lam * scale[a]
            factored = _cholesky(A, L)
            accepted = False
            f_hit = x_hit = False
            rho = new_cost2 = math.nan
            if factored:
                _cholesky_solve(L, grad, v)
                dv2 = dx2 = gv = 0.0
                for j in range(F):
                    v[j] = -v[j]
                    dv2 += scale[j] * v[j] * v[j]
                    dx2 += scale[j] * theta[j] * theta[j]
                    gv += grad[j] * v[j]
                pred2 = lam * dv2 - gv
                noise = tol_noise * cost2
                tiny = pred2 <= noise
                trusted = True
                excess = 0.0
                if geodesic:  # lm._geodesic
                    for j in range(F):
                        trial[j] = theta[j] + _H * v[j]
                    _residuals(
                        vop, va, vb, vc, vrate, vout, xs, ys, ss, has_sigma, n,
                        trial, fixed, free, kind, lo, hi, params, chain, vsc, vpts, u,
                    )  # fmt: skip
                    n_eval += 1
                    # u = r(θ + hv) - r(θ) - hJv, then Jᵀu
                    _axpy(u, rows[F], -1.0, n)
                    for j in range(F):
                        _axpy(u, rows[j], -_H * v[j], n)
                    for j in range(F):
                        jtu[j] = _dot(u, rows[j], n)
                    _cholesky_solve(L, jtu, s)
                    ds2 = 0.0
                    for j in range(F):
                        ds2 += scale[j] * s[j] * s[j]
                    excess = ds2 / ((_ALPHA * _H * _H / 4) ** 2 * dv2)
                    trusted = excess <= 1
                for j in range(F):
                    trial[j] = theta[j] + (
                        v[j] - s[j] / (_H * _H) if geodesic and trusted else v[j]
                    )
                _rows(fop, fa, fb, fc, frate, fout, xs, ys, ss, has_sigma, n, trial,
                      fixed, free, kind, lo, hi, params, chain, fsc, fpts, new_rows)  # fmt: skip
                n_eval += 1
                new_cost2 = _gram(new_rows, n, new_hess, new_grad)
                actred2 = cost2 - new_cost2
                rho = actred2 / pred2
                ok = True
                if geodesic:
                    ok = trusted or tiny or (excess <= _NEAR_TRUST and rho > _GOOD_GAIN)
                accepted = ok and (rho > _ACCEPT or (tiny and abs(actred2) <= noise))
                f_hit = pred2 <= tol_f * cost2 and abs(actred2) <= tol_fa * cost2
                x_hit = dv2 <= tol_x * tol_x * dx2
            # Nielsen's damping update
            if accepted:
                shrink = 1 - (2 * rho - 1) ** 3
                shrink = 1 / 3 if shrink < 1 / 3 else (2.0 if shrink > 2 else shrink)
                lam *= shrink
                nu = 2.0
            else:
                lam *= nu
                nu *= 2
            if lam < _LAMBDA_MIN:
                lam = _LAMBDA_MIN
            if accepted:
                rows, new_rows = new_rows, rows
                hess, new_hess = new_hess, hess
                grad, new_grad = new_grad, grad
                cost2 = new_cost2
                for j in range(F):
                    theta[j] = trial[j]
                    grown = scale[j] * _SCALE_DECAY
                    scale[j] = grown if grown > hess[j, j] else hess[j, j]
            status = _GTOL if _gtol_hit(grad, hess, cost2, tol_g) else _RUNNING
            if x_hit:
                status = _XTOL
            if f_hit:
                status = _FTOL
            if not factored and lam > _LAMBDA_MAX:
                status = _SINGULAR
            if costs.shape[0] > 0:
                costs[k, it] = 0.5 * cost2
            it += 1
        # -- outcome
        for j in range(F):
            theta_out[k, j] = theta[j]
        cost_out[k] = 0.5 * cost2
        n_iter_out[k] = it
        status_out[k] = _MAX_ITER if status == _RUNNING else status
        if rows_out.shape[0] > 0:
            for j in range(F + 1):
                for i in range(n):
                    rows_out[k, j, where[i]] = rows[j, i]
        # -- statistics at the solution, in the model's own parameters
        if bounded:  # the rows above differentiate with respect to the transformed ones
            _to_params(theta, fixed, free, kind, lo, hi, params, chain)
            for j in range(F):
                trial[j] = params[free[j]]
            _rows(fop, fa, fb, fc, frate, fout, xs, ys, ss, has_sigma, n, trial,
                  fixed, free, no_bounds, lo, hi, params, chain, fsc, fpts, new_rows)  # fmt: skip
            _gram(new_rows, n, new_hess, new_grad)
            _statistics(new_rows, new_hess, ys, ss, has_sigma, n, L, A, k, variance_out,
                        chi2_out, r2_out)  # fmt: skip
        else:
            _statistics(rows, hess, ys, ss, has_sigma, n, L, A, k, variance_out, chi2_out,
                        r2_out)  # fmt: skip
        n_out[k] = n
    return n_eval


@numba.njit(**_JIT)
def _statistics(rows, hess, ys, ss, has_sigma, n, L, W, k, variance_out, chi2_out, r2_out):
    """χ², R² and the diagonal of (JᵀJ)⁻¹ (as ``batch._curve_statistics``) into row k."""
    F = hess.shape[0]
    r = rows[F]
    chi2 = _dot(r, r, n)
    if _cholesky(hess, L):
        # W = L⁻¹ (lower triangular); (JᵀJ)⁻¹ = WᵀW, whose diagonal is Σ_i W[i, j]²
        for j in range(F):
            W[j, j] = 1 / L[j, j]
            for i in range(j + 1, F):
                acc = 0.0
                for m in range(j, i):
                    acc += L[i, m] * W[m, j]
                W[i, j] = -acc / L[i, i]
        for j in range(F):
            acc = 0.0
            for i in range(j, F):
                acc += W[i, j] * W[i, j]
            variance_out[k, j] = acc if acc > 0 else math.nan
    else:
        for j in range(F):
            variance_out[k, j] = math.nan
    mean = 0.0
    for i in range(n):
        mean += ys[i]
    mean /= max(n, 1)
    ss_tot = ss_res = 0.0
    for i in range(n):
        ss_tot += (ys[i] - mean) ** 2
        ss_res += (r[i] * ss[i]) ** 2 if has_sigma else r[i] * r[i]  # (y - f)²
    chi2_out[k] = chi2
    r2_out[k] = 1 - ss_res / ss_tot if ss_tot > 0 else math.nan


@numba.njit(**_JIT)
def _rows(
    op, a, b, c, rate, outputs, xs, ys, ss, has_sigma, n, theta,
    fixed, free, kind, lo, hi, params, chain, scalars, points, rows,
):  # fmt: skip
    """Rows ∂r/∂θ_j (chain rule through the bound transforms), then r, all divided by sigma."""
    _to_params(theta, fixed, free, kind, lo, hi, params, chain)
    run(op, a, b, c, rate, PER_POINT, xs, n, params, scalars, points)
    F = free.shape[0]
    for j in range(F):
        slot, ch, row = outputs[1 + free[j]], chain[j], rows[j]
        if rate[slot] == SCALAR:
            _fill(row, scalars[slot] * ch, n)
        else:
            column = points[slot]
            for i in range(n):
                row[i] = column[i] * ch
        if has_sigma:
            _divide(row, ss, n)
    _residual_row(rate, outputs[0], scalars, points, ys, ss, has_sigma, n, rows[F])


@numba.njit(**_JIT)
def _fill(row, value, n):
    for i in range(n):
        row[i] = value


@numba.njit(**_JIT)
def _divide(row, ss, n):
    for i in range(n):
        row[i] /= ss[i]


@numba.njit(**_JIT)
def _residual_row(rate, slot, scalars, points, ys, ss, has_sigma, n, out):
    """(f - y) / sigma from the program's value root."""
    if rate[slot] == SCALAR:
        value = scalars[slot]
        for i in range(n):
            out[i] = value - ys[i]
    else:
        column = points[slot]
        for i in range(n):
            out[i] = column[i] - ys[i]
    if has_sigma:
        _divide(out, ss, n)


@numba.njit(**_JIT)
def _residuals(
    op, a, b, c, rate, outputs, xs, ys, ss, has_sigma, n, theta,
    fixed, free, kind, lo, hi, params, chain, scalars, points, out,
):  # fmt: skip
    _to_params(theta, fixed, free, kind, lo, hi, params, chain)
    run(op, a, b, c, rate, PER_POINT, xs, n, params, scalars, points)
    _residual_row(rate, outputs[0], scalars, points, ys, ss, has_sigma, n, out)
