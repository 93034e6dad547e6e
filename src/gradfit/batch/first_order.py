"""Many curves with the post's first-order loop (gd, sgd, adam): a leading curve axis.

Curves never interact: curve k's loss depends on its own parameters only, so one backward
pass of the summed per-curve losses gives every curve its own gradient, and the elementwise
updates move each curve as ``gradfit.fit`` would move it alone.  As ``loop.run_loop`` does
for one fit, each curve keeps its best parameters, stops on its own relative loss change
(``tol``) or on a non-finite loss, and then stops changing; at the end its last update is
scored and kept only if it is no worse than the best.
"""

from __future__ import annotations

import math

import torch

from gradfit.optim import FIRST_ORDER
from gradfit.optim.backward import backward
from gradfit.optim.lm import LMStatus
from gradfit.optim.problem import Problem
from gradfit.results.batch_result import DIVERGED

Tensor = torch.Tensor


def curve_losses(problem: Problem, theta: Tensor, mask: Tensor, n_valid: Tensor) -> Tensor:
    """``[K]``: each curve's loss over its valid points (the mean or sum ``fit`` minimises)."""
    loss = problem.loss
    r = problem.model(problem.x, problem.space.to_params(theta)) - problem.y
    if loss.sigma is not None:
        r = r / loss.sigma
    # masked points may hold anything: zero them before the loss so no NaN reaches a gradient
    values = torch.where(mask, loss.pointwise(torch.where(mask, r, 0.0)), 0.0).sum(-1)
    return values / n_valid.clamp_min(1) if loss.reduction == "mean" else values


def fit_first_order(
    problem: Problem,
    theta0: Tensor,
    mask: Tensor,
    optimizer: str,
    lr: float,
    epochs: int,
    tol: float | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Run ``optimizer`` on every curve: (theta ``[K, F]``, loss, epochs done, status codes)."""
    K = theta0.shape[0]
    n_valid = mask.sum(-1)
    step = FIRST_ORDER[optimizer](lr=lr)
    theta = theta0.detach().clone().requires_grad_(True)
    state = step.init(theta)
    running = torch.ones(K, dtype=torch.bool, device=theta.device)
    status = torch.full((K,), int(LMStatus.MAX_ITER), device=theta.device)
    done = torch.zeros(K, dtype=torch.int64, device=theta.device)
    best_loss = torch.full((K,), math.inf, dtype=theta.dtype, device=theta.device)
    best_theta = theta.detach().clone()
    previous = torch.full_like(best_loss, math.nan)
    for _ in range(epochs):
        if not bool(running.any()):
            break
        before = theta.detach().clone()  # the parameters this epoch's losses belong to
        saved = {name: value.clone() for name, value in state.items() if value.dim() > 0}
        losses = curve_losses(problem, theta, mask, n_valid)
        backward(losses.sum())  # each curve's gradient lands in its own row of theta.grad
        step.update(theta, theta.grad, state)
        theta.grad = None
        stopped = ~running.unsqueeze(-1)  # curves that stopped earlier keep everything
        theta.data.copy_(torch.where(stopped, before, theta.data))
        for name, value in saved.items():  # per-parameter optimizer state (shared step count)
            state[name].copy_(torch.where(stopped, value, state[name]))
        loss = losses.detach()
        ok = running & torch.isfinite(loss)
        status = torch.where(running & ~ok, DIVERGED, status)
        better = ok & (loss < best_loss)
        best_loss = torch.where(better, loss, best_loss)
        best_theta = torch.where(better.unsqueeze(-1), before, best_theta)
        done += ok
        if tol is not None and tol >= 0:
            change = (previous - loss).abs() <= tol * previous.abs().clamp_min(1e-300)
            converged = ok & (done >= 2) & change
            status = torch.where(converged, int(LMStatus.FTOL), status)
            ok &= ~converged
        previous = torch.where(running, loss, previous)
        running = ok
    with torch.no_grad():  # the last update was never scored: keep it only if no worse
        final = theta.detach()
        final_loss = curve_losses(problem, final, mask, n_valid)
    keep_best = ~torch.isfinite(final_loss) | (final_loss > best_loss)
    theta_out = torch.where(keep_best.unsqueeze(-1), best_theta, final)
    loss_out = torch.where(keep_best, best_loss, final_loss)
    return theta_out, loss_out, done, status
