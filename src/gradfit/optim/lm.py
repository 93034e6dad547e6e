"""Batched Levenberg–Marquardt: K independent least-squares problems in one PyTorch kernel.

Every curve k has its own damping, stopping test and status.  Curves never exchange
information (every reduction runs over the point or parameter axis), so a curve fitted in a
batch gets the same answer as when fitted alone.  The method follows MINPACK (Moré 1978):
Marquardt scaling by column norms, gain-ratio acceptance, and the ftol / xtol / gtol tests.
Three departures, each for robustness on hard problems (all 27 NIST StRD problems from both
starting points pass with the defaults):

* Nielsen's damping update instead of MINPACK's inner trust-region loop: one batched P×P
  Cholesky per iteration and a smooth, fast reaction to good and bad steps.
* Geodesic acceleration (Transtrum & Sethna 2012): a second-order correction from one extra
  residual evaluation; a step whose correction is large compared with the step itself is
  rejected (unless only a little too large and the gain ratio shows the model held), which
  keeps the fit out of regions the quadratic model does not describe (BoxBOD from its first
  start fails without it).
* A Marquardt scale with bounded memory: MINPACK's largest column norm seen so far, but at
  most 1e4 times the column's current norm (1e8 in D²).  MINPACK never forgets, so when a
  column shrinks by orders of magnitude (NIST MGH10 from its first start) the stale scale
  freezes that parameter and the fit crawls; forgetting faster (halving per step) makes
  MGH's Brown–Dennis crawl instead (6,000 iterations against 450).  The scale is that of the
  un-reweighted Jacobian, so a robust loss that weights every residual down (all outliers at
  a bad start) does not shrink it, and a zero column is scaled by 1, as in MINPACK: that
  parameter does not move on this step (Beale from (1, 1)).

"Converged" (ftol, xtol) is said only at a stationary point: heavy damping makes any step
small, so a small step or reduction counts only where the nearly undamped Gauss–Newton step
predicts no real reduction either (``_stationary``), or the fit is exact.

Relative cost changes below about 1000 ulps are treated as rounding noise of the cost: steps
predicted to gain less than that are judged by the model rather than by the noisy gain ratio,
so a converged curve stops within an iteration or two instead of fighting the noise.

Given ``subset``, the kernel drops stopped curves from its work as they stop: a batch costs
about its mean number of iterations instead of its maximum.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple, cast

import torch

Tensor = torch.Tensor
Residuals = Callable[[Tensor], Tensor]
Jacobian = Callable[[Tensor], tuple[Tensor, Tensor]]
Stacked = Callable[[Tensor], Tensor]  # theta -> (K, P + 1, N): Jacobian rows, then residuals
Robust = Callable[[Tensor], tuple[Tensor, Tensor, Tensor]]
# curve indices -> (residuals, stacked or None, mask or None) of those curves alone
Subset = Callable[[Tensor], tuple[Residuals, Stacked | None, Tensor | None]]

DEFAULT_FTOL = 1e-15
DEFAULT_XTOL = 3e-9
DEFAULT_GTOL = 1e-15
DEFAULT_MAX_ITER = 2000  # MGH10 from its first start needs about 830

# Initial damping, relative to the Marquardt scale D² ≈ diag(JᵀJ): nearly Gauss–Newton, as
# MINPACK starts when its step is within bounds (a linear model converges in one step).
_LAMBDA0 = 1e-6
_LAMBDA_MIN = 1e-16  # below this the damped system is as ill-conditioned as JᵀJ itself
_LAMBDA_MAX = 1e32  # an unsolvable system at this damping means a singular problem
_ACCEPT = 1e-4  # minimal gain ratio of an accepted step (MINPACK's value)
_SCALE_STALE = 1e8  # the Marquardt scale D² is at most this many times the column's |J_j|²
_GEODESIC_H = 0.1  # finite-difference step for the second directional derivative
# Max 2|acceleration| / |velocity|, else the step is rejected. Transtrum & Sethna suggest 0.75;
# 1.5 passes the same 54 NIST cases and needs 6.6 instead of 11.8 iterations on noisy Gaussians.
_GEODESIC_ALPHA = 1.5
# An untrusted step (then v alone) is still taken when the acceleration was at most this much
# too large (in (2|Da| / α|Dv|)²) and the gain ratio shows the quadratic model held: a noisy
# Gaussian from a rough start then takes 6 instead of 12 iterations; the NIST cases need the rest.
_NEAR_TRUST = 1.5
_GOOD_GAIN = 0.75
# After a rejected step the damping grows at least until the step shrinks to this share of
# its length (less when the acceleration was that much too large): Nielsen's doubling alone
# first climbs through dampings far below JᵀJ's scale, where the step does not change (a
# Gaussian from 15-20% off its truth spent 6 of its 14 iterations there).
_REJECT_SHRINK = 0.7
# Nielsen's largest cut of the damping after a good step (his 1/3)
_SHRINK_MIN = 0.2
# Coasting: after a good step (gain ratio above _GOOD_GAIN) that was small (|Dv| at most
# _COAST_STEP |Dθ|) and whose acceleration was tiny (excess (2|Da| / α|Dv|)² at most
# _GEODESIC_COAST), the next steps go without the acceleration, saving its residual evaluation,
# for as long as they stay good and small and each is at most _COAST_SHRINK times the last
# (in |Dv|²: Gauss–Newton converging fast): the acceleration shrinks with the step, so there it
# no longer changes it. Noisy Gaussians: ~11% faster, same iterations and answers; NIST StRD
# (54 fits): 1% fewer evaluations in all (Bennett5 from start1 takes 92 instead of 55).
# The step test keeps long curved valleys accelerated (MGH10 from its first start fails without).
_GEODESIC_COAST = 1e-3
_COAST_STEP = 3e-3
_COAST_SHRINK = 0.25
# Relative cost changes below this many machine epsilons (2.3e-13 in float64) count as rounding
# noise: a residual r = f(x) - y carries errors of order eps |y|, so a good fit's cost is only
# that accurate when |y| is much larger than |r|.
_COST_NOISE = 1024
# With ``subset``, the work shrinks to the running curves once at most this share of it runs
# (stopped curves would otherwise ride along: Gaussians stop after 3 to 16 iterations).
_COMPACT_BELOW = 0.75
# Up to this many parameters, J v is P fused elementwise passes rather than a batched product:
# measured here (K = 3500, N = 100), 4-6x faster for P <= 3; from P = 4 MKL's product is as
# fast or faster.
_ELEMENTWISE_MAX_P = 3


class LMStatus(enum.IntEnum):
    """Why a curve stopped (``RUNNING`` only while the batch is iterating)."""

    RUNNING = 0
    FTOL = 1
    XTOL = 2
    GTOL = 3
    MAX_ITER = 4
    NON_FINITE = 5
    SINGULAR = 6  # the damped system could not be solved even with the largest damping

    def describe(self) -> str:
        """A human-readable message for this status (default tolerances)."""
        return describe(self)


_MESSAGES = {
    LMStatus.RUNNING: "running",
    LMStatus.FTOL: "converged: relative reduction of the cost below ftol={ftol:g}",
    LMStatus.XTOL: "converged: relative step size below xtol={xtol:g}",
    LMStatus.GTOL: "converged: gradient orthogonal to the residuals within gtol={gtol:g}",
    LMStatus.MAX_ITER: "not converged: stopped after max_iter iterations or by the callback",
    LMStatus.NON_FINITE: "failed: non-finite residuals or Jacobian at the starting point",
    LMStatus.SINGULAR: "failed: the damped normal equations could not be solved",
}


def describe(
    code: int, *, ftol: float = DEFAULT_FTOL, xtol: float = DEFAULT_XTOL, gtol: float = DEFAULT_GTOL
) -> str:
    """A human-readable message for an :class:`LMStatus` code.

    >>> describe(1)
    'converged: relative reduction of the cost below ftol=1e-15'
    """
    return _MESSAGES[LMStatus(int(code))].format(ftol=ftol, xtol=xtol, gtol=gtol)


@dataclass
class LMResult:
    """Per-curve outcome of :func:`levenberg_marquardt`."""

    theta: Tensor  # (K, P) best point seen (to within the rounding noise of the cost)
    cost: Tensor  # (K,) 0.5 * sum(rho) at theta
    n_iter: Tensor  # (K,) int64 iterations used
    n_eval: Tensor | int  # residual evaluations (shared by the whole batch)
    status: Tensor  # (K,) int64 LMStatus codes
    rows: Tensor  # (K, P + 1, N) Jacobian rows of the un-robustified residuals at theta, then r

    @property
    def jacobian(self) -> Tensor:
        """(K, N, P) Jacobian of the un-robustified residuals at theta (a view)."""
        return self.rows[:, :-1].mT


def autodiff_jacobian(residuals: Residuals) -> Jacobian:
    """``theta -> (r, J)`` with forward-mode derivatives computed as reverse-over-reverse.

    Curves are independent, so column p of every curve's Jacobian is one Jacobian-vector
    product with tangent e_p for all K curves at once: P products, memory (P, K, N).  They are
    taken as derivatives of the vector-Jacobian product ``u -> Jᵀu`` (linear in u); on CPU this
    is several times faster than ``torch.func.jvp``, whose forward-mode rules for binary ops
    currently go through Python decompositions.
    """

    def jac(theta: Tensor) -> tuple[Tensor, Tensor]:
        K, P = theta.shape
        with torch.enable_grad():
            t = theta.detach().requires_grad_(True)
            r = residuals(t)  # (K, N)
            u = torch.zeros_like(r, requires_grad=True)
            (jtu,) = torch.autograd.grad(r, t, u, create_graph=True, materialize_grads=True)
            if not jtu.requires_grad:  # the residuals do not depend on theta at all
                return r.detach(), r.detach().new_zeros(*r.shape, P)
            eye = torch.eye(P, dtype=t.dtype, device=t.device).unsqueeze(1).expand(P, K, P)
            (cols,) = torch.autograd.grad(
                jtu, u, eye, is_grads_batched=True, materialize_grads=True
            )  # (P, K, N)
        return r.detach(), cols.permute(1, 2, 0)

    return jac


@dataclass
class _Point:
    """What the iteration needs at one theta per curve."""

    cost2: Tensor  # (K,) twice the cost, Σ rho (rᵀr without a loss): saves a product per use
    grad: Tensor  # (K, P) gradient of the cost
    hess: Tensor  # (K, P, P) Gauss–Newton matrix (rows reweighted with a robust loss)
    rows: Tensor  # (K, P + 1, N) masked Jacobian rows ∂r/∂θ_p, then the residuals r
    weight: Tensor | None  # (K, N) robust row weight rho' + 2 z rho''; None without a loss

    @property
    def column2(self) -> Tensor:  # (K, P) |J_j|² of the un-reweighted Jacobian
        if self.weight is None:
            return _diag(self.hess)
        jt = self.jac_rows
        return cast(Tensor, torch.linalg.vecdot(jt, jt))

    @property
    def res(self) -> Tensor:  # (K, N) un-robustified residuals
        return self.rows[:, -1]

    @property
    def jac_rows(self) -> Tensor:  # (K, P, N) the Jacobian, transposed
        return self.rows[:, :-1]


def stack_jacobian(jacobian: Jacobian) -> Stacked:
    """Turn ``theta -> (r, J)`` into ``theta -> rows`` (K, P + 1, N): Jᵀ with r below it."""

    def stacked(theta: Tensor) -> Tensor:
        r, J = jacobian(theta)
        return torch.cat([J.mT, r.unsqueeze(1)], dim=1)

    return stacked


class _Evaluator:
    """Calls the model, applies the mask and SciPy's robust-loss rescaling."""

    def __init__(
        self,
        residuals: Residuals,
        stacked: Stacked,
        mask: Tensor | None,
        robust: Robust | None,
        f_scale: float,
        reduce: Callable[[Tensor], Tensor] | None = None,
    ) -> None:
        self.residuals, self.stacked, self.mask = residuals, stacked, mask
        self.robust, self.f_scale = robust, f_scale
        self.reduce = reduce  # sums over the points held elsewhere (torch.distributed)
        self.n_eval = 0

    def summed(self, sums: Tensor) -> Tensor:
        """Sums over this process's points, summed over every process's (``reduce``)."""
        return sums if self.reduce is None else self.reduce(sums)

    def masked(self, r: Tensor) -> Tensor:
        # torch.where, not a product: masked rows may hold NaN, and NaN * 0 is NaN.
        return r if self.mask is None else torch.where(self.mask, r, 0.0)

    def value(self, theta: Tensor) -> Tensor:
        """Masked residuals (K, N) alone."""
        self.n_eval += 1
        return self.masked(self.residuals(theta))

    def point(self, theta: Tensor) -> _Point:
        self.n_eval += 1
        rows = self.stacked(theta)
        if self.mask is not None:
            rows = torch.where(self.mask.unsqueeze(1), rows, 0.0)
        if self.robust is not None:
            return self._robust_point(rows)
        # One product gives JᵀJ, Jᵀr and rᵀr: [J r]ᵀ[J r] (small-matrix bmm is fastest this way).
        m = self.summed(torch.bmm(rows, rows.mT))  # (K, P + 1, P + 1)
        hess, grad, cost2 = m[:, :-1, :-1], m[:, :-1, -1], m[:, -1, -1]
        return _Point(_poison(cost2, hess), grad, hess, rows, None)

    def _robust_point(self, rows: Tensor) -> _Point:
        """SciPy's ``scale_for_robust_loss_function``: rows weighted by rho' + 2 z rho''."""
        r, jt = rows[:, -1], rows[:, :-1]
        z = (r / self.f_scale) ** 2
        rho, d1, d2 = (self.masked(t) for t in self.robust(z))  # type: ignore[misc]
        weight = self.masked((d1 + 2 * d2 * z).clamp_min(torch.finfo(r.dtype).eps))  # (K, N)
        grad = torch.bmm((d1 * r).unsqueeze(1), jt.mT).squeeze(1)  # (K, P)
        hess = torch.bmm(jt * weight.unsqueeze(1), jt.mT)  # (K, P, P)
        return _Point(_poison(self.f_scale**2 * rho.sum(-1), hess), grad, hess, rows, weight)


