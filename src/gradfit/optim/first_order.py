"""First-order steps as small ``init``/``update`` pairs (optax's shape), updating in place.

Updates write through ``params.data`` as the post does: cheaper than a ``no_grad`` context
in a loop whose steps take microseconds.

``gd`` is the post's update verbatim: ``params -= lr * grad``. The state is a plain
dict of tensors, so checkpoints can save and restore it exactly.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from gradfit.optim.problem import Problem

Tensor = torch.Tensor
State = dict[str, Tensor]
#: the named losses whose gradient is 2·Jᵀr over N (a mean) or 1 (a sum)
_SQUARES = ("mse", "sse", "chi2")


def symbolic_loss(problem: Problem) -> Callable[[Tensor], Tensor] | None:
    """``theta -> loss`` that also sets ``theta.grad`` from the model's symbolic Jacobian,
    with no autograd tape: ``objective(theta)`` followed by ``backward`` for an expression
    model (one variable or several, bounds and fixed parameters through the chain rule, sigma)
    with a plain least-squares loss; None for anything else (keep autograd).

    For ``mse`` the gradient is 2/N·Jᵀr. One variable, no bounds, float32/64 on the CPU:
    one native call (``compiled/gradient.py``, ~20x faster per step than the post's step);
    otherwise one program run gives r and J (residual_functions' stacked rows ``[J; r]``)
    and one matrix-vector product Jᵀr and rᵀr together. Digits differ from autograd's by
    rounding only. A loop calls it in place of ``objective`` and ``backward``.

    Example:
        >>> from gradfit.model.losses import get_loss
        >>> from gradfit.model.models import as_model
        >>> from gradfit.model.parameters import ParameterSpace
        >>> from gradfit.optim.problem import Problem
        >>> m = as_model("a*x + b")
        >>> x = torch.tensor([0.0, 1.0, 2.0], dtype=torch.float64)
        >>> space = ParameterSpace.build(m.param_names, None, None)
        >>> loss = symbolic_loss(Problem(m, x, 2 * x + 1, get_loss("mse"), space))
        >>> theta = torch.zeros(2, dtype=torch.float64, requires_grad=True)
        >>> round(float(loss(theta)), 12), theta.grad.tolist()
        (11.666666666667, [-8.666666666666666, -6.0])
    """
    # imported here: optim's __init__ imports this module, and those modules import optim
    from gradfit.optim import compiled_lm
    from gradfit.optim.dispatch import one_variable
    from gradfit.optim.least_squares import residual_functions

    loss = problem.loss
    if problem.model.programs is None or loss.name not in _SQUARES or loss.custom is not None:
        return None
    mean = loss.reduction == "mean"
    # GRADFIT_COMPILED=0 keeps PyTorch, as for LM (read at each call, before importing Numba)
    native_allowed = os.environ.get("GRADFIT_COMPILED", "1") != "0"
    if native_allowed and compiled_lm() is not None:  # one native call per step
        from gradfit.optim.compiled.gradient import squares_gradient

        native = squares_gradient(one_variable(problem), mean)
        if native is not None:
            return native
    _, stacked = residual_functions(problem)
    if stacked is None:
        return None
    n_points = problem.y.shape[-1]
    scale = 2.0 / n_points if mean else 2.0

    def value_and_gradient(theta: Tensor) -> Tensor:
        with torch.no_grad():
            rows = stacked(theta.detach().unsqueeze(0))[0]  # (F + 1, N): [J; r]
            products = torch.mv(rows, rows[-1])  # [Jᵀr; rᵀr]
            grad = products[:-1] * scale
            theta.grad = grad if theta.grad is None else theta.grad + grad  # as backward()
            total = products[-1]
            return total / n_points if mean else total

    return value_and_gradient


@dataclass(frozen=True)
class GradientDescent:
    """The post's plain gradient descent: ``params -= lr * grad``.

    Example:
        >>> p = torch.tensor([1.0]); step = GradientDescent(lr=0.5)
        >>> _ = step.update(p, torch.tensor([2.0]), step.init(p)); p.tolist()
        [0.0]
    """

    lr: float = 1e-3
    name: str = "gd"

    def init(self, params: Tensor) -> State:
        return {}

    def update(self, params: Tensor, grad: Tensor, state: State) -> State:
        params.data -= self.lr * grad  # exactly the post's `params.data -= lr * params.grad.data`
        return state


@dataclass(frozen=True)
class Momentum:
    """Gradient descent with (heavy-ball) momentum, as ``torch.optim.SGD(momentum=...)``."""

    lr: float = 1e-3
    momentum: float = 0.9
    name: str = "sgd"

    def init(self, params: Tensor) -> State:
        return {"velocity": torch.zeros_like(params), "step": torch.zeros((), dtype=torch.int64)}

    def update(self, params: Tensor, grad: Tensor, state: State) -> State:
        velocity = state["velocity"]
        if int(state["step"]) == 0:  # torch.optim.SGD starts the buffer at the first gradient
            velocity.copy_(grad)
        else:
            velocity.mul_(self.momentum).add_(grad)
        state["step"] += 1
        params.data.sub_(velocity, alpha=self.lr)  # .data: an update, not part of the graph
        return state


@dataclass(frozen=True)
class Adam:
    """Adam (Kingma & Ba), written as ``torch.optim.Adam`` computes it."""

    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    name: str = "adam"

    def init(self, params: Tensor) -> State:
        return {
            "m": torch.zeros_like(params),
            "v": torch.zeros_like(params),
            "step": torch.zeros((), dtype=torch.int64),
        }

    def update(self, params: Tensor, grad: Tensor, state: State) -> State:
        beta1, beta2 = self.betas
        state["step"] += 1
        t = int(state["step"])
        state["m"].lerp_(grad, 1 - beta1)
        state["v"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        step_size = self.lr / (1 - beta1**t)
        denom = (state["v"].sqrt() / math.sqrt(1 - beta2**t)).add_(self.eps)
        params.data.addcdiv_(state["m"], denom, value=-step_size)
        return state
