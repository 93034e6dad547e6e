"""Batched Levenberg–Marquardt: K independent least-squares problems in one PyTorch kernel.

Every curve k carries its own damping, stopping test and status; curves never exchange
information (all reductions are over the point and parameter axes), so a curve fitted in a
batch gives the same answer as the same curve fitted alone.  The method is MINPACK's
(Moré 1978): Marquardt scaling by the largest column norms seen so far, gain-ratio step
acceptance, and the ftol / xtol / gtol tests, with Nielsen's smooth damping update instead
of MINPACK's inner trust-region loop (one P×P Cholesky per iteration, batched), plus
Transtrum–Sethna geodesic acceleration, which keeps long curved valleys cheap.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass

import torch

Tensor = torch.Tensor
Residuals = Callable[[Tensor], Tensor]
Jacobian = Callable[[Tensor], tuple[Tensor, Tensor]]
Robust = Callable[[Tensor], tuple[Tensor, Tensor, Tensor]]

DEFAULT_FTOL = 1e-15
DEFAULT_XTOL = 1e-15
DEFAULT_GTOL = 1e-15
DEFAULT_MAX_ITER = 1000

_LAMBDA0 = 1e-3  # initial damping, relative to the Marquardt scale diag(JᵀJ)
_ACCEPT = 1e-4  # minimal gain ratio to accept a step (MINPACK's value)
_LAMBDA_MAX = 1e32  # damping beyond this without a solvable system means "singular"
_GEODESIC_H = 0.1  # finite-difference step for the second directional derivative
_GEODESIC_ALPHA = 0.75  # max ratio |acceleration| / |velocity| (Transtrum & Sethna)
_GEODESIC_REJECT = True  # reject (and damp more) when the acceleration is too large


class LMStatus(enum.IntEnum):
    """Why a curve stopped (``RUNNING`` only while the batch is iterating)."""

    RUNNING = 0
    FTOL = 1
    XTOL = 2
    GTOL = 3
    MAX_ITER = 4
    NON_FINITE = 5
    SINGULAR = 6

    def describe(self) -> str:
        """A human-readable message for this status."""
        return describe(self)


_MESSAGES = {
    LMStatus.RUNNING: "running",
    LMStatus.FTOL: "converged: relative reduction of the cost below ftol={ftol:g}",
    LMStatus.XTOL: "converged: relative step size below xtol={xtol:g}",
    LMStatus.GTOL: "converged: gradient orthogonal to the residuals within gtol={gtol:g}",
    LMStatus.MAX_ITER: "not converged: stopped after max_iter iterations or by the callback",
    LMStatus.NON_FINITE: "failed: non-finite residuals or Jacobian at the starting point",
    LMStatus.SINGULAR: "failed: singular Jacobian (a parameter does not affect the residuals)",
}


def describe(
    code: int, *, ftol: float = DEFAULT_FTOL, xtol: float = DEFAULT_XTOL, gtol: float = DEFAULT_GTOL
) -> str:
    """A human-readable message for an :class:`LMStatus` code."""
    return _MESSAGES[LMStatus(int(code))].format(ftol=ftol, xtol=xtol, gtol=gtol)


@dataclass
class LMResult:
    """Per-curve outcome of :func:`levenberg_marquardt`."""

    theta: Tensor  # (K, P) best point seen
    cost: Tensor  # (K,) 0.5 * sum(rho) at theta
    n_iter: Tensor  # (K,) int64 iterations used
    n_eval: Tensor | int  # residual evaluations (shared by the batch)
    status: Tensor  # (K,) int64 LMStatus codes
    jacobian: Tensor  # (K, N, P) Jacobian of the un-robustified residuals at theta


def autodiff_jacobian(residuals: Residuals) -> Jacobian:
    """``theta -> (r, J)`` by forward-mode derivatives taken as reverse-over-reverse autograd.

    Curves are independent, so column p of every curve's Jacobian is one Jacobian-vector
    product with tangent ``e_p`` for all K at once: P products, batched, memory (P, K, N).
    They are computed as derivatives of the vector-Jacobian product ``u -> Jᵀu`` (linear in u),
    which on CPU is several times cheaper than ``torch.func.jvp`` (whose forward-mode rules for
    binary ops currently run through Python decompositions).
    """

    def jac(theta: Tensor) -> tuple[Tensor, Tensor]:
        K, P = theta.shape
        with torch.enable_grad():
            t = theta.detach().requires_grad_(True)
            r = residuals(t)  # (K, N)
            u = torch.zeros_like(r, requires_grad=True)
            (jtu,) = torch.autograd.grad(r, t, u, create_graph=True, materialize_grads=True)
            eye = torch.eye(P, dtype=t.dtype, device=t.device).unsqueeze(1).expand(P, K, P)
            if not jtu.requires_grad:  # residuals do not depend on theta at all
                return r.detach(), torch.zeros(*r.shape, P, dtype=r.dtype, device=r.device)
            (cols,) = torch.autograd.grad(jtu, u, eye, is_grads_batched=True, materialize_grads=True)
        return r.detach(), cols.permute(1, 2, 0)  # (K, N), (K, N, P)

    return jac


@dataclass
class _Point:
    """Everything the iteration needs at one theta per curve."""

    cost: Tensor  # (K,) 0.5 Σ rho
    grad: Tensor  # (K, P) gradient of the cost, Jᵀr of the robust-scaled system
    hess: Tensor  # (K, P, P) Gauss–Newton matrix of the robust-scaled system
    res: Tensor  # (K, N) masked residuals, un-robustified
    jac: Tensor  # (K, N, P) masked Jacobian, un-robustified
    scale: Tensor | None  # (K, N) robust row scale (None without a robust loss)


class _Evaluator:
    """Evaluates residuals/Jacobian, applies the mask and SciPy's robust-loss rescaling."""

    def __init__(
        self,
        residuals: Residuals,
        jacobian: Jacobian,
        mask: Tensor | None,
        robust: Robust | None,
        f_scale: float,
    ) -> None:
        self.residuals, self.jacobian, self.mask = residuals, jacobian, mask
        self.robust, self.f_scale = robust, f_scale
        self.n_eval = 0

    def masked(self, r: Tensor) -> Tensor:
        # torch.where, not multiplication: masked rows may hold NaN and NaN * 0 is NaN.
        return r if self.mask is None else torch.where(self.mask, r, 0.0)

    def value(self, theta: Tensor) -> Tensor:
        """Masked residuals only (for the geodesic second derivative)."""
        self.n_eval += 1
        return self.masked(self.residuals(theta))

    def point(self, theta: Tensor) -> _Point:
        self.n_eval += 1
        r, J = self.jacobian(theta)
        r = self.masked(r)  # (K, N)
        if self.mask is not None:
            J = torch.where(self.mask.unsqueeze(-1), J, 0.0)  # (K, N, P)
        if self.robust is None:
            cost = 0.5 * torch.linalg.vector_norm(r, dim=-1) ** 2
            Jt = J.mT  # (K, P, N)
            return _Point(cost, (Jt @ r.unsqueeze(-1)).squeeze(-1), Jt @ J, r, J, None)
        return self._robust_point(r, J)

    def _robust_point(self, r: Tensor, J: Tensor) -> _Point:
        """SciPy's ``scale_for_robust_loss_function``: IRLS rows with the rho'' correction."""
        assert self.robust is not None
        z = (r / self.f_scale) ** 2
        rho, d1, d2 = (self.masked(t) for t in self.robust(z))
        cost = 0.5 * self.f_scale**2 * rho.sum(-1)
        eps = torch.finfo(r.dtype).eps
        scale = self.masked((d1 + 2 * d2 * z).clamp_min(eps).sqrt())  # (K, N)
        Js = J * scale.unsqueeze(-1)  # (K, N, P)
        grad = (J.mT @ (d1 * r).unsqueeze(-1)).squeeze(-1)  # = Jsᵀ (d1 r / scale)
        return _Point(cost, grad, Js.mT @ Js, r, J, scale)