def _rescale(scale: Tensor, column2: Tensor) -> Tensor:
    """MINPACK's non-decreasing Marquardt scale, but never above ``_SCALE_STALE`` times the
    column's current |J_j|²; a zero column keeps its scale."""
    grown = torch.minimum(torch.maximum(scale, column2), column2 * _SCALE_STALE)
    return torch.where(column2 > 0, grown, scale)


def _diag(m: Tensor) -> Tensor:
    return m.diagonal(dim1=-2, dim2=-1)


def _poison(cost2: Tensor, hess: Tensor) -> Tensor:
    """NaN cost where the Jacobian is not finite, so such points fail every later test."""
    return cost2 + 0.0 * _diag(hess).sum(-1)  # inf * 0 and NaN * 0 are NaN


def _gtol_hit(pt: _Point, gtol: float) -> Tensor:
    """MINPACK's max_j |g_j| / (|J_j| |r|) <= gtol, squared; zero columns and exact fits pass."""
    return (pt.grad * pt.grad <= (gtol**2 * pt.cost2).unsqueeze(-1) * pt.column2).all(-1)


def stationary_tolerances(eps: float) -> tuple[float, float]:
    """(damping, tolerance) of the stationarity test that every converged status needs.

    Both are sqrt(eps): rounding leaves a gradient of about eps·|J_j||r|·sqrt(N), whose
    predicted reduction under damping sqrt(eps) is far below sqrt(eps)·cost, while a point
    where only heavy damping made the step small (a stalled fit) predicts a large one.
    """
    return eps**0.5, eps**0.5


