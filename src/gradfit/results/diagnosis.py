"""Warnings: why a fit's result may not be trusted, as plain sentences (``FitResult.warnings``).

Not converged (which limit stopped it), parameters the data do not determine or cannot tell
apart (from the SVD of the column-scaled Jacobian, ``stats.Estimability``), a parameter at a
bound, a parameter that ran away by orders of magnitude.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch

from gradfit.results import stats

if TYPE_CHECKING:
    from gradfit.results.fit_result import FitResult

Tensor = torch.Tensor


# A first-order loop without tol always runs to its epoch limit, so the limit alone is no
# alarm: it is one when the loss still had more than this much χ² to fall. With errors scaled
# by χ²ᵣ, Δχ² = dof · Δloss / loss; 0.01 is the parameters a tenth of a standard error away.
STILL_FALLING_CHI2 = 0.01
# A parameter "ran away" when it ends this many times beyond every natural scale of the
# problem: its start, the largest |x| and |y|, and 1/largest |x| (rates). Six decades is no
# rescaling a user meant; Misra1a from ones sends b2 to 2e30.
RAN_AWAY_FACTOR = 1e6


def diagnose(
    result: FitResult, problem: Any, start: list[float], estimability: stats.Estimability
) -> list[str]:
    """The warnings of a finished fit, as plain sentences (empty when all is well)."""
    free = [n for n in result.param_names if n not in result.fixed]
    sentences = [_convergence(result)]
    sentences += _identifiability(result, free, estimability)
    sentences += _bounds(result, problem.space)
    sentences += _ran_away(result, free, start, _data_scale(problem.x, problem.y))
    return [s for s in sentences if s]


def _convergence(result: FitResult) -> str | None:
    status, message = result.status, result.message
    if status == "converged":
        return None
    if status == "max_iter":
        return _limit(result)
    if status in ("interrupted", "diverged", "early_stopped"):  # stopped, not failed
        return f"not converged: {message}"
    return f"fit failed ({status}): {message}"


def _limit(result: FitResult) -> str | None:
    # on demand: optim builds on results (the compiled kernel's statistics), not the reverse
    from gradfit.optim import FIRST_ORDER

    unit = "iteration" if result.optimizer == "lm" else "epoch"
    limit = f"not converged: stopped by the {unit} limit ({result.n_iter} {unit}s)"
    falling = stats.remaining_decrease(result.history)
    if falling is None:  # flat at the end: only a solver with its own tests has missed them,
        # and at a bound LM crawls along the bound's transform at the constrained optimum
        return None if result.optimizer in FIRST_ORDER or result.at_bound else limit
    per_epoch, left = falling
    if result.optimizer in FIRST_ORDER and left * max(result.dof, 1) <= STILL_FALLING_CHI2:
        return None
    more = (
        "with no sign of slowing down"
        if math.isinf(left)
        else f"about {100 * left:.2g}% of the loss still to fall"
    )
    return f"{limit} while the loss was still falling by {per_epoch:.3g} per {unit} ({more})"


def _identifiability(result: FitResult, free: list[str], e: stats.Estimability) -> list[str]:
    no_effect = [n for n, flag in zip(free, e.no_effect.tolist(), strict=True) if flag]
    sentences = [
        f"{n} has no effect on the model at the solution (its derivative is zero at every point)"
        for n in no_effect
    ]
    for group in stats.confounded_groups(e):
        names = [free[i] for i in group]
        if len(names) == 1:
            sentences.append(f"{names[0]} cannot be told apart from the other parameters")
        else:
            sentences.append(
                f"{_join(names)} cannot be told apart: the data determine only a combination "
                "of them"
            )
    missing = [n for n in free if result.stderr[n] is None]
    if missing and result.dof <= 0 and not result.absolute_sigma:
        sentences.append(
            f"covariance not estimable: {result.n_points} points leave no degrees of freedom "
            f"for {len(free)} free parameters; no standard errors"
        )
    elif missing:
        sentences.append(
            f"covariance not estimable for {_join(missing)}: the data do not determine "
            f"{'it' if len(missing) == 1 else 'them'}, so no standard error is given"
        )
    return sentences


def _bounds(result: FitResult, space: Any) -> list[str]:
    sentences = []
    for name in result.at_bound:
        i, value = space.names.index(name), result.params[name]
        side, bound = min(
            (("lower", space.lower[i]), ("upper", space.upper[i])),
            key=lambda b: math.inf if b[1] is None else abs(value - b[1]),
        )
        sentences.append(
            f"{name} = {value:.6g} is at its {side} bound {bound:g}: the best fit may lie "
            "beyond it, and its standard error assumes it does not"
        )
    return sentences


def _ran_away(result: FitResult, free: list[str], start: list[float], scale: float) -> list[str]:
    sentences = []
    for name in free:
        value, begin = result.params[name], start[result.param_names.index(name)]
        if abs(value) > RAN_AWAY_FACTOR * max(abs(begin), scale):
            sentences.append(
                f"{name} ran away to {value:.3g} from its start {begin:.3g}, over a million "
                "times the start and the data's magnitudes; try a start nearer the answer "
                "or a bound"
            )
    return sentences


def _data_scale(x: Any, y: Tensor) -> float:
    """The largest of 1, max |x|, max |y| and 1 / max |x|: magnitudes a parameter may take."""
    columns = list(x.values()) if isinstance(x, dict) else [x]
    largest_x = max(float(c.abs().max()) for c in columns) if columns else 0.0
    scale = max(1.0, largest_x, float(y.abs().max()))
    return max(scale, 1 / largest_x) if largest_x > 0 else scale


def _join(names: list[str]) -> str:
    """``a``, ``a and b``, ``a, b and c``."""
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"
