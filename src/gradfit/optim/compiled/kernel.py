"""The compiled LM kernel itself: ``lm.py``'s iteration for one curve at a time, in Numba.

Argument groups travel as tuples: ``code`` and ``regs`` (a program's arrays and registers,
see ``interpreter``), ``space`` (fixed values, free indices, bound kinds, bounds) and
``curve`` (one curve's valid points ``xs, ys, sigma``, their count, whether sigma is given).
Step names and order follow ``lm.py``; so do the constants, which ``tols`` carries from it.
``fit_curves`` allocates the working arrays; everything it calls runs without Numba's
reference counting (``interpreter.NO_REFCOUNT``), which cost a third of a Gaussian fit's time
and half a straight line's.
"""

from __future__ import annotations

import math

import numba
import numpy as np

from gradfit.optim.compiled.interpreter import JIT, NO_REFCOUNT, PER_CURVE, PER_POINT, SCALAR, run
from gradfit.optim.lm import LMStatus

_RUNNING, _FTOL, _XTOL, _GTOL, _MAX_ITER, _NON_FINITE, _SINGULAR = (
    int(LMStatus.RUNNING), int(LMStatus.FTOL), int(LMStatus.XTOL), int(LMStatus.GTOL),
    int(LMStatus.MAX_ITER), int(LMStatus.NON_FINITE), int(LMStatus.SINGULAR),
)  # fmt: skip
# The ``tols`` array: the tolerances, then lm.py's constants (bridge._tolerances fills it;
# at run time, since Numba's cache would keep constants frozen at compile time)
SETTINGS = (
    "ftol", "ftol_actual", "noise", "xtol", "gtol", "lambda0", "lambda_min", "lambda_max",
    "accept", "scale_stale", "geodesic_h", "geodesic_alpha", "near_trust", "good_gain",
    "lambda_stationary", "stationary", "max_variance_inflation", "reject_shrink",
    "shrink_min", "geodesic_coast", "coast_step", "coast_shrink",
)  # fmt: skip
_EPS = float(np.finfo(np.float64).eps)
# bound transforms (``ParameterSpace.to_params``; ``_to_params`` restates them)
NO_BOUND, BOTH, LOWER, UPPER = range(4)
# loss codes: plain least squares, then ``_rho``'s restatements of ``losses.py``'s robust rho
PLAIN, HUBER, SOFT_L1, CAUCHY, ARCTAN = range(5)
#: the robust losses ``_rho`` computes, by their name in ``losses.LOSSES`` (tests compare
#: each with its torch rho)
ROBUST_LOSSES = {"huber": HUBER, "soft_l1": SOFT_L1, "cauchy": CAUCHY, "arctan": ARCTAN}
_PLAIN = (PLAIN, 1.0)


@numba.njit(**JIT)
def fit_curves(value_code, full_code, data, space, robust, tols, max_iter, geodesic, out,
               rows_out, costs):  # fmt: skip
    """Fit each curve k of ``data = (x, y, sigma, mask)`` and write row k of ``out = (theta
    (holding the starts), cost, n_iter, status, variance, chi2, r2, n_points)``; ``rows_out``
    (the weighted rows [J; r] at the solution, J in the model's own free parameters) and
    ``costs`` too when they have rows. Returns the number of evaluations."""
    N, F = data[1].shape[1], space[1].shape[0]
    # the working arrays, allocated here (the loop runs without reference counting)
    points = np.empty((4, N))  # xs, ys, sigma and the acceleration's u of the curve
    where = np.empty(N, dtype=np.int64)
    value_regs = (np.empty(value_code[0].shape[0]), np.empty((value_code[0].shape[0], N)))
    full_regs = (np.empty(full_code[0].shape[0]), np.empty((full_code[0].shape[0], N)))
    params, chain = np.empty(space[0].shape[0]), np.empty(F)
    vectors = np.empty((8, F))  # theta, grad, new_grad and the iteration's F-vectors
    matrices = np.empty((4, F, F))  # hess, new_hess, damped matrix, Cholesky factor
    # current and trial point: Jacobian rows [J; r], then (robust losses) the rows' weights
    # rho' + 2z rho'' and rho'·r; swapped together when a step is accepted
    rows_pair = np.empty((2, F + 3, N))
    no_kind = np.zeros(F, dtype=np.int64)
    return _fit_all(value_code, full_code, data, space, robust, tols, max_iter, geodesic, out,
                    rows_out, costs, (points, where, value_regs, full_regs, params, chain,
                                      vectors, matrices, rows_pair, no_kind))  # fmt: skip


