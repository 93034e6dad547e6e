"""Levenberg–Marquardt for one ``Problem``: residuals and Jacobians for the batched kernel."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from types import ModuleType
from typing import TypedDict, TypeVar

import torch

from gradfit.model.models import finite_difference_jacobian
from gradfit.model.program import VAR
from gradfit.optim.dispatch import lm_kernel, one_variable, stop_only
from gradfit.optim.lm import (
    DEFAULT_FTOL,
    DEFAULT_MAX_ITER,
    Jacobian,
    LMStatus,
    Residuals,
    Stacked,
    Subset,
    autodiff_jacobian,
    describe,
    levenberg_marquardt,
)
from gradfit.optim.problem import Hook, LoopOutcome, LoopState, Problem

Tensor = torch.Tensor
#: a per-curve tensor, or one that may be absent (sigma, mask)
_Rows = TypeVar("_Rows", Tensor, Tensor | None)


class _Evaluation(TypedDict, total=False):
    """How the PyTorch kernel gets Jacobians: symbolic ``stacked`` rows or ``jacobian``."""

    jacobian: Jacobian
    stacked: Stacked


class _Options(TypedDict, total=False):
    """The kernels' options ``run_lm`` sets (``ftol`` only when a tol is given)."""

    ftol: float
    max_iter: int
    linear: bool


def residual_functions(
    problem: Problem,
) -> tuple[Callable[[Tensor], Tensor], Callable[[Tensor], Tensor] | None]:
    """``r(theta)`` ``[K, N]`` and, for expression models, the kernel's stacked rows.

    The rows ``[K, F + 1, N]`` are the symbolic derivatives of the residuals with respect to
    the free (transformed) parameters, then the residuals themselves: one ``torch.stack``.
    A function written in NumPy (``Model.numerical``) gets rows by forward differences of
    the residuals in theta (bounds' transforms included), every curve's column in one call.
    """
    model, space, x, y = problem.model, problem.space, problem.x, problem.y
    sigma = problem.loss.sigma
    free = space.free

    def residuals(theta: Tensor) -> Tensor:  # (K, F) -> (K, N)
        r = model(x, space.to_params(theta)) - y
        return r if sigma is None else r / sigma

    if model.expression is None:
        # decided at the model's first evaluation (fit's is at p0); fit_batch's may be this one
        if model.detect_numpy(x, y.new_ones(len(model.param_names))):

            def numerical(theta: Tensor) -> Tensor:  # -> (K, F + 1, N)
                r, J = finite_difference_jacobian(residuals, theta)
                return torch.cat([J.mT, r.unsqueeze(-2)], dim=-2)

            return residuals, numerical
        return residuals, None

    def stacked(theta: Tensor) -> Tensor:  # -> (K, F + 1, N)
        y_pred, *columns = model.value_and_derivatives(x, space.to_params(theta))  # type: ignore[misc]
        if not space.is_identity:  # chain rule through the elementwise bound transforms
            chain = space.derivative(theta).unsqueeze(-1)  # (K, F, 1)
            columns = [columns[i] * chain[:, j] for j, i in enumerate(free)]
        rows = torch.stack([*columns, y_pred - y], dim=-2)
        return rows if sigma is None else rows / sigma.unsqueeze(-2)

    return residuals, stacked


def linear_in_params(problem: Problem) -> bool:
    """Whether ``problem``'s residuals are linear in its fitted parameters: an expression
    whose derivatives with respect to the free parameters use none of them, and no bounds
    (their transforms are not linear). Both kernels then start undamped, so that the first
    step solves it, and skip the geodesic acceleration: r'' = 0, so its correction is zero
    up to rounding, and its extra residual evaluation (~40% of an iteration) is saved."""
    programs, space = problem.model.programs, problem.space
    if programs is None or any(b is not None for b in space.lower + space.upper):
        return False
    full = programs[1]
    free = {space.names[i] for i in space.free}
    uses: list[bool] = []  # step s depends on a free parameter
    for kind, arg, operands in full.steps:
        uses.append((kind == VAR and arg in free) or any(uses[i] for i in operands))
    return not any(uses[full.outputs[1 + i]] for i in space.free)


