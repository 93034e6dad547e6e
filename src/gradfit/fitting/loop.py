"""The training loop: where the post's verbs meet.

One step reads like the post's ``apply_step``: forward ``f(x, params)``, loss, backward,
update, zero the gradient. The loop records the loss history and stops on ``epochs``, on a
relative loss change below ``tol``, on a non-finite loss (keeping the best parameters seen),
or when the hook asks it to. What it fits, carries and returns is in ``problem.py``; why it
stops, in ``status.py``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from gradfit.optim.backward import backward
from gradfit.optim.first_order import State, symbolic_loss
from gradfit.optim.problem import Hook, LoopOutcome, LoopState, Problem, finish
from gradfit.optim.status import diverged_message, small_change

Tensor = torch.Tensor


def apply_step(
    problem: Problem,
    theta: Tensor,
    optimizer: object,
    state: State,
    gradient: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """One step of the post's loop; updates ``theta`` in place and returns the loss.

    ``gradient`` (``first_order.symbolic_loss``: an expression model knows its derivatives)
    does forward, loss and backward in one call, with no autograd tape.
    """
    if gradient is None:
        loss = problem.objective(theta)  # forward + loss
        backward(loss)  # loss.backward(): d loss / d params, into theta.grad
    else:
        loss = gradient(theta)  # the same three, from the model's symbolic Jacobian
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
    gradient = symbolic_loss(problem)  # None for a function or module model (the post's f)
    # Per-step bookkeeping lives in locals (a step takes ~100 us; attribute writes add up);
    # the state is brought up to date before a hook sees it and when the loop ends.
    best_loss, best_theta = state.best_loss, state.best_theta
    assert best_theta is not None  # LoopState fills it
    before = theta.detach().clone()  # the parameters this epoch's loss belongs to
    check_change = tol is not None and tol >= 0
    status, message = "max_iter", f"stopped after the maximum of {epochs} epochs"
    done = state.epoch  # epochs completed, across resumed runs
    if check_change and small_change(history, tol):  # resumed where a converged run stopped
        return finish(problem, state, "converged", f"relative loss change below tol={tol}")
    for epoch in range(state.epoch, epochs):
        before.copy_(theta.data)
        loss = apply_step(problem, theta, optimizer, opt_state, gradient).item()
        if not math.isfinite(loss):
            status, message = "diverged", diverged_message(epoch, loss)
            break
        if loss < best_loss:  # swap buffers instead of cloning
            best_loss, before, best_theta = loss, best_theta, before
        history.append(loss)
        done = epoch + 1
        if check_change and small_change(history, tol):
            status, message = "converged", f"relative loss change below tol={tol}"
            break
        if hook is not None:
            state.epoch, state.best_loss, state.best_theta = done, best_loss, best_theta
            if hook(epoch, loss):
                status, message = "interrupted", f"the hook asked to stop after epoch {epoch}"
                break
    state.epoch, state.best_loss, state.best_theta = done, best_loss, best_theta
    return finish(problem, state, status, message)