@numba.njit(**NO_REFCOUNT)
def _fit_all(value_code, full_code, data, space, robust, tols, max_iter, geodesic, out,
             rows_out, costs, work):  # fmt: skip
    """``fit_curves``'s loop over curves, in the working arrays ``work``."""
    x, y, sigma, mask = data
    fixed, free, kind, lo, hi = space
    theta_out, cost_out, n_iter_out, status_out, variance_out, chi2_out, r2_out, n_out = out
    points, where, value_regs, full_regs, params, chain, vectors, matrices, rows_pair = work[:9]
    no_kind = work[9]
    K, N = y.shape
    F = free.shape[0]
    xs, ys, ss, u = points[0], points[1], points[2], points[3]
    theta = vectors[7]
    no_bounds = (fixed, free, no_kind, lo, hi)
    bounded = False
    for j in range(F):
        bounded |= kind[j] != NO_BOUND
    n_eval = 0
    whole = False  # xs hold every point of the one x all curves share
    for k in range(K):
        # every point valid and one x for all curves (the common case): the x-only steps
        # (PER_CURVE, e.g. x**2) are the same for every curve, computed once
        n, fresh_x = _gather(k, x, y, sigma, mask, xs, ys, ss, where, whole)
        whole = n == N
        curve = (xs, ys, ss, n, sigma.shape[0] > 0)
        for j in range(F):  # loops, not slice copies: those allocate
            # too few points (fit_batch marks the curve): a NaN start ends it at once
            theta[j] = theta_out[k, j] if n >= F and n > 0 else math.nan
        _to_params(theta, space, params, chain)
        if fresh_x:
            run(value_code, PER_CURVE, xs, n, params, value_regs)
            run(full_code, PER_CURVE, xs, n, params, full_regs)
        status, it, cost2, evals, rows, hess = _fit_one(
            value_code, full_code, value_regs, full_regs, curve, space, robust, tols,
            max_iter, geodesic, theta, params, chain, vectors, matrices, rows_pair, u, costs, k,
        )  # fmt: skip
        n_eval += evals
        for j in range(F):
            theta_out[k, j] = theta[j]
        cost_out[k], n_iter_out[k], n_out[k] = 0.5 * cost2, it, n
        status_out[k] = _MAX_ITER if status == _RUNNING else status
        if bounded:  # statistics need derivatives in the model's own parameters
            _to_params(theta, space, params, chain)
            plain = vectors[2]
            for j in range(F):
                plain[j] = params[free[j]]
            _point(full_code, full_regs, curve, plain, no_bounds, _PLAIN, params, chain, rows,
                   hess, vectors[1])  # fmt: skip
        elif robust[0] != 0:  # statistics use the plain JᵀJ, not the reweighted one
            _gram(rows, n, hess, vectors[1])
        _statistics(rows, hess, curve, matrices[3], matrices[2], k, variance_out, chi2_out,
                    r2_out, tols[16])  # fmt: skip
        if rows_out.shape[0] > 0:
            for j in range(F + 1):
                for i in range(n):
                    rows_out[k, j, where[i]] = rows[j, i]
    return n_eval


@numba.njit(**NO_REFCOUNT)
def batch_outputs(n_points, chi2, variance, cost, free, absolute_sigma, per_point, out):
    """fit_batch's per-curve columns from ``fit_curves``' outputs into ``out = (reduced χ²,
    stderr, loss)``, in one pass without the GIL: χ²ᵣ (NaN without degrees of freedom),
    stderr ``[K, P]`` (sqrt of the variance, scaled by χ²ᵣ unless ``absolute_sigma``; NaN for
    fixed parameters) and the loss (2·cost, per point if ``per_point``), as
    ``fit_batch._stderr`` and ``_lm_loss`` compute them."""
    reduced, stderr, loss = out
    K, F = variance.shape
    for k in range(K):
        n = n_points[k]
        reduced[k] = chi2[k] / (n - F) if n > F else math.nan
        scale = 1.0 if absolute_sigma else reduced[k]
        for j in range(stderr.shape[1]):
            stderr[k, j] = math.nan
        for j in range(F):
            stderr[k, free[j]] = math.sqrt(variance[k, j] * scale)
        loss[k] = 2 * cost[k] / (max(n, 1) if per_point else 1)


