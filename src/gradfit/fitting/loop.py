"""The training loop: where the post's verbs meet.

One step reads like the post's ``apply_step``: forward ``f(x, params)``, loss, backward,
update, zero the gradient. The loop
records the loss history and stops on ``epochs``, on a relative loss change below ``tol``,
on a non-finite loss (keeping the best parameters seen), or when the hook asks it to.

Everything the loop carries from one epoch to the next lives in a ``LoopState``, so a
checkpoint (``checkpoint.py``) can save it from a hook and a later run can continue it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from gradfit.fitting.backward import backward
from gradfit.model.losses import Loss
from gradfit.model.models import Model
from gradfit.model.parameters import ParameterSpace

Tensor = torch.Tensor
#: called after every epoch with (epoch, loss); returning True stops the loop
Hook = Callable[[int, float], bool | None]


@dataclass
class Problem:
    """What is fitted: ``loss(f(x, params(theta)), y)``."""

    model: Model
    x: Tensor | dict[str, Tensor]
    y: Tensor
    loss: Loss
    space: ParameterSpace

    def objective(self, theta: Tensor) -> Tensor:
        y_pred = self.model(self.x, self.space.to_params(theta))  # forward: f(x, params)
        return self.loss(y_pred, self.y)  # e.g. the post's mse


@dataclass
class LoopState:
    """What the loop carries between epochs: exactly what a checkpoint saves."""

    theta: Tensor  # the free parameters (a leaf requiring grad for first-order steps)
    optimizer_state: dict[str, Any] = field(default_factory=dict)
    epoch: int = 0  # epochs (LM: iterations) done, across resumed runs
    history: list[float] = field(default_factory=list)
    best_loss: float = math.inf
    best_theta: Tensor | None = None  # the parameters best_loss belongs to

    def __post_init__(self) -> None:
        if self.best_theta is None:
            self.best_theta = self.theta.detach().clone()


#: One status vocabulary for ``fit``, ``fit_batch`` and ``fit-many``: why a fit stopped. The
#: ``message`` beside a status says more and never repeats the status word.
STATUSES = {
    "converged": "a convergence test passed (tol; LM: ftol, xtol or gtol)",
    "max_iter": "the epoch (LM: iteration) limit stopped it before any convergence test passed",
    "diverged": "the loss became non-finite; the best parameters seen are kept",
    "interrupted": "the hook (a signal, a callback) asked it to stop",
    "singular": "LM could not solve its damped normal equations even at the largest damping",
    "non_finite": "the residuals or Jacobian were not finite at the start",
    "too_few_points": "fewer valid points than free parameters (fit_batch: no fit)",
    "no_data": "no valid points at all (fit_batch, fit-many: no fit)",
}
FAILED = ("diverged", "singular", "non_finite")  # no answer to trust: the CLI exits 3


@dataclass
class LoopOutcome:
    theta: Tensor
    loss: float
    history: list[float] = field(default_factory=list)
    status: str = "max_iter"  # one of STATUSES
    message: str = ""
    # [J; r] (P_free + 1, N) at theta, divided by sigma, J in the model's own parameters, when
    # the solver has them (compiled LM): the statistics then need no new evaluation
    rows: Any = None
    n_eval: int | None = None  # model evaluations (Levenberg–Marquardt), as SciPy's nfev

    @property
    def converged(self) -> bool:
        return self.status == "converged"


def apply_step(problem: Problem, theta: Tensor, optimizer: object, state: dict) -> Tensor:
    """One step of the post's loop; updates ``theta`` in place and returns the loss."""
    loss = problem.objective(theta)  # forward + loss
    backward(loss)  # loss.backward(): d loss / d params, into theta.grad
    optimizer.update(theta, theta.grad, state)  # type: ignore[attr-defined]  # params -= lr * grad
    theta.grad = None  # backward() accumulates: zero the gradient, as the post does
    return loss


