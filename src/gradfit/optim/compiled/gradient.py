"""The least-squares loss and its gradient for first-order fits, from the compiled interpreter.

``gd``, ``sgd`` and ``adam`` take thousands of steps of microseconds each: an autograd tape
(or even PyTorch's evaluation of the symbolic program, ~20 small operations) costs more
than the arithmetic. For an expression model of one variable in float64 on the CPU, without
bounds, one native call evaluates the program at the points (``interpreter.run``) and
returns the loss and its gradient 2/N·Jᵀr (mean) or 2·Jᵀr (sum). Nothing is generated from
the user's text: the program is data for the fixed, disk-cached interpreter.

A float32 fit gets the same computation in float64, rounded to float32 at the end: its
digits differ from autograd's float32 ones by float32 rounding (they are the more exact).
"""

from __future__ import annotations

from collections.abc import Callable

import numba
import numpy as np
import torch

from gradfit.optim.compiled import bridge
from gradfit.optim.compiled.bridge import _array, _codes
from gradfit.optim.compiled.interpreter import JIT, PER_CURVE, PER_POINT, SCALAR, run
from gradfit.optim.problem import Problem

Tensor = torch.Tensor


def squares_gradient(problem: Problem, mean: bool) -> Callable[[Tensor], Tensor] | None:
    """``theta -> loss`` (a 0-d tensor) that sets ``theta.grad``, or None where this path
    does not apply (``first_order.symbolic_loss`` then uses PyTorch's symbolic rows).

    ``problem.x`` is the model's one variable as a tensor (``dispatch.one_variable``).
    The loss and the gradient live in one buffer that each call overwrites: a caller reads
    them before the next call (the loop reads ``.item()`` and updates at once).
    """
    y, x, sigma, space = problem.y, problem.x, problem.loss.sigma, problem.space
    if (
        not bridge.ENABLED
        or not isinstance(x, Tensor)
        or y.dtype not in (torch.float32, torch.float64)
        or y.device.type != "cpu"
        or y.dim() != 1
        or tuple(x.shape) != tuple(y.shape)
        or any(b is not None for b in space.lower + space.upper)
    ):
        return None
    codes = _codes(problem.model)
    if codes is None:
        return None
    op, a, b, c, rate, outputs = full = codes[1].arrays
    N, F = y.shape[0], len(space.free)
    x_a, y_a = _array(x), _array(y)
    s_a = _array(torch.broadcast_to(sigma, y.shape)) if sigma is not None else np.ones(0)
    params = np.array([np.nan if v is None else v for v in space.fixed], dtype=np.float64)
    free = np.array(space.free, dtype=np.int64)
    S = full[0].shape[0]
    scalars, points = np.empty(S), np.empty((S, N))
    run(full, PER_CURVE, x_a, N, params, (scalars, points))  # x's own steps, once
    out = np.empty(F + 1)
    out_t = torch.from_numpy(out)
    rounded = out_t if y.dtype == torch.float64 else torch.empty(F + 1, dtype=y.dtype)
    grad, loss = rounded[:F], rounded[F]
    scale = 2.0 / N if mean else 2.0

    def value_and_gradient(theta: Tensor) -> Tensor:
        params[free] = theta.detach().numpy()
        _loss_and_gradient(op, a, b, c, rate, outputs, scalars, points, x_a, y_a, s_a, params,
                           free, scale, out)  # fmt: skip
        if rounded is not out_t:
            rounded.copy_(out_t)
        # as backward(): a gradient already there is added to
        theta.grad = grad if theta.grad is None else theta.grad + grad
        return loss

    return value_and_gradient


@numba.njit(**JIT)
def _loss_and_gradient(
    op: np.ndarray, a: np.ndarray, b: np.ndarray, c: np.ndarray, rate: np.ndarray,
    outputs: np.ndarray, scalars: np.ndarray, points: np.ndarray, x: np.ndarray, y: np.ndarray,
    sigma: np.ndarray, params: np.ndarray, free: np.ndarray, scale: float, out: np.ndarray,
) -> None:  # fmt: skip
    """``out = [scale·Jᵀr, Σr²·scale/2]`` with r = (f - y)/sigma at ``params``; flat arguments:
    a tuple argument costs a Python-side type check per call."""
    code = (op, a, b, c, rate, outputs)
    n = y.shape[0]
    run(code, PER_POINT, x, n, params, (scalars, points))
    has_sigma = sigma.shape[0] > 0
    r = np.empty(n)
    value = outputs[0]
    total = 0.0
    for i in range(n):
        f = scalars[value] if rate[value] == SCALAR else points[value, i]
        r[i] = (f - y[i]) / sigma[i] if has_sigma else f - y[i]
        total += r[i] * r[i]
    F = free.shape[0]
    for j in range(F):
        slot = outputs[1 + free[j]]
        acc = 0.0
        if rate[slot] == SCALAR:
            for i in range(n):
                acc += r[i] / sigma[i] if has_sigma else r[i]
            acc *= scalars[slot]
        else:
            column = points[slot]
            for i in range(n):
                acc += r[i] * column[i] / sigma[i] if has_sigma else r[i] * column[i]
        out[j] = scale * acc
    out[F] = 0.5 * scale * total