def _stationary(st: _State, tol: _Tols) -> tuple[Tensor, Tensor]:
    """(stationary, next step small): the nearly undamped step w = -(JᵀJ + δD²)⁻¹g predicts
    a relative reduction gᵀ(JᵀJ + δD²)⁻¹g below tolerance, or the fit is exact: the
    residuals are rounding noise, below eps times the start's, or (a start at the solution)
    below ``_COST_NOISE`` eps times |Dθ| ≈ |Σ_j θ_j J_j|, the size of the model's own values
    for most models. Second, whether the step not yet taken would end the fit: |Dw| <= xtol
    |Dθ| and a predicted reduction below the rounding noise of the cost (the tolerance above
    is loose: a fit that crawls under heavy damping, NIST MGH10's, may pass it).

    ftol and xtol judge the damped step, which heavy damping makes small anywhere; this test
    allows them to say "converged" only where the cost is stationary (MINPACK's idea of gtol,
    measured in the model's own metric, so ill-conditioned problems pass it too).
    """
    pt = st.pt
    eps = torch.finfo(pt.cost2.dtype).eps
    damping, tol_flat = stationary_tolerances(eps)
    L, info = torch.linalg.cholesky_ex(pt.hess + torch.diag_embed(damping * st.scale))
    w = torch.cholesky_solve(pt.grad.unsqueeze(-1), L).squeeze(-1)
    predicted = torch.linalg.vecdot(pt.grad, w)
    flat: Tensor = (info == 0) & (predicted <= max(tol.f, tol_flat) * pt.cost2)
    dx2: Tensor = torch.linalg.vecdot(st.scale * st.theta, st.theta)
    exact = (pt.cost2 <= eps * st.cost2_start) | (pt.cost2 <= (_COST_NOISE * eps) ** 2 * dx2)
    next_small = (
        (info == 0)
        & (torch.linalg.vecdot(st.scale * w, w) <= tol.x**2 * dx2)
        & (predicted <= tol.noise * pt.cost2)
    )
    return flat | exact, next_small