def residual_subset(problem: Problem, mask: Tensor | None) -> Subset:
    """For the kernel's ``subset``: the residual functions and mask of some curves alone."""

    def rows_of(value: _Rows, index: Tensor) -> _Rows:
        # per-curve values are [K, N]; a shared x ([N]) or sigma serves every subset as it is
        return value[index] if value is not None and value.dim() == 2 else value

    def subset(index: Tensor) -> tuple[Residuals, Stacked | None, Tensor | None]:
        assert isinstance(problem.x, Tensor), "batches have one independent variable"
        x = rows_of(problem.x, index)
        loss = replace(problem.loss, sigma=rows_of(problem.loss.sigma, index))
        part = replace(problem, x=x, y=problem.y[index], loss=loss)
        return (*residual_functions(part), rows_of(mask, index))

    return subset


def run_lm(
    problem: Problem,
    start: Tensor | LoopState,
    *,
    max_iter: int | None,
    tol: float | None,
    hook: Hook | None,
) -> LoopOutcome:
    """Minimise ``problem``'s least-squares loss with an LM kernel at K = 1.

    ``dispatch.lm_kernel`` picks the compiled kernel or the PyTorch one (``lm.py``); a
    ``hook`` with a true ``stop_only`` attribute does not force the PyTorch kernel: the
    compiled one asks it once, when it returns.

    ``start`` may be a ``LoopState`` from a checkpoint: LM then restarts from its best
    parameters, keeping the history and the iteration count (not bit for bit: the kernel's
    damping starts afresh). ``state.theta`` tracks the best point evaluated so far, which is
    what a checkpoint hook saves.
    """
    state = start if isinstance(start, LoopState) else LoopState(start.detach())
    loss = problem.loss
    robust = None if loss.name in ("mse", "sse", "chi2") else loss.rho
    # the kernel's cost is 0.5 Σ f_scale² rho (f_scale² included); the loss is its mean or sum
    to_loss = 2.0 if loss.reduction == "sum" else 2.0 / problem.y.shape[-1]
    options: _Options = {} if tol is None else {"ftol": tol}
    options["max_iter"] = max(0, (max_iter or DEFAULT_MAX_ITER) - state.epoch)
    options["linear"] = linear_in_params(problem)  # fit_batch's _lm_chunk asks alike
    theta0 = state.theta.detach().unsqueeze(0)
    # dispatch.lm_kernel decides, for fit_batch too: a hook that needs every iteration takes
    # the PyTorch kernel; one that only asks "stop?" is asked when the compiled kernel returns
    per_iteration = not stop_only(hook)
    history = int(options["max_iter"])  # the compiled kernel keeps max_iter costs
    lm_compiled = lm_kernel(problem, robust, theta0, per_iteration=per_iteration, history=history)
    if lm_compiled is not None:
        compiled_problem = one_variable(problem)  # x as an array, not {name: array}
        return _run_compiled(lm_compiled, compiled_problem, state, theta0, to_loss, options, hook)
    residuals, stacked = residual_functions(problem)
    # the kernel reports costs, not parameters: score each point it evaluates instead
    loss_of_residuals = replace(loss, sigma=None)  # residuals arrive already divided by sigma

    def record(theta: Tensor, r: Tensor) -> None:
        if robust is None:  # plain squares: one dot product instead of the loss's four steps
            value = float(torch.linalg.vecdot(r[0], r[0])) * to_loss / 2
        else:
            value = float(loss_of_residuals(r, torch.zeros_like(r)))
        if value < state.best_loss:
            state.best_loss, state.best_theta = value, theta[0].detach().clone()
            state.theta = state.best_theta

    # symbolic rows go in as ``stacked`` (the kernel then runs without autograd), autodiff
    # Jacobians as ``jacobian``
    evaluation: _Evaluation = {}
    if stacked is not None:
        symbolic = stacked

        def tracked_rows(theta: Tensor) -> Tensor:
            rows = symbolic(theta)
            record(theta, rows[:, -1])
            return rows

        evaluation["stacked"] = tracked_rows
    else:
        autodiff = autodiff_jacobian(residuals)

        def tracked_jacobian(theta: Tensor) -> tuple[Tensor, Tensor]:
            r, J = autodiff(theta)
            record(theta, r)
            return r, J

        evaluation["jacobian"] = tracked_jacobian

    stopped: list[int] = []

    def callback(iteration: int, cost: Tensor) -> bool:
        epoch = state.epoch  # iterations done before this one, across resumed runs
        state.history.append(float(cost[0]) * to_loss)
        state.epoch += 1
        if hook is not None and hook(epoch, state.history[-1]):
            stopped.append(epoch)
            return True
        return False

    result = levenberg_marquardt(
        residuals,
        theta0,
        **evaluation,
        robust=robust,
        f_scale=loss.f_scale,
        callback=callback,
        **options,
    )
    if state.best_theta is not None and state.best_theta.is_inference():
        state.best_theta = state.best_theta.clone()  # recorded inside the kernel's inference mode
        state.theta = state.best_theta
    code = int(result.status[0])
    status, message = _status(code), _message(code, tol, state.epoch)
    if stopped:
        status, message = "interrupted", f"the hook asked to stop after iteration {stopped[0]}"
    final_loss = float(result.cost[0]) * to_loss
    return LoopOutcome(
        result.theta[0], final_loss, list(state.history), status, message,
        n_eval=int(result.n_eval),
    )  # fmt: skip