@numba.njit(inline="always", **NO_REFCOUNT)
def _fit_one(value_code, full_code, value_regs, full_regs, curve, space, robust, tols,
             max_iter, geodesic, theta, params, chain, vectors, matrices, rows_pair, u, costs,
             k):  # fmt: skip
    """LM from ``theta`` (updated in place) for one curve; returns (status, iterations,
    2·cost, evaluations, rows at theta, JᵀJ at theta)."""
    tol_f, tol_fa, tol_noise, tol_x, tol_g = tols[0], tols[1], tols[2], tols[3], tols[4]
    lambda0, lambda_min, lambda_max, accept, stale = tols[5], tols[6], tols[7], tols[8], tols[9]
    h, near_trust, good_gain = tols[10], tols[12], tols[13]
    grad, new_grad, trial, v, s, jtu, scale = (vectors[0], vectors[1], vectors[2], vectors[3],
                                               vectors[4], vectors[5], vectors[6])  # fmt: skip
    hess, new_hess, A, L = matrices[0], matrices[1], matrices[2], matrices[3]
    rows, new_rows = rows_pair[0], rows_pair[1]
    F = theta.shape[0]
    # -- the starting point (lm._State.start)
    cost2 = _point(full_code, full_regs, curve, theta, space, robust, params, chain, rows, hess,
                   grad)  # fmt: skip
    evals = 1
    n, cost2_start = curve[3], cost2
    status = _GTOL if _gtol_hit(grad, rows, hess, n, robust, cost2, tol_g) else _RUNNING
    for j in range(F):
        scale[j] = _column2(rows, hess, j, n, robust)
        if scale[j] == 0:  # MINPACK: a zero column is scaled by 1 (it does not move this step)
            scale[j] = 1.0
    if not math.isfinite(cost2):
        status = _NON_FINITE
    lam, nu = lambda0, 2.0
    coast = False  # lm._iterate's coasting: steps without the acceleration while it is tiny
    last_dv2 = math.inf  # the previous step's |Dv|²
    it = 0
    while status == _RUNNING and it < max_iter:  # -- lm._iterate
        factored, dv2, dx2, pred2 = _velocity(hess, grad, scale, lam, theta, A, L, v)
        accepted = f_hit = x_hit = False
        rho = new_cost2 = excess = math.nan
        if factored:  # a failed factorisation rejects the step without evaluating it
            noise = tol_noise * cost2
            tiny = pred2 <= noise
            excess = 0.0
            # below the rounding noise of the cost the finite-difference acceleration is
            # noise too: such a step is v alone, and its evaluation is saved
            accelerated = geodesic and not tiny and not coast
            if accelerated:
                excess = _acceleration(value_code, value_regs, curve, space, robust, theta, v,
                                       rows, L, scale, dv2, params, chain, trial, u, jtu, s,
                                       tols)  # fmt: skip
                evals += 1
            trusted = excess <= 1
            for j in range(F):
                trial[j] = theta[j] + (v[j] - s[j] / (h * h) if accelerated and trusted else v[j])
            new_cost2 = _point(full_code, full_regs, curve, trial, space, robust, params, chain,
                               new_rows, new_hess, new_grad)  # fmt: skip
            evals += 1
            actred2 = cost2 - new_cost2
            rho = actred2 / pred2  # gain ratio
            ok = not geodesic or trusted or tiny or (excess <= near_trust and rho > good_gain)
            accepted = ok and (rho > accept or (tiny and abs(actred2) <= noise))
            f_hit = pred2 <= tol_f * cost2 and abs(actred2) <= tol_fa * cost2
            x_hit = dv2 <= tol_x * tol_x * dx2
        coast = (accepted and rho > good_gain and dv2 <= tols[20] * tols[20] * dx2
                 and ((coast and dv2 <= tols[21] * last_dv2)
                      or (accelerated and excess <= tols[19])))  # fmt: skip
        last_dv2 = dv2
        # Nielsen's damping update
        if accepted:
            shrink = 1 - (2 * rho - 1) ** 3
            lam *= tols[18] if shrink < tols[18] else (2.0 if shrink > 2 else shrink)
            nu = 2.0
        else:
            grown = lam * nu
            if factored:
                jump = _rejected_damping(L, scale, v, dv2, lam, excess, tols[17], jtu)
                if jump > grown:  # NaN is not
                    grown = jump
            lam = grown
            nu *= 2
        if lam < lambda_min:
            lam = lambda_min
        if accepted:  # take the trial point's buffers (a swap, not a copy)
            rows, new_rows = new_rows, rows
            hess, new_hess = new_hess, hess
            grad, new_grad = new_grad, grad
            cost2 = new_cost2
            for j in range(F):
                theta[j] = trial[j]
                scale[j] = _rescale(scale[j], _column2(rows, hess, j, n, robust), stale)
        status = _GTOL if _gtol_hit(grad, rows, hess, n, robust, cost2, tol_g) else _RUNNING
        if x_hit:
            status = _XTOL
        if f_hit:
            status = _FTOL
        # a small step or reduction says "converged" only at a stationary point; after a
        # step, so does a next (nearly undamped) step below xtol
        small = x_hit or f_hit
        ahead = accepted and status == _RUNNING
        if small or ahead:
            flat, next_small = _stationary(hess, grad, scale, theta, cost2, tols, A, L, s)
            stationary = flat or _exact(theta, scale, cost2, cost2_start, tols)
            if small and not stationary:
                status = _RUNNING
            if ahead and stationary and next_small:
                status = _XTOL
        if not factored and lam > lambda_max:
            status = _SINGULAR
        if costs.shape[0] > 0:
            costs[k, it] = 0.5 * cost2
        it += 1
    return status, it, cost2, evals, rows, hess