@dataclass
class _State:
    """Per-curve iteration state; every field has leading dimension K."""

    theta: Tensor  # (K, P)
    pt: _Point
    scale: Tensor  # (K, P) Marquardt scale D², forgetting max of diag(JᵀJ)
    lam: Tensor  # (K,) damping
    nu: Tensor  # (K,) Nielsen's growth factor for the damping
    cost2_start: Tensor  # (K,) twice the cost at the start
    status: Tensor  # (K,) int64
    n_iter: Tensor  # (K,) int64
    codes: dict[str, Tensor]  # 0-dim constants, so that torch.where allocates no scalars
    scratch: Tensor  # (K, N) work buffer
    coast: Tensor  # (K,) bool: the next step goes without the acceleration (_GEODESIC_COAST)
    last_dv2: Tensor  # (K,) the previous step's |Dv|² (inf before the first)

    @classmethod
    def start(cls, theta: Tensor, pt: _Point, gtol: float, lambda0: float) -> _State:
        dev = theta.device
        codes = {s.name: torch.tensor(int(s), device=dev) for s in LMStatus}
        codes["two"] = torch.tensor(2.0, dtype=theta.dtype, device=dev)
        codes["nan"] = torch.tensor(float("nan"), dtype=theta.dtype, device=dev)
        status = torch.where(_gtol_hit(pt, gtol), codes["GTOL"], codes["RUNNING"])
        status = torch.where(torch.isfinite(pt.cost2), status, codes["NON_FINITE"])
        # Own the big buffers: later iterations update them in place (no fresh allocations).
        pt.rows = pt.rows.clone()
        lam = torch.full_like(pt.cost2, lambda0)
        n_iter = torch.zeros(theta.shape[0], dtype=torch.int64, device=dev)
        # MINPACK scales a zero column by 1: that parameter does not move on this step
        column2 = pt.column2
        scale = torch.where(column2 == 0, 1.0, column2)
        nu = torch.full_like(lam, 2.0)
        start = pt.cost2.clone()
        coast = torch.zeros_like(status, dtype=torch.bool)
        last = torch.full_like(lam, float("inf"))
        return cls(
            theta.clone(), pt, scale, lam, nu, start, status, n_iter, codes, pt.res.clone(),
            coast, last,
        )  # fmt: skip

    def accept(self, ok: Tensor, trial: Tensor, new: _Point) -> None:
        """Move the curves with ``ok`` to ``trial``; the others keep everything."""
        o1, o2 = ok.unsqueeze(-1), ok.view(-1, 1, 1)
        pt = self.pt
        self.theta = torch.where(o1, trial, self.theta)
        pt.cost2 = torch.where(ok, new.cost2, pt.cost2)
        pt.grad = torch.where(o1, new.grad, pt.grad)
        pt.hess = torch.where(o2, new.hess, pt.hess)
        if bool(ok.all()):  # the common case: take the new buffer instead of copying it
            pt.rows = new.rows
        else:
            torch.where(o2, new.rows, pt.rows, out=pt.rows)
        if pt.weight is not None:
            pt.weight = torch.where(o1, new.weight, pt.weight)  # type: ignore[arg-type]
        self.scale = torch.where(o1, _rescale(self.scale, pt.column2), self.scale)

    def select(self, keep: Tensor) -> _State:
        """The state of the curves at indices ``keep`` alone."""
        pt = self.pt
        weight = None if pt.weight is None else pt.weight[keep]
        new = _Point(pt.cost2[keep], pt.grad[keep], pt.hess[keep], pt.rows[keep], weight)
        return _State(
            self.theta[keep], new, self.scale[keep], self.lam[keep], self.nu[keep],
            self.cost2_start[keep], self.status[keep], self.n_iter[keep], self.codes,
            self.scratch[keep], self.coast[keep], self.last_dv2[keep],
        )  # fmt: skip

    def store(self, into: LMResult, index: Tensor) -> None:
        """Write this state's outcome into the batch-wide ``into`` at rows ``index``."""
        out = self.result(0)
        for name in ("theta", "cost", "n_iter", "status", "rows"):
            getattr(into, name)[index] = getattr(out, name)

    def result(self, n_eval: int) -> LMResult:
        status = torch.where(self.status == LMStatus.RUNNING, LMStatus.MAX_ITER, self.status)
        return LMResult(self.theta, 0.5 * self.pt.cost2, self.n_iter, n_eval, status, self.pt.rows)