#: LM codes in ``status.STATUSES`` words (``batch_result.STATUS_NAMES`` spells them alike)
_STATUS = {
    LMStatus.FTOL: "converged",
    LMStatus.XTOL: "converged",
    LMStatus.GTOL: "converged",
    LMStatus.MAX_ITER: "max_iter",
    LMStatus.NON_FINITE: "non_finite",
    LMStatus.SINGULAR: "singular",
}


def _status(code: int) -> str:
    return _STATUS.get(LMStatus(code), "max_iter")


def _message(code: int, tol: float | None, n_iter: int) -> str:
    """Why LM stopped, with the tolerance it used, without the status word (``describe``
    starts with "converged: " or "failed: ", which the status already says)."""
    if code == LMStatus.MAX_ITER:
        return f"stopped after the maximum of {n_iter} iterations"
    text = describe(code, ftol=DEFAULT_FTOL if tol is None else tol)
    return text.split(": ", 1)[-1]


def _run_compiled(
    lm_compiled: ModuleType,
    problem: Problem,
    state: LoopState,
    theta0: Tensor,
    to_loss: float,
    options: _Options,
    hook: Hook | None,
) -> LoopOutcome:
    """``run_lm`` on the compiled kernel (same algorithm). It runs every iteration without
    returning to Python: a stop-only ``hook`` is asked once, after the last iteration, and
    stopping there keeps the finished fit but reports it ``"interrupted"``, as the PyTorch
    kernel does for a stop asked during its last iteration."""
    fitted = lm_compiled.fit_curves(problem, theta0, rows=True, history=True, **options)
    n_iter, code = int(fitted.n_iter[0]), int(fitted.status[0])
    assert fitted.history is not None
    state.history.extend((fitted.history[0, :n_iter] * to_loss).tolist())
    state.epoch += n_iter
    theta = torch.from_numpy(fitted.theta[0])
    final_loss = float(fitted.cost[0]) * to_loss
    if final_loss < state.best_loss:  # the kernel's theta is the best point it accepted
        state.best_loss, state.best_theta, state.theta = final_loss, theta, theta
    assert fitted.rows is not None
    status, message = _status(code), _message(code, options.get("ftol"), state.epoch)
    last = state.epoch - 1  # as the PyTorch kernel's callback numbers it
    if hook is not None and n_iter > 0 and hook(last, state.history[-1]):
        status, message = "interrupted", f"the hook asked to stop after iteration {last}"
    return LoopOutcome(
        theta, final_loss, list(state.history), status, message, rows=fitted.rows[0],
        n_eval=fitted.n_eval,
    )  # fmt: skip