def _select(accept: Tensor, new: _Point, old: _Point) -> _Point:
    """Per-curve choice between two points (``accept`` is (K,) bool)."""
    a1, a2 = accept.unsqueeze(-1), accept.view(-1, 1, 1)
    scale = None if old.scale is None else torch.where(a1, new.scale, old.scale)
    return _Point(
        torch.where(accept, new.cost, old.cost),
        torch.where(a1, new.grad, old.grad),
        torch.where(a2, new.hess, old.hess),
        torch.where(a1, new.res, old.res),
        torch.where(a2, new.jac, old.jac),
        scale,
    )


def _diag(m: Tensor) -> Tensor:
    return m.diagonal(dim1=-2, dim2=-1)


def _gradient_cosine(pt: _Point) -> Tensor:
    """max_j |g_j| / (|J_j| |r|): MINPACK's gtol measure; 0 for a perfect fit."""
    denom = (_diag(pt.hess) * (2 * pt.cost).unsqueeze(-1)).sqrt()  # (K, P)
    cos = torch.where(denom > 0, pt.grad.abs() / torch.where(denom > 0, denom, 1.0), 0.0)
    return cos.amax(-1)


def _initial_status(pt: _Point, gtol: float) -> Tensor:
    finite = torch.isfinite(pt.cost) & torch.isfinite(pt.hess).all(-1).all(-1)
    singular = (_diag(pt.hess) == 0).any(-1)
    status = torch.where(_gradient_cosine(pt) <= gtol, LMStatus.GTOL, LMStatus.RUNNING)
    status = torch.where(singular, LMStatus.SINGULAR, status)
    return torch.where(finite, status, LMStatus.NON_FINITE).to(torch.int64)