def _geodesic(
    ev: _Evaluator, st: _State, v: Tensor, dv2: Tensor, L: Tensor
) -> tuple[Tensor, Tensor]:
    """Transtrum–Sethna acceleration for velocity v; returns (step, excess).

    ``step`` is v + a/2 where the acceleration is trusted (``excess`` = (2|Da| / α|Dv|)² <= 1;
    NaN is not trusted), else v alone.

    With u = r(θ + hv) - r(θ) - hJv ≈ (h²/2) r''[v, v] from one extra residual evaluation,
    a = -(JᵀJ + λD²)⁻¹ Jᵀ r''[v, v] = -(2/h²) s with s = (JᵀJ + λD²)⁻¹ Jᵀu, reusing the Cholesky
    factor of the velocity solve.  A large |Da| / |Dv| means v reaches beyond where the
    quadratic model holds; such a step is not trusted, and the caller rejects it unless the
    acceleration was only a little too large and the model predicted the actual reduction well.
    """
    h, pt = _GEODESIC_H, st.pt
    # u is built in a scratch buffer of the state: no fresh (K, N) allocations per iteration.
    u = torch.sub(ev.value(st.theta + h * v), pt.res, out=st.scratch)
    jt = pt.jac_rows
    if jt.shape[1] <= _ELEMENTWISE_MAX_P:
        for p in range(jt.shape[1]):
            u.addcmul_(jt[:, p], v[:, p : p + 1], value=-h)
    else:
        u.unsqueeze(1).baddbmm_(v.unsqueeze(1), jt, alpha=-h)
    u = u.unsqueeze(1)  # (K, 1, N)
    if pt.weight is not None:
        u = pt.weight.unsqueeze(1) * u
    s = torch.cholesky_solve(ev.summed(torch.bmm(u, pt.jac_rows.mT)).mT, L).squeeze(-1)  # (K, P)
    # 2|Da| <= alpha |Dv|  <=>  |Ds|² <= (alpha h² / 4)² |Dv|²; NaN is not trusted.
    excess = torch.linalg.vecdot(st.scale * s, s) / ((_GEODESIC_ALPHA * h * h / 4) ** 2 * dv2)
    trusted = excess <= 1
    return torch.where(trusted.unsqueeze(-1), torch.add(v, s, alpha=-1 / h**2), v), excess


