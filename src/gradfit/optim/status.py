"""Why a fit stopped: one status vocabulary for ``fit``, ``fit_batch`` and ``fit-many``, and
the stopping tests the single-fit loops share (the post's loop and LBFGS).

Plain Python, no torch: the CLI reads ``FAILED`` to choose its exit code.
"""

from __future__ import annotations

#: Why a fit stopped. The ``message`` beside a status says more and never repeats the status
#: word.
STATUSES = {
    "converged": "a convergence test passed (tol; LM: ftol, xtol or gtol)",
    "max_iter": "the epoch (LM: iteration) limit stopped it before any convergence test passed",
    "diverged": "the loss became non-finite; the best parameters seen are kept",
    "interrupted": "the hook (a signal, a callback) asked it to stop",
    "early_stopped": "mini-batch training with validation: `patience` epochs passed without a "
    "better validation loss; the parameters with the best one are kept (not converged: the "
    "training loss may still fall)",
    "singular": "LM could not solve its damped normal equations even at the largest damping",
    "non_finite": "the residuals or Jacobian were not finite at the start",
    "too_few_points": "fewer valid points than free parameters (fit_batch: no fit)",
    "no_data": "no valid points at all (fit_batch, fit-many: no fit)",
}
FAILED = ("diverged", "singular", "non_finite")  # no answer to trust: the CLI exits 3


def small_change(history: list[float], tol: float | None) -> bool:
    """The ``tol`` test: the last epoch changed the loss by at most ``tol`` relatively."""
    if tol is None or tol < 0 or len(history) < 2:
        return False
    previous, current = history[-2], history[-1]
    return abs(previous - current) <= tol * max(abs(previous), 1e-300)


def diverged_message(epoch: int, loss: float) -> str:
    """The message beside ``"diverged"``: what happened and what to try."""
    return (
        f"loss became {loss} at epoch {epoch}; kept the best parameters seen. "
        "Try a smaller learning rate (--lr) or another optimizer (lm, lbfgs, adam)"
    )
