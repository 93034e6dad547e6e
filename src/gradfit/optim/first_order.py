"""First-order steps as small ``init``/``update`` pairs (optax's shape), updating in place.

Updates write through ``params.data`` as the post does: cheaper than a ``no_grad`` context
in a loop whose steps take microseconds.

``gd`` is the post's update verbatim: ``params -= lr * grad``. The state is a plain
dict of tensors, so checkpoints can save and restore it exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

Tensor = torch.Tensor
State = dict[str, Tensor]


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