@numba.njit(inline="always", **NO_REFCOUNT)
def _velocity(hess, grad, scale, lam, theta, A, L, v):
    """v = -(JᵀJ + λD²)⁻¹ Jᵀr; returns (factored, |Dv|², |Dθ|², twice the predicted
    reduction λ|Dv|² - gᵀv)."""
    F = theta.shape[0]
    for a in range(F):
        for b in range(F):
            A[a, b] = hess[a, b]
        A[a, a] += lam * scale[a]
    if not _cholesky(A, L):
        return False, math.nan, math.nan, math.nan
    _cholesky_solve(L, grad, v)
    dv2 = dx2 = gv = 0.0
    for j in range(F):
        v[j] = -v[j]
        dv2 += scale[j] * v[j] * v[j]
        dx2 += scale[j] * theta[j] * theta[j]
        gv += grad[j] * v[j]
    return True, dv2, dx2, lam * dv2 - gv


@numba.njit(**NO_REFCOUNT)
def _rejected_damping(L, scale, v, dv2, lam, excess, shrink, q):
    """lm._rejected_damping: one Newton step on 1/|Dv(λ)| towards |Dv| shrunk to ``shrink``
    (less by the root of an ``excess`` above 1); q = L⁻¹D²v is written into ``q``."""
    F = v.shape[0]
    target = min(shrink, 1 / math.sqrt(min(excess, 1e6))) if excess > 1 else shrink
    q2 = 0.0
    for i in range(F):
        acc = scale[i] * v[i]
        for k in range(i):
            acc -= L[i, k] * q[k]
        q[i] = acc / L[i, i]
        q2 += q[i] * q[i]
    return lam + dv2 * (1 - target) / (target * q2)


