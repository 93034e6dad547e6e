"""The training loop: where the post's verbs meet.

One step reads like the post's ``apply_step``: forward ``f(x, params)``, loss, backward,
update, and (because ``autograd.grad`` does not accumulate) no gradient to zero. The loop
records the loss history and stops on ``epochs``, on a relative loss change below ``tol``,
on a non-finite loss (keeping the best parameters seen), or when the hook asks it to.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .losses import Loss
from .models import Model
from .parameters import ParameterSpace

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
class LoopOutcome:
    theta: Tensor
    loss: float
    history: list[float] = field(default_factory=list)
    status: str = "max_epochs"  # converged | max_epochs | diverged | interrupted
    message: str = ""

    @property
    def converged(self) -> bool:
        return self.status == "converged"


def apply_step(problem: Problem, theta: Tensor, optimizer: object, state: dict) -> Tensor:
    """One step of the post's loop; updates ``theta`` in place and returns the loss."""
    loss = problem.objective(theta)  # forward + loss
    (grad,) = torch.autograd.grad(loss, theta)  # backward: d loss / d params
    optimizer.update(theta, grad, state)  # type: ignore[attr-defined]  # params -= lr * grad
    return loss


def run_loop(
    problem: Problem,
    theta: Tensor,
    optimizer: object,
    *,
    epochs: int,
    tol: float | None = None,
    hook: Hook | None = None,
    state: dict | None = None,
    start_epoch: int = 0,
    history: list[float] | None = None,
) -> LoopOutcome:
    """Run first-order ``optimizer`` steps on ``theta`` (a leaf tensor requiring grad)."""
    state = optimizer.init(theta) if state is None else state  # type: ignore[attr-defined]
    history = [] if history is None else history
    best_loss, best_theta = math.inf, theta.detach().clone()
    before = theta.detach().clone()  # the parameters this epoch's loss belongs to
    status, message = "max_epochs", f"stopped after the maximum of {epochs} epochs"
    for epoch in range(start_epoch, epochs):
        before.copy_(theta.data)
        loss = apply_step(problem, theta, optimizer, state).item()
        if not math.isfinite(loss):
            status, message = "diverged", _diverged_message(epoch, loss)
            break
        history.append(loss)
        if loss < best_loss:
            best_loss = loss
            before, best_theta = best_theta, before  # swap buffers instead of cloning
        if _small_change(history, tol):
            status, message = "converged", f"relative loss change below tol={tol}"
            break
        if hook is not None and hook(epoch, loss):
            status, message = "interrupted", f"interrupted after epoch {epoch}"
            break
    return _finish(problem, theta, best_theta, best_loss, history, status, message)


def run_lbfgs(
    problem: Problem,
    theta: Tensor,
    *,
    lr: float,
    epochs: int,
    tol: float | None,
    hook: Hook | None = None,
) -> LoopOutcome:
    """``torch.optim.LBFGS`` with a strong-Wolfe line search; one epoch is one ``step``."""
    optimizer = torch.optim.LBFGS(
        [theta], lr=lr, max_iter=20, line_search_fn="strong_wolfe",
        tolerance_grad=1e-12, tolerance_change=1e-15, history_size=20,
    )  # fmt: skip

    def closure() -> Tensor:
        optimizer.zero_grad(set_to_none=True)  # backward() accumulates into .grad
        loss = problem.objective(theta)
        loss.backward()
        return loss

    history: list[float] = []
    best_loss, best_theta = math.inf, theta.detach().clone()
    status, message = "max_epochs", f"stopped after the maximum of {epochs} epochs"
    for epoch in range(epochs):
        loss = float(optimizer.step(closure).detach())  # the loss before this step's line searches
        if not math.isfinite(loss):
            status, message = "diverged", _diverged_message(epoch, loss)
            break
        history.append(loss)
        if loss < best_loss:
            best_loss = loss
        if _small_change(history, tol):
            status, message = "converged", f"relative loss change below tol={tol}"
            break
        if hook is not None and hook(epoch, loss):
            status, message = "interrupted", f"interrupted after epoch {epoch}"
            break
    return _finish(problem, theta, best_theta, best_loss, history, status, message)


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


def _finish(
    problem: Problem,
    theta: Tensor,
    best_theta: Tensor,
    best_loss: float,
    history: list[float],
    status: str,
    message: str,
) -> LoopOutcome:
    # the last update's result was never scored: score it and keep whichever is better
    with torch.no_grad():
        final = theta.detach().clone()
        final_loss = float(problem.objective(final))
    if not math.isfinite(final_loss) or final_loss > best_loss:
        final, final_loss = best_theta, best_loss
    return LoopOutcome(final, final_loss, history, status, message)