def _accelerate(
    ev: _Evaluator, theta: Tensor, v: Tensor, pt: _Point, L: Tensor, D2: Tensor
) -> tuple[Tensor, Tensor]:
    """Geodesic acceleration (Transtrum & Sethna 2012): second-order correction of step v.

    Returns the corrected step and whether the correction was small enough to trust.
    """
    h = _GEODESIC_H
    Jv = (pt.jac @ v.unsqueeze(-1)).squeeze(-1)  # (K, N)
    rvv = (2 / h) * ((ev.value(theta + h * v) - pt.res) / h - Jv)  # (K, N) ≈ r''[v, v]
    w = 1.0 if pt.scale is None else pt.scale**2
    rhs = pt.jac.mT @ (w * rvv).unsqueeze(-1)  # (K, P, 1)
    a = -torch.cholesky_solve(rhs, L).squeeze(-1)  # (K, P)
    ratio = 2 * (D2 * a * a).sum(-1).sqrt() / (D2 * v * v).sum(-1).sqrt()
    good = ratio <= _GEODESIC_ALPHA  # False for NaN
    return torch.where(good.unsqueeze(-1), v + 0.5 * a, v), good


def levenberg_marquardt(
    residuals: Residuals,
    theta0: Tensor,
    *,
    jacobian: Jacobian | None = None,
    mask: Tensor | None = None,
    robust: Robust | None = None,
    f_scale: float = 1.0,
    ftol: float = DEFAULT_FTOL,
    xtol: float = DEFAULT_XTOL,
    gtol: float = DEFAULT_GTOL,
    max_iter: int = DEFAULT_MAX_ITER,
    callback: Callable[[int, Tensor], bool | None] | None = None,
    geodesic: bool = True,
) -> LMResult:
    """Minimise ``0.5 * sum(rho(r_k(theta_k)**2))`` for K independent curves at once."""
    eps = torch.finfo(theta0.dtype).eps
    ftol, xtol, gtol = max(ftol, eps), max(xtol, eps), max(gtol, eps)
    ev = _Evaluator(residuals, jacobian or autodiff_jacobian(residuals), mask, robust, f_scale)
    theta = theta0.detach().clone()
    K, P = theta.shape
    pt = ev.point(theta)
    status = _initial_status(pt, gtol)
    D2 = _diag(pt.hess).clone()  # (K, P) Marquardt scale: largest diag(JᵀJ) seen so far
    lam = torch.full_like(pt.cost, _LAMBDA0)  # (K,)
    nu = torch.full_like(pt.cost, 2.0)  # (K,)
    n_iter = torch.zeros(K, dtype=torch.int64, device=theta.device)
    for it in range(1, max_iter + 1):
        active = status == LMStatus.RUNNING  # (K,)
        if not bool(active.any()):
            break
        M = pt.hess + torch.diag_embed(lam.unsqueeze(-1) * D2)  # (K, P, P)
        L, info = torch.linalg.cholesky_ex(M)
        ok = (info == 0) & active
        v = -torch.cholesky_solve(pt.grad.unsqueeze(-1), L).squeeze(-1)  # (K, P)
        v = torch.where(ok.unsqueeze(-1), v, 0.0)
        step = v
        if geodesic:
            step, good = _accelerate(ev, theta, v, pt, L, D2)
            if _GEODESIC_REJECT:
                ok = ok & good
        new = ev.point(theta + step)
        Av = (pt.hess @ v.unsqueeze(-1)).squeeze(-1)
        pred = 0.5 * (v * Av).sum(-1) + lam * (D2 * v * v).sum(-1)  # MINPACK's prered * cost
        actred = pt.cost - new.cost
        rho = actred / pred
        accept = ok & (rho > _ACCEPT) & torch.isfinite(new.hess).all(-1).all(-1)
        # Nielsen's damping update: smooth decrease on success, growing increase on failure.
        shrink = (1 - (2 * rho - 1) ** 3).clamp(min=1 / 3)
        lam = torch.where(accept, lam * shrink, lam * nu)
        nu = torch.where(accept, 2.0, nu * 2)
        # Convergence tests (MINPACK), relative to the cost before the step.
        f_hit = (actred.abs() <= ftol * pt.cost) & (pred <= ftol * pt.cost) & (rho <= 2)
        dstep = (D2 * step * step).sum(-1).sqrt()
        x_hit = dstep <= xtol * (xtol + (D2 * theta * theta).sum(-1).sqrt())
        singular = ~ok & active & (lam > _LAMBDA_MAX)
        theta = torch.where(accept.unsqueeze(-1), theta + step, theta)
        pt = _select(accept, new, pt)
        D2 = torch.where(accept.unsqueeze(-1), torch.maximum(D2, _diag(pt.hess)), D2)
        g_hit = _gradient_cosine(pt) <= gtol
        code = torch.where(g_hit, LMStatus.GTOL, LMStatus.RUNNING)
        code = torch.where(x_hit, LMStatus.XTOL, code)
        code = torch.where(f_hit, LMStatus.FTOL, code)
        code = torch.where(singular, LMStatus.SINGULAR, code)
        status = torch.where(active, code, status)
        n_iter += active
        if callback is not None and callback(it, pt.cost):
            break
    status = torch.where(status == LMStatus.RUNNING, LMStatus.MAX_ITER, status)
    return LMResult(theta, pt.cost, n_iter, ev.n_eval, status, pt.jac)