@numba.njit(inline="always", **NO_REFCOUNT)
def _acceleration(value_code, value_regs, curve, space, robust, theta, v, rows, L, scale, dv2,
                  params, chain, trial, u, jtu, s, tols):  # fmt: skip
    """Transtrum–Sethna (lm._geodesic): s = (JᵀJ + λD²)⁻¹ Jᵀu with u = r(θ + hv) - r(θ) - hJv;
    the acceleration is -2s/h². Returns the excess (2|Da| / α|Dv|)², trusted when <= 1."""
    F, n = theta.shape[0], curve[3]
    h, alpha = tols[10], tols[11]
    for j in range(F):
        trial[j] = theta[j] + h * v[j]
    _residuals(value_code, value_regs, curve, trial, space, params, chain, u)
    _axpy(u, rows[F], -1.0, n)
    for j in range(F):
        _axpy(u, rows[j], -h * v[j], n)
    if robust[0] != 0:  # reweighted rows, as the normal equations
        weight = rows[F + 1]
        for i in range(n):
            u[i] *= weight[i]
    for j in range(F):
        jtu[j] = _dot(u, rows[j], n)
    _cholesky_solve(L, jtu, s)
    ds2 = 0.0
    for j in range(F):
        ds2 += scale[j] * s[j] * s[j]
    return ds2 / ((alpha * h * h / 4) ** 2 * dv2)


@numba.njit(**NO_REFCOUNT)
def _gather(k, x, y, sigma, mask, xs, ys, ss, where, whole):
    """Curve k's valid points, in order, into xs, ys, ss (positions in ``where``); returns
    (their count, whether xs changed).

    A point is valid where ``mask`` says so (fit_batch folds non-finite values into it, and
    fills those points with finite ones); without a mask, where y is finite: fit_batch may
    leave that check to this pass, which reads y anyway, and whose copy without a branch per
    point is then also its check. ``whole``: xs still hold all of the one x that every curve
    shares (the previous curve had every point), which this curve's are too.
    """
    N = y.shape[1]
    if mask.shape[0] == 0:
        check = 0.0
        for i in range(N):
            ys[i] = y[k, i]
            check += ys[i] * 0.0  # NaN once a y is NaN or infinite
        if check == 0:
            if whole and x.shape[0] == 1 and sigma.shape[0] <= 1:
                return N, False
            xk = x[k if x.shape[0] > 1 else 0]
            for i in range(N):
                xs[i], where[i] = xk[i], i
            if sigma.shape[0] > 0:
                sk = sigma[k if sigma.shape[0] > 1 else 0]
                for i in range(N):
                    ss[i] = sk[i]
            else:
                for i in range(N):
                    ss[i] = 1.0
            return N, True
    xk = x[k if x.shape[0] > 1 else 0]
    n = 0
    for i in range(N):
        if (mask.shape[0] == 0 or mask[k if mask.shape[0] > 1 else 0, i]) and math.isfinite(
            y[k, i]
        ):
            xs[n], ys[n], where[n] = xk[i], y[k, i], i
            ss[n] = sigma[k if sigma.shape[0] > 1 else 0, i] if sigma.shape[0] > 0 else 1.0
            n += 1
    return n, True


@numba.njit(inline="always", **NO_REFCOUNT)
def _to_params(theta, space, params, chain):
    """MINUIT's bound transforms (``ParameterSpace.to_params``) and their derivatives."""
    fixed, free, kind, lo, hi = space
    for i in range(fixed.shape[0]):
        params[i] = fixed[i]
    for j in range(free.shape[0]):
        t, k = theta[j], kind[j]
        if k == NO_BOUND:
            params[free[j]], chain[j] = t, 1.0
        elif k == BOTH:
            params[free[j]] = lo[j] + (hi[j] - lo[j]) * (math.sin(t) + 1) / 2
            chain[j] = (hi[j] - lo[j]) / 2 * math.cos(t)
        else:
            root = math.sqrt(t * t + 1)
            if k == LOWER:
                params[free[j]], chain[j] = lo[j] - 1 + root, t / root
            else:
                params[free[j]], chain[j] = hi[j] + 1 - root, -t / root