def run_loop(
    problem: Problem,
    start: Tensor | LoopState,
    optimizer: object,
    *,
    epochs: int,
    tol: float | None = None,
    hook: Hook | None = None,
) -> LoopOutcome:
    """Run first-order ``optimizer`` steps from ``start``: ``theta`` or a saved ``LoopState``."""
    state = start if isinstance(start, LoopState) else LoopState(start)
    if not state.optimizer_state:  # a fresh run (gd's state is empty either way)
        state.optimizer_state = optimizer.init(state.theta)  # type: ignore[attr-defined]
    theta, history, opt_state = state.theta, state.history, state.optimizer_state
    # Per-step bookkeeping lives in locals (a step takes ~100 us; attribute writes add up);
    # the state is brought up to date before a hook sees it and when the loop ends.
    best_loss, best_theta = state.best_loss, state.best_theta
    before = theta.detach().clone()  # the parameters this epoch's loss belongs to
    check_change = tol is not None and tol >= 0
    status, message = "max_iter", f"stopped after the maximum of {epochs} epochs"
    done = state.epoch  # epochs completed, across resumed runs
    if check_change and _small_change(history, tol):  # resumed where a converged run stopped
        return _finish(problem, state, "converged", f"relative loss change below tol={tol}")
    for epoch in range(state.epoch, epochs):
        before.copy_(theta.data)
        loss = apply_step(problem, theta, optimizer, opt_state).item()
        if not math.isfinite(loss):
            status, message = "diverged", _diverged_message(epoch, loss)
            break
        if loss < best_loss:  # swap buffers instead of cloning
            best_loss, before, best_theta = loss, best_theta, before
        history.append(loss)
        done = epoch + 1
        if check_change and _small_change(history, tol):
            status, message = "converged", f"relative loss change below tol={tol}"
            break
        if hook is not None:
            state.epoch, state.best_loss, state.best_theta = done, best_loss, best_theta
            if hook(epoch, loss):
                status, message = "interrupted", f"the hook asked to stop after epoch {epoch}"
                break
    state.epoch, state.best_loss, state.best_theta = done, best_loss, best_theta
    return _finish(problem, state, status, message)


def run_lbfgs(
    problem: Problem,
    start: Tensor | LoopState,
    *,
    lr: float,
    epochs: int,
    tol: float | None,
    hook: Hook | None = None,
) -> LoopOutcome:
    """``torch.optim.LBFGS`` with a strong-Wolfe line search; one epoch is one ``step``."""
    state = start if isinstance(start, LoopState) else LoopState(start)
    theta, history = state.theta, state.history
    optimizer = torch.optim.LBFGS(
        [theta], lr=lr, max_iter=20, line_search_fn="strong_wolfe",
        tolerance_grad=1e-12, tolerance_change=1e-15, history_size=20,
    )  # fmt: skip
    if state.optimizer_state:  # resuming: its curvature pairs make the continuation exact
        optimizer.load_state_dict(state.optimizer_state)

    def closure() -> Tensor:
        optimizer.zero_grad(set_to_none=True)  # backward() accumulates into .grad
        loss = problem.objective(theta)
        backward(loss)
        return loss

    before = theta.detach().clone()
    status, message = "max_iter", f"stopped after the maximum of {epochs} epochs"
    if _small_change(history, tol):  # resumed where a converged run stopped: stop there again
        return _finish(problem, state, "converged", f"relative loss change below tol={tol}")
    for epoch in range(state.epoch, epochs):
        before.copy_(theta.data)
        loss = float(optimizer.step(closure).detach())  # the loss before this step's line searches
        state.optimizer_state = optimizer.state_dict()  # references, not copies: cheap
        if not math.isfinite(loss):
            status, message = "diverged", _diverged_message(epoch, loss)
            break
        history.append(loss)
        state.epoch = epoch + 1
        if loss < state.best_loss:
            state.best_loss, before, state.best_theta = loss, state.best_theta, before
        if _small_change(history, tol):
            status, message = "converged", f"relative loss change below tol={tol}"
            break
        if hook is not None and hook(epoch, loss):
            status, message = "interrupted", f"the hook asked to stop after epoch {epoch}"
            break
    return _finish(problem, state, status, message)


def chain_hooks(*hooks: Hook | None) -> Hook | None:
    """One hook that calls each given hook in order and stops when any of them asks to."""
    active = [hook for hook in hooks if hook is not None]
    if len(active) <= 1:  # no wrapper, so no cost, for the common cases
        return active[0] if active else None

    def chained(epoch: int, loss: float) -> bool:
        stop = False
        for hook in active:  # every hook runs: a checkpoint still saves on a stop request
            stop = bool(hook(epoch, loss)) or stop
        return stop

    return chained


def _small_change(history: list[float], tol: float | None) -> bool:
    if tol is None or tol < 0 or len(history) < 2:
        return False
    previous, current = history[-2], history[-1]
    return abs(previous - current) <= tol * max(abs(previous), 1e-300)


def _diverged_message(epoch: int, loss: float) -> str:
    return (
        f"loss became {loss} at epoch {epoch}; kept the best parameters seen. "
        "Try a smaller learning rate (--lr) or another optimizer (lm, lbfgs, adam)"
    )


def _finish(problem: Problem, state: LoopState, status: str, message: str) -> LoopOutcome:
    # the last update's result was never scored: score it and keep whichever is better
    with torch.no_grad():
        final = state.theta.detach().clone()
        final_loss = float(problem.objective(final))
    if not math.isfinite(final_loss) or final_loss > state.best_loss:
        assert state.best_theta is not None
        final, final_loss = state.best_theta.clone(), state.best_loss
    return LoopOutcome(final, final_loss, list(state.history), status, message)