class _Tols(NamedTuple):
    f: float  # relative predicted reduction
    f_actual: float  # relative actual reduction: ftol, but not below the noise
    noise: float  # relative cost changes below this are rounding noise
    x: float
    g: float
    lambda0: float  # the starting damping


def _iterate(ev: _Evaluator, st: _State, tol: _Tols, geodesic: bool) -> None:
    """One LM iteration for every running curve; stopped curves are left untouched."""
    pt, c = st.pt, st.codes
    active = st.status == LMStatus.RUNNING  # (K,)
    L, info = torch.linalg.cholesky_ex(pt.hess + torch.diag_embed(st.lam.unsqueeze(-1) * st.scale))
    factored = info == 0
    ok = factored & active
    v = torch.cholesky_solve(pt.grad.unsqueeze(-1), L).squeeze(-1).neg_()  # (K, P)
    # A failed factorisation leaves garbage in v: make it NaN, which fails every test below.
    v = torch.where(factored.unsqueeze(-1), v, c["nan"])
    vx = torch.stack([v, st.theta])  # (2, K, P)
    dv2, dx2 = (st.scale * vx * vx).sum(-1)  # (K,) |Dv|², |Dθ|²
    # Twice the predicted reduction for v: vᵀJᵀJv + 2λ|Dv|² = λ|Dv|² - gᵀv (normal equations).
    pred2 = st.lam * dv2 - torch.linalg.vecdot(pt.grad, v)
    # Below the rounding noise of the cost, neither the gain ratio nor the finite-difference
    # acceleration means anything: such a step is judged by the model alone.
    noise = tol.noise * pt.cost2
    tiny = pred2 <= noise
    step, excess = _geodesic(ev, st, v, dv2, L) if geodesic else (v, None)
    if excess is not None:  # a step below the noise or coasting takes no correction (the
        plain = tiny | st.coast  # compiled kernel skips its evaluation, its excess is 0)
        step = torch.where(plain.unsqueeze(-1), v, step)
        excess = torch.where(st.coast, 0.0, excess)
    trial = st.theta + step
    new = ev.point(trial)
    actred2 = pt.cost2 - new.cost2
    rho = actred2 / pred2  # gain ratio; NaN or -inf for non-finite trials
    if excess is not None:
        ok &= (excess <= 1) | tiny | ((excess <= _NEAR_TRUST) & (rho > _GOOD_GAIN))
    accepted = ok & ((rho > _ACCEPT) | (tiny & (actred2.abs() <= noise)))
    if excess is not None:  # coast while the steps are good and the acceleration was tiny
        fresh = ~tiny & ~st.coast & (excess <= _GEODESIC_COAST)  # an accelerated step's
        near = dv2 <= _COAST_STEP**2 * dx2
        shrinking = st.coast & (dv2 <= _COAST_SHRINK * st.last_dv2)
        st.coast = accepted & (rho > _GOOD_GAIN) & near & (shrinking | fresh)
        st.last_dv2 = torch.where(active, dv2, st.last_dv2)
    # Nielsen: shrink the damping smoothly after a good step, grow it ever faster after bad ones.
    shrink = (1 - (2 * rho - 1) ** 3).clamp(_SHRINK_MIN, 2)  # 2 bounds the noise-judged steps
    grown = torch.fmax(st.lam * st.nu, _rejected_damping(st, v, dv2, L, excess))  # NaN: ignored
    st.lam = torch.where(accepted, st.lam * shrink, grown).clamp(min=_LAMBDA_MIN)
    st.nu = torch.where(accepted, c["two"], st.nu * 2)
    # MINPACK's tests on this step, relative to the cost before it; the bound on the actual
    # reduction is not below the rounding noise of the cost.
    f_hit = (pred2 <= tol.f * pt.cost2) & (actred2.abs() <= tol.f_actual * pt.cost2)
    x_hit = dv2 <= tol.x**2 * dx2
    st.accept(accepted, trial, new)
    code = torch.where(_gtol_hit(st.pt, tol.g), c["GTOL"], c["RUNNING"])
    code = torch.where(x_hit, c["XTOL"], code)
    code = torch.where(f_hit, c["FTOL"], code)
    small = (f_hit | x_hit) & active
    # after a step, also the xtol test on the next, nearly undamped step: a converged curve
    # stops without taking a last step of rounding size (a linear model after its first)
    ahead = accepted & (code == LMStatus.RUNNING)
    if bool((small | ahead).any()):  # "converged" only where stationary
        stationary, next_small = _stationary(st, tol)
        code = torch.where(small & ~stationary, c["RUNNING"], code)
        code = torch.where(ahead & stationary & next_small, c["XTOL"], code)
    code = torch.where(~factored & (st.lam > _LAMBDA_MAX), c["SINGULAR"], code)
    st.status = torch.where(active, code, st.status)
    st.n_iter += active