@numba.njit(inline="always", **NO_REFCOUNT)
def _point(code, regs, curve, theta, space, robust, params, chain, rows, hess, grad):
    """Rows [J; r] at theta (∂r/∂θ_j through the bound transforms, all divided by sigma),
    then JᵀJ and Jᵀr (reweighted for a robust loss); returns twice the cost, NaN where the
    Jacobian is not finite."""
    xs, _, ss, n, has_sigma = curve
    free = space[1]
    _to_params(theta, space, params, chain)
    run(code, PER_POINT, xs, n, params, regs)
    outputs = code[5]
    F = free.shape[0]
    for j in range(F):
        _output_row(code, regs, outputs[1 + free[j]], chain[j], n, rows[j])
        if has_sigma:
            _divide(rows[j], ss, n)
    _residual_row(code, regs, curve, rows[F])
    if robust[0] == 0:
        return _gram(rows, n, hess, grad)
    return _robust_gram(rows, n, hess, grad, robust)


@numba.njit(inline="always", **NO_REFCOUNT)
def _residuals(code, regs, curve, theta, space, params, chain, out):
    _to_params(theta, space, params, chain)
    run(code, PER_POINT, curve[0], curve[3], params, regs)
    _residual_row(code, regs, curve, out)


@numba.njit(inline="always", **NO_REFCOUNT)
def _output_row(code, regs, slot, scale, n, out):
    """The program's output ``slot`` (a derivative) times ``scale`` at the n points; an
    output that does not depend on x is one number, broadcast."""
    scalars, points = regs
    if code[4][slot] == SCALAR:
        value = scalars[slot] * scale
        for i in range(n):
            out[i] = value
    else:
        column = points[slot]
        for i in range(n):
            out[i] = column[i] * scale


@numba.njit(inline="always", **NO_REFCOUNT)
def _residual_row(code, regs, curve, out):
    """(f - y) / sigma from the program's value root."""
    _, ys, ss, n, has_sigma = curve
    scalars, points = regs
    slot = code[5][0]
    if code[4][slot] == SCALAR:
        value = scalars[slot]
        for i in range(n):
            out[i] = value - ys[i]
    else:
        column = points[slot]
        for i in range(n):
            out[i] = column[i] - ys[i]
    if has_sigma:
        _divide(out, ss, n)


@numba.njit(**NO_REFCOUNT)
def _gram(rows, n, hess, grad):
    """JᵀJ and Jᵀr from the rows [J; r]; returns rᵀr, NaN where JᵀJ is not finite."""
    F = hess.shape[0]
    diagonal = 0.0
    for a in range(F):
        for b in range(a, F):
            hess[a, b] = hess[b, a] = _dot(rows[a], rows[b], n)
        grad[a] = _dot(rows[a], rows[F], n)
        diagonal += hess[a, a]
    return _dot(rows[F], rows[F], n) + 0.0 * diagonal  # inf * 0 and NaN * 0 are NaN


@numba.njit(**NO_REFCOUNT)
def _robust_gram(rows, n, hess, grad, robust):
    """SciPy's scaling for robust losses (lm._Evaluator._robust_point): with z = (r/f)², the
    gradient Σ rho'·r·J and the matrix Σ (rho' + 2z rho'')·J Jᵀ; returns f² Σ rho."""
    F = hess.shape[0]
    loss, f = robust
    r, weight, d1r = rows[F], rows[F + 1], rows[F + 2]
    total = 0.0
    for i in range(n):
        z = (r[i] / f) ** 2
        rho, d1, d2 = _rho(loss, z)
        w = d1 + 2 * d2 * z
        weight[i] = _EPS if w < _EPS else w  # NaN stays NaN, as torch's clamp
        d1r[i] = d1 * r[i]
        total += rho
    diagonal = 0.0
    for a in range(F):
        for b in range(a, F):
            acc = 0.0
            for i in range(n):
                acc += weight[i] * rows[a, i] * rows[b, i]
            hess[a, b] = hess[b, a] = acc
        grad[a] = _dot(d1r, rows[a], n)
        diagonal += hess[a, a]
    return f * f * total + 0.0 * diagonal


