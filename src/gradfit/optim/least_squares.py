"""Levenberg–Marquardt for one ``Problem``: residuals and Jacobians for the batched kernel."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..loop import Hook, LoopOutcome, Problem
from .lm import LMStatus, describe, levenberg_marquardt

Tensor = torch.Tensor


def residual_functions(
    problem: Problem,
) -> tuple[Callable[[Tensor], Tensor], Callable[[Tensor], tuple[Tensor, Tensor]] | None]:
    """``r(theta)`` ``[K, N]`` and, for expression models, ``(r, J)`` with a symbolic ``J``."""
    model, space, x, y = problem.model, problem.space, problem.x, problem.y
    sigma = problem.loss.sigma
    free = space.free

    def residuals(theta: Tensor) -> Tensor:  # (K, F) -> (K, N)
        r = model(x, space.to_params(theta)) - y
        return r if sigma is None else r / sigma

    if model.expression is None:
        return residuals, None

    def jacobian(theta: Tensor) -> tuple[Tensor, Tensor]:  # -> (K, N), (K, N, F)
        y_pred, J = model.jacobian(x, space.to_params(theta))  # type: ignore[misc]
        if not space.is_identity:  # chain rule through the elementwise bound transforms
            J = J[..., free] * space.derivative(theta).unsqueeze(-2)
        r = y_pred - y
        if sigma is not None:
            r, J = r / sigma, J / sigma.unsqueeze(-1)
        return r, J

    return residuals, jacobian


def run_lm(
    problem: Problem, theta: Tensor, *, max_iter: int | None, tol: float | None, hook: Hook | None
) -> LoopOutcome:
    """Minimise ``problem``'s least-squares loss with the batched LM kernel at K = 1."""
    loss = problem.loss
    residuals, jacobian = residual_functions(problem)
    robust = None if loss.name in ("mse", "sse", "chi2") else loss.rho
    # the kernel's cost is 0.5 Σ f_scale² rho; the user's loss is its mean or sum
    n_points = problem.y.shape[-1]
    to_loss = (2.0 if loss.reduction == "sum" else 2.0 / n_points) * (
        loss.f_scale**2 if robust is not None else 1.0
    )
    history: list[float] = []
    stopped: list[int] = []

    def callback(iteration: int, cost: Tensor) -> bool:
        history.append(float(cost[0]) * to_loss)
        if hook is not None and hook(iteration, history[-1]):
            stopped.append(iteration)
            return True
        return False

    options = {} if tol is None else {"ftol": tol}
    if max_iter is not None:
        options["max_iter"] = max_iter
    result = levenberg_marquardt(
        residuals,
        theta.detach().unsqueeze(0),
        jacobian=jacobian,
        robust=robust,
        f_scale=loss.f_scale,
        callback=callback,
        **options,
    )
    code = int(result.status[0])
    status = {
        LMStatus.FTOL: "converged",
        LMStatus.XTOL: "converged",
        LMStatus.GTOL: "converged",
        LMStatus.MAX_ITER: "max_epochs",
        LMStatus.NON_FINITE: "diverged",
        LMStatus.SINGULAR: "singular",
    }.get(LMStatus(code), "max_epochs")
    message = describe(code)
    if stopped:
        status, message = "interrupted", f"interrupted after iteration {stopped[0]}"
    final_loss = float(result.cost[0]) * to_loss
    return LoopOutcome(result.theta[0], final_loss, history, status, message)