def _rejected_damping(
    st: _State, v: Tensor, dv2: Tensor, L: Tensor, excess: Tensor | None
) -> Tensor:
    """The damping at which a rejected step v shrinks to about ``_REJECT_SHRINK`` of its
    length, less where the acceleration was ``excess`` too large (its share of the step
    grows with the step): one Newton step on 1/|Dv(λ)| (Moré 1978), which never overshoots.

    With q = L⁻¹D²v, d|Dv|²/dλ = -2|q|²; NaN where v is (a failed factorisation).
    """
    target = torch.full_like(dv2, _REJECT_SHRINK)
    if excess is not None:
        # at most 1e3 times shorter: an infinite excess (|Dv| = 0) leaves the damping finite
        target = torch.where(
            excess > 1, excess.clamp(max=1e6).rsqrt().clamp(max=_REJECT_SHRINK), target
        )
    q = torch.linalg.solve_triangular(L, (st.scale * v).unsqueeze(-1), upper=False)
    q2 = q.squeeze(-1).square().sum(-1)
    damping: Tensor = st.lam + dv2 * (1 - target) / (target * q2)
    return damping


def levenberg_marquardt(
    residuals: Residuals,
    theta0: Tensor,
    *,
    jacobian: Jacobian | None = None,
    stacked: Stacked | None = None,
    mask: Tensor | None = None,
    robust: Robust | None = None,
    f_scale: float = 1.0,
    ftol: float = DEFAULT_FTOL,
    xtol: float = DEFAULT_XTOL,
    gtol: float = DEFAULT_GTOL,
    max_iter: int = DEFAULT_MAX_ITER,
    callback: Callable[[int, Tensor], bool | None] | None = None,
    geodesic: bool = True,
    subset: Subset | None = None,
    reduce: Callable[[Tensor], Tensor] | None = None,
    linear: bool = False,
) -> LMResult:
    """Minimise ``0.5 * sum(rho((r_k(theta_k) / f_scale)**2)) * f_scale**2`` for each curve k.

    Args:
        residuals: ``theta (K, P) -> r (K, N)``, already weighted by 1/sigma.
        theta0: starting points (K, P); their dtype and device are those of the computation.
        jacobian: ``theta -> (r, J (K, N, P))``; default: autograd (:func:`autodiff_jacobian`).
        stacked: ``theta -> (K, P + 1, N)``, the Jacobian's rows ∂r/∂θ_p followed by r: the
            kernel's own layout, which saves a copy per evaluation (overrides ``jacobian``).
            Each call must return a new tensor: the kernel keeps and updates it.
        mask: (K, N) bool, False drops a point (its residual and Jacobian rows may be NaN).
        robust: ``z -> (rho, rho', rho'')`` elementwise with ``z = (r / f_scale)**2`` (SciPy's
            convention); the fit is then iteratively reweighted like SciPy's ``least_squares``.
        f_scale: soft margin between inlier and outlier residuals for ``robust``.
        ftol: stop when the predicted and the actual relative reductions of the cost are both
            below ftol (the actual one below ``max(ftol, 1024 eps)``: rounding noise).
        xtol: stop when the scaled step is below ``xtol * |D theta|``.
        gtol: stop when every Jacobian column is within gtol of orthogonal to the residuals.
        max_iter: iterations per curve; each costs one Jacobian and, with ``geodesic``, one
            more residual evaluation.
        callback: ``callback(iteration, cost (K,))`` after every iteration; returning True
            stops the whole batch, and curves still running report ``MAX_ITER``.  With
            ``subset``, ``cost`` covers the curves still in the work.
        geodesic: use geodesic acceleration (more robust, one extra residual evaluation).
        linear: the residuals are linear in theta (``least_squares.linear_in_params``): the
            damping starts at its floor and there is no acceleration, so the first step
            solves the problem and the second confirms it.
        subset: ``indices -> (residuals, stacked or None, mask or None)`` of those curves
            alone; lets the kernel drop stopped curves from its work (curves stop after very
            different numbers of iterations). Each curve's arithmetic is unchanged.
        reduce: sums a tensor over the processes that hold the other points (an all-reduce,
            ``fitting/distributed.py``): applied to [J r]ᵀ[J r] and the geodesic Jᵀu, so every
            process takes the same steps. Plain least squares only (no ``robust``).

    Returns:
        An :class:`LMResult`; each curve's ``status`` is an :class:`LMStatus` code.  The
        tolerances are raised to the machine epsilon when smaller.

    Example:
        >>> x = torch.linspace(0, 4, 50, dtype=torch.float64)
        >>> y = torch.stack([2.0 * torch.exp(-1.5 * x), 3.0 * torch.exp(-0.5 * x)])  # K = 2
        >>> fit = levenberg_marquardt(
        ...     lambda t: t[:, :1] * torch.exp(-t[:, 1:] * x) - y,
        ...     torch.ones(2, 2, dtype=torch.float64),
        ... )
        >>> fit.theta.round(decimals=6).tolist()
        [[2.0, 1.5], [3.0, 0.5]]
        >>> [describe(s) for s in fit.status.tolist()]  # doctest: +ELLIPSIS
        ['converged: ...', 'converged: ...']
    """
    if theta0.ndim != 2 or not theta0.is_floating_point():
        raise ValueError(f"theta0 must be a floating (K, P) tensor, got {tuple(theta0.shape)}")
    eps = torch.finfo(theta0.dtype).eps
    noise = _COST_NOISE * eps
    # a linear model's Gauss–Newton step is its solution: start (nearly) undamped, no
    # acceleration (r'' = 0: its correction would be rounding noise, its evaluation wasted)
    lambda0 = _LAMBDA_MIN if linear else _LAMBDA0
    geodesic = geodesic and not linear
    tol = _Tols(max(ftol, eps), max(ftol, noise), noise, max(xtol, eps), max(gtol, eps), lambda0)
    # Symbolic rows need no autograd: inference mode skips its bookkeeping on every one of the
    # iteration's ~130 small operations (a single fit runs 20% faster).
    symbolic = stacked is not None
    if stacked is None:
        stacked = stack_jacobian(jacobian or autodiff_jacobian(residuals))
    if reduce is not None and robust is not None:
        raise ValueError("reduce takes plain least squares: a robust loss has no reduce yet")
    ev = _Evaluator(residuals, stacked, mask, robust, f_scale, reduce)
    with torch.inference_mode(symbolic):
        result = _solve(ev, theta0.detach(), tol, max_iter, callback, geodesic, subset)
    if not symbolic:
        return result
    # hand back ordinary tensors: inference tensors refuse later autograd and in-place use
    return LMResult(
        result.theta.clone(), result.cost.clone(), result.n_iter.clone(), result.n_eval,
        result.status.clone(), result.rows.clone(),
    )  # fmt: skip