@numba.njit(**NO_REFCOUNT)
def _rho(loss, z):
    """(rho, rho', rho'') of ``losses.py``'s robust losses at z (SciPy's convention)."""
    if loss == HUBER:
        if z <= 1:
            return z, 1.0, 0.0
        root = math.sqrt(z)
        return 2 * root - 1, 1 / root, -0.5 / (root * z)
    if loss == SOFT_L1:
        t = 1 + z
        root = math.sqrt(t)
        return 2 * (root - 1), 1 / root, -0.5 / (t * root)
    if loss == CAUCHY:
        t = 1 + z
        return math.log1p(z), 1 / t, -1 / t**2
    if loss == ARCTAN:
        t = 1 + z**2
        return math.atan(z), 1 / t, -2 * z / t**2
    return math.nan, math.nan, math.nan  # pragma: no cover - bridge passes no other code


@numba.njit(**NO_REFCOUNT)
def _rescale(scale, column2, stale):
    """lm._rescale: MINPACK's non-decreasing scale, at most ``stale`` times the column's."""
    if not column2 > 0:
        return scale
    return min(max(scale, column2), column2 * stale)


@numba.njit(**NO_REFCOUNT)
def _column2(rows, hess, j, n, robust):
    """|J_j|², the squared norm of column j of the un-reweighted Jacobian."""
    return hess[j, j] if robust[0] == 0 else _dot(rows[j], rows[j], n)


@numba.njit(**NO_REFCOUNT)
def _gtol_hit(grad, rows, hess, n, robust, cost2, gtol):
    """MINPACK's max_j |g_j| / (|J_j| |r|) <= gtol, squared; zero columns and exact fits pass."""
    for j in range(grad.shape[0]):  # Numba compiles loops, not all(generator)
        if not grad[j] * grad[j] <= gtol * gtol * cost2 * _column2(rows, hess, j, n, robust):
            return False
    return True


@numba.njit(**NO_REFCOUNT)
def _exact(theta, scale, cost2, cost2_start, tols):
    """lm._stationary's exact-fit case: the residuals are rounding noise."""
    dx2 = 0.0
    for j in range(theta.shape[0]):
        dx2 += scale[j] * theta[j] * theta[j]
    noise = tols[2]  # _COST_NOISE eps
    return cost2 <= _EPS * cost2_start or cost2 <= noise * noise * dx2


@numba.njit(**NO_REFCOUNT)
def _stationary(hess, grad, scale, theta, cost2, tols, A, L, w):
    """lm._stationary, less its exact-fit case (``_exact``): whether the nearly undamped step
    w predicts a relative reduction below tolerance, and whether that step would end the fit
    (|Dw| <= xtol |Dθ|, a predicted reduction below the noise)."""
    F = grad.shape[0]
    for a in range(F):
        for b in range(F):
            A[a, b] = hess[a, b]
        A[a, a] += tols[14] * scale[a]
    if not _cholesky(A, L):
        return False, False
    _cholesky_solve(L, grad, w)
    dw2 = dx2 = 0.0
    for j in range(F):
        dw2 += scale[j] * w[j] * w[j]
        dx2 += scale[j] * theta[j] * theta[j]
    predicted = _dot(grad, w, F)
    flat = predicted <= max(tols[0], tols[15]) * cost2
    return flat, dw2 <= tols[3] * tols[3] * dx2 and predicted <= tols[2] * cost2


@numba.njit(**NO_REFCOUNT)
def _statistics(rows, hess, curve, L, W, k, variance_out, chi2_out, r2_out, max_inflation):
    """χ², R² and the diagonal of (JᵀJ)⁻¹ (as ``batch._curve_statistics``) into row k; NaN
    where it inflates the parameter beyond ``max_inflation`` (``stats.estimable_variance``)."""
    _, ys, ss, n, has_sigma = curve
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
            estimable = acc > 0 and acc * hess[j, j] <= max_inflation
            variance_out[k, j] = acc if estimable else math.nan
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


# -- small dense linear algebra and vector loops (vectorised by LLVM)


@numba.njit(**NO_REFCOUNT)
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


@numba.njit(**NO_REFCOUNT)
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


@numba.njit(**NO_REFCOUNT)
def _dot(u, w, n):
    s = 0.0
    for i in range(n):
        s += u[i] * w[i]
    return s


@numba.njit(**NO_REFCOUNT)
def _axpy(u, row, w, n):
    for i in range(n):
        u[i] += w * row[i]


@numba.njit(**NO_REFCOUNT)
def _divide(row, ss, n):
    for i in range(n):
        row[i] /= ss[i]
