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

    cost: Tensor  # (K,)
    grad: Tensor  # (K, P) Jᵀr of the (robust-scaled) system
    hess: Tensor  # (K, P, P) JᵀJ of the (robust-scaled) system
    jac: Tensor  # (K, N, P) un-robustified, masked Jacobian
    res: Tensor  # (K, N) scaled residuals (robust-scaled when a loss is given)
    jac_s: Tensor  # (K, N, P) scaled Jacobian


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

    def cost_of(self, r: Tensor) -> Tensor:
        """0.5 Σ rho (0.5 Σ r² without a robust loss), per curve."""
        if self.robust is None:
            return 0.5 * torch.linalg.vector_norm(r, dim=-1) ** 2
        rho = self.robust((r / self.f_scale) ** 2)[0]
        return 0.5 * self.f_scale**2 * self.masked(rho).sum(-1)

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
        cost, rs, Js = self.cost_of(r), r, J
        if self.robust is not None:
            rs, Js = self._robust_scale(r, J)
        Jt = Js.mT  # (K, P, N)
        return _Point(cost, (Jt @ rs.unsqueeze(-1)).squeeze(-1), Jt @ Js, J, rs, Js)

    def _robust_scale(self, r: Tensor, J: Tensor) -> tuple[Tensor, Tensor]:
        """SciPy's ``scale_for_robust_loss_function``: IRLS rows with the rho'' correction."""
        _, d1, d2 = self.robust((r / self.f_scale) ** 2)
        scale = (d1 + 2 * d2 * (r / self.f_scale) ** 2).clamp_min(torch.finfo(r.dtype).eps)
        scale = self.masked(scale.sqrt())  # (K, N)
        return r * self.masked(d1) / torch.where(scale > 0, scale, 1.0), J * scale.unsqueeze(-1)
