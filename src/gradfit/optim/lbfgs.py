"""LBFGS for one ``Problem``: ``torch.optim.LBFGS`` with a strong-Wolfe line search.

It keeps the post's loop's bookkeeping (``fitting/loop.py``): a ``LoopState`` a checkpoint can
save and resume, the best parameters seen, and the same statuses and stopping tests.
"""

from __future__ import annotations

import math

import torch

from gradfit.optim.backward import backward
from gradfit.optim.problem import Hook, LoopOutcome, LoopState, Problem, finish
from gradfit.optim.status import diverged_message, small_change

Tensor = torch.Tensor


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
    assert state.best_theta is not None  # LoopState fills it
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
    if small_change(history, tol):  # resumed where a converged run stopped: stop there again
        return finish(problem, state, "converged", f"relative loss change below tol={tol}")
    for epoch in range(state.epoch, epochs):
        before.copy_(theta.data)
        loss = float(optimizer.step(closure).detach())  # the loss before this step's line searches
        state.optimizer_state = optimizer.state_dict()  # references, not copies: cheap
        if not math.isfinite(loss):
            status, message = "diverged", diverged_message(epoch, loss)
            break
        history.append(loss)
        state.epoch = epoch + 1
        if loss < state.best_loss:
            state.best_loss, before, state.best_theta = loss, state.best_theta, before
        if small_change(history, tol):
            status, message = "converged", f"relative loss change below tol={tol}"
            break
        if hook is not None and hook(epoch, loss):
            status, message = "interrupted", f"the hook asked to stop after epoch {epoch}"
            break
    return finish(problem, state, status, message)
