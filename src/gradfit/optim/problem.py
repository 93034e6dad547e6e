"""What every solver shares: the ``Problem`` it fits, the ``LoopState`` it carries between
epochs, the ``Hook`` it calls after each, and the ``LoopOutcome`` it returns.

Everything a loop carries from one epoch to the next lives in a ``LoopState``, so a
checkpoint (``checkpoint.py``) can save it from a hook and a later run can continue it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

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


@dataclass
class LoopOutcome:
    theta: Tensor
    loss: float
    history: list[float] = field(default_factory=list)
    status: str = "max_iter"  # one of status.STATUSES
    message: str = ""
    # [J; r] (P_free + 1, N) at theta, divided by sigma, J in the model's own parameters, when
    # the solver has them (compiled LM): the statistics then need no new evaluation
    rows: Any = None
    n_eval: int | None = None  # model evaluations (Levenberg–Marquardt), as SciPy's nfev

    @property
    def converged(self) -> bool:
        return self.status == "converged"


def finish(problem: Problem, state: LoopState, status: str, message: str) -> LoopOutcome:
    """End a first-order or LBFGS run: score the last update (never scored by the loop) and
    keep it or the best parameters seen, whichever is better."""
    with torch.no_grad():
        final = state.theta.detach().clone()
        final_loss = float(problem.objective(final))
    if not math.isfinite(final_loss) or final_loss > state.best_loss:
        assert state.best_theta is not None
        final, final_loss = state.best_theta.clone(), state.best_loss
    return LoopOutcome(final, final_loss, list(state.history), status, message)


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