def _solve(
    ev: _Evaluator,
    theta: Tensor,
    tol: _Tols,
    max_iter: int,
    callback: Callable[[int, Tensor], bool | None] | None,
    geodesic: bool,
    subset: Subset | None,
) -> LMResult:
    st = _State.start(theta, ev.point(theta), tol.g, tol.lambda0)
    batch: LMResult | None = None  # the whole batch's outcome, once the work has shrunk
    index = torch.arange(theta.shape[0], device=theta.device)  # st's curves in the batch
    for it in range(1, max_iter + 1):
        running = st.status == LMStatus.RUNNING
        n_running = int(running.sum())
        if n_running == 0:
            break
        if subset is not None and n_running <= _COMPACT_BELOW * len(running):
            if batch is None:
                batch = st.result(0)
            else:
                st.store(batch, index)
            keep = running.nonzero().squeeze(-1)
            index = index[keep]
            st, ev = st.select(keep), _restrict(ev, subset, index)
        _iterate(ev, st, tol, geodesic)
        if callback is not None and callback(it, 0.5 * st.pt.cost2):
            break
    if batch is None:
        return st.result(ev.n_eval)
    st.store(batch, index)
    batch.n_eval = ev.n_eval
    return batch


def _restrict(ev: _Evaluator, subset: Subset, index: Tensor) -> _Evaluator:
    """An evaluator for the curves at ``index`` alone."""
    residuals, stacked, mask = subset(index)
    stacked = stacked or stack_jacobian(autodiff_jacobian(residuals))
    restricted = _Evaluator(residuals, stacked, mask, ev.robust, ev.f_scale, ev.reduce)
    restricted.n_eval = ev.n_eval
    return restricted
