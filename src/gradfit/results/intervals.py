"""Confidence intervals of fitted parameters: profile likelihood (lmfit's ``conf_interval``
convention) and the residual bootstrap.

Profile: for each free parameter, fix it at trial values and refit the others
(``gradfit.fit(..., fixed={name: value})``); the interval's ends are where lmfit's F-test
probability ``F.cdf((χ²/χ²_best - 1)·(N - P)/1; 1, N - P)`` reaches ``level``. Since
``F(1, ν) = t_ν²``, that is where ``χ² = χ²_best·(1 + t²/ν)`` with ``t`` the Student-t
quantile at ``(1 + level)/2``: for a model linear in its parameters the ends are exactly
``value ± t·stderr`` (the covariance scaled by χ²ᵣ). Each end is bracketed by widening steps
from the best fit and found by a safeguarded secant (Illinois) on ``χ²``, written here (no
SciPy at run time).

Bootstrap: ``n`` data sets ``ŷ + σᵢ·r*ᵢ`` with ``r*`` drawn with replacement from the
centred, ``sqrt(N/(N - P))``-inflated standardised residuals (Davison & Hinkley's residual
resampling), all fitted in one ``gradfit.fit_batch`` call; the interval is the percentile
interval of the converged refits.

``gradfit.fitting`` and ``gradfit.batch`` build results, so they are imported on call here.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from gradfit.errors import GradfitError, OptionError
from gradfit.results import stats

if TYPE_CHECKING:
    from gradfit.options import FitOptions
    from gradfit.results.fit_result import FitResult

METHODS = ("profile", "bootstrap")
#: plain least squares: the F-test on χ² and the residual bootstrap assume them
LEAST_SQUARES = ("mse", "sse", "chi2")
#: widening steps while bracketing one end of a profile interval
MAX_BRACKET = 60
#: secant/bisection steps inside a bracket
MAX_ROOT = 100


def confidence_intervals(
    result: FitResult,
    level: float = 0.6827,
    method: str = "profile",
    *,
    n: int = 1000,
    seed: int | None = None,
    options: FitOptions | None = None,
) -> dict[str, tuple[float, float]]:
    """``{name: (lo, hi)}`` for the free parameters of ``result`` at confidence ``level``.

    ``options``: the fit's other options (bounds, optimizer settings) where they were not the
    defaults; the loss, fixed parameters, ``absolute_sigma``, dtype and device are taken from
    ``result``. See the module's docstring for the two methods.
    """
    if method not in METHODS:
        raise OptionError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if not (isinstance(level, int | float) and 0 < level < 1):
        raise OptionError(f"level must be a probability in (0, 1), got {level!r}")
    if result.loss_name not in LEAST_SQUARES:
        raise OptionError(
            f"confidence intervals need a plain least-squares fit (loss mse, sse or chi2), "
            f"not loss {result.loss_name!r}: the F-test on χ² and the residual bootstrap "
            "assume squared residuals"
        )
    if not result.data or result.data.get("y") is None:
        raise OptionError("this result holds no data (a loaded result?); refit to get intervals")
    if not all(math.isfinite(v) for v in result.params.values()):
        raise GradfitError("the fitted parameters are not finite: no confidence interval")
    base = _base_options(result, options)
    if method == "profile":
        return _profile(result, float(level), base)
    if not (isinstance(n, int) and n >= 2):
        raise OptionError(f"n must be an integer >= 2, got {n!r}")
    return _bootstrap(result, float(level), n, seed, base)


def _base_options(result: FitResult, options: FitOptions | None) -> FitOptions:
    from gradfit.options import FitOptions

    fixed = {name: result.params[name] for name in result.fixed}
    base = options if options is not None else FitOptions()
    return base.replace(
        loss=result.loss_name,
        fixed={**fixed, **dict(base.fixed or {})},
        absolute_sigma=result.absolute_sigma,
        dtype=result.covariance.dtype,
        p0=None,
        nan_policy="raise",  # result.data holds the rows that were fitted
    )


def _free_names(result: FitResult, base: FitOptions) -> list[str]:
    fixed = set(base.fixed or {})
    return [name for name in result.param_names if name not in fixed]


# --- profile likelihood --------------------------------------------------------------------


def _profile(result: FitResult, level: float, base: FitOptions) -> dict[str, tuple[float, float]]:
    free = _free_names(result, base)
    nu = result.dof
    if nu < 1:
        raise GradfitError(f"the fit has {nu} degrees of freedom: no F-test, no interval")
    chi2_best = _chi2(result, result.params)
    if not (math.isfinite(chi2_best) and chi2_best > 0):
        raise GradfitError(
            f"χ² of the best fit is {chi2_best}: an exact fit has no profile interval"
        )
    t = stats.student_t_quantile(0.5 + level / 2, nu)
    target = chi2_best * (1 + t * t / nu)  # F.cdf(dchi·ν, 1, ν) = level, with F(1, ν) = t²
    bounds = dict(base.bounds or {})
    out: dict[str, tuple[float, float]] = {}
    for name in free:
        lo_bound, hi_bound = _bound_pair(bounds.get(name))
        profile = _Profile(result, base, name, free, target)
        lo = profile.end(-1, lo_bound)
        hi = profile.end(+1, hi_bound)
        out[name] = (lo, hi)
    return out


def _bound_pair(bound: Any) -> tuple[float, float]:
    if bound is None:
        return -math.inf, math.inf
    lo, hi = bound
    return (-math.inf if lo is None else float(lo)), (math.inf if hi is None else float(hi))


class _Profile:
    """χ²(value) - target along one parameter, the others refitted from the nearest point."""

    def __init__(
        self, result: FitResult, base: FitOptions, name: str, free: list[str], target: float
    ) -> None:
        self.result, self.base, self.name, self.target = result, base, name, target
        self.others_free = len(free) > 1
        best = result.params[name]
        self.best = best
        stderr = result.stderr.get(name)
        self.chi2_best = _chi2(result, result.params)
        t = math.sqrt((target / self.chi2_best - 1) * result.dof)  # the Student-t quantile
        if stderr is not None and math.isfinite(stderr) and stderr > 0:
            self.step = t * stderr  # where a linear model's profile crosses
        else:
            self.step = max(abs(best) * 0.2, 1e-3)  # lmfit's fallback
        self.seen: dict[float, dict[str, float]] = {best: dict(result.params)}

    def __call__(self, value: float) -> float:
        nearest = min(self.seen, key=lambda v: abs(v - value))
        start = {**self.seen[nearest], self.name: value}
        params = self._refit(value, start) if self.others_free else start
        if params is None:
            return math.inf
        chi2 = _chi2(self.result, params)
        if math.isfinite(chi2):
            self.seen[value] = params
            return chi2 - self.target
        return math.inf

    def _refit(self, value: float, start: dict[str, float]) -> dict[str, float] | None:
        from gradfit.fitting.fit import fit
        from gradfit.optim.status import FAILED

        data = self.result.data
        options = self.base.replace(fixed={**dict(self.base.fixed or {}), self.name: value})
        options = options.replace(p0=start)
        try:
            refit = fit(self.result.model, data["x"], data["y"], sigma=data["sigma"],
                        options=options)  # fmt: skip
        except GradfitError:
            return None
        if refit.status in FAILED:
            return None
        return refit.params

    def end(self, direction: int, bound: float) -> float:
        """The end of the interval on the side ``direction`` (the bound if it is inside)."""
        inside, g_inside = self.best, self.chi2_best - self.target  # no refit needed
        step = self.step
        outside, g_outside = math.nan, math.nan
        for _ in range(MAX_BRACKET):
            trial = inside + direction * step
            if (direction > 0 and trial >= bound) or (direction < 0 and trial <= bound):
                trial = bound
            g = self(trial)
            if g >= 0:
                outside, g_outside = trial, g
                break
            if trial == bound:
                return bound  # χ² stays below the level up to the bound
            inside, g_inside = trial, g
            step *= 2
        else:
            return direction * math.inf
        return _illinois(self, inside, g_inside, outside, g_outside, self.step)


def _illinois(
    f: Callable[[float], float], a: float, fa: float, b: float, fb: float, scale: float
) -> float:
    """The root of ``f`` in ``[a, b]`` with ``fa < 0 <= fb``: regula falsi with the Illinois
    modification, bisecting where ``f`` is not finite."""
    xtol = 1e-10 * max(abs(a), abs(b), abs(scale))
    side = 0
    for _ in range(MAX_ROOT):
        if abs(b - a) <= xtol:
            break
        if math.isfinite(fb) and math.isfinite(fa) and fb != fa:
            c = b - fb * (b - a) / (fb - fa)
            if not (min(a, b) < c < max(a, b)):
                c = 0.5 * (a + b)
        else:
            c = 0.5 * (a + b)
        fc = f(c)
        if fc == 0:
            return c
        if fc < 0:
            a, fa = c, fc
            if side == -1:
                fb /= 2
            side = -1
        else:
            b, fb = c, fc
            if side == +1:
                fa /= 2
            side = +1
    # the end where f crosses: interpolate within the final (tiny) bracket
    if math.isfinite(fa) and math.isfinite(fb) and fb != fa:
        return b - fb * (b - a) / (fb - fa)
    return 0.5 * (a + b)


def _chi2(result: FitResult, params: dict[str, float]) -> float:
    """Σ ((f(x) - y)/σ)² at ``params``."""
    data = result.data
    values = result.covariance.new_tensor([params[n] for n in result.param_names])
    with torch.no_grad():
        y_pred = result.model(data["x"], values)
    r = y_pred - data["y"]
    if data.get("sigma") is not None:
        r = r / data["sigma"]
    return float((r * r).sum())


# --- residual bootstrap ---------------------------------------------------------------------


def _bootstrap(
    result: FitResult, level: float, n: int, seed: int | None, base: FitOptions
) -> dict[str, tuple[float, float]]:
    from gradfit.batch.fit_batch import fit_batch

    data = result.data
    x, y, sigma = data["x"], data["y"], data["sigma"]
    if isinstance(x, dict) or y.dim() != 1:
        raise OptionError("the bootstrap needs one independent variable x and y of shape [N]")
    free = _free_names(result, base)
    N = y.shape[0]
    dof = result.dof
    if dof < 1:
        raise GradfitError(f"the fit has {dof} degrees of freedom: no residuals to resample")
    values = result.covariance.new_tensor([result.params[n] for n in result.param_names])
    with torch.no_grad():
        y_hat = result.model(x, values).detach()
    scale = sigma if sigma is not None else torch.ones_like(y)
    r = (y - y_hat) / scale
    r = (r - r.mean()) * math.sqrt(N / dof)
    rng = np.random.default_rng(seed)
    index = torch.as_tensor(rng.integers(0, N, size=(n, N)), device=y.device)
    Y = y_hat + scale * r[index]
    batch_sigma = None if sigma is None else sigma.expand(n, N)
    options = base.replace(p0={name: result.params[name] for name in result.param_names})
    batch = fit_batch(result.model, x, Y, sigma=batch_sigma, options=options)
    ok = batch.converged & torch.isfinite(batch.params).all(-1)
    if int(ok.sum()) < max(2, n // 2):
        raise GradfitError(
            f"only {int(ok.sum())} of {n} bootstrap refits converged: no bootstrap interval"
        )
    params = batch.params[ok].to(torch.float64).cpu().numpy()
    q = [(1 - level) / 2, (1 + level) / 2]
    out: dict[str, tuple[float, float]] = {}
    for name in free:
        column = params[:, batch.param_names.index(name)]
        lo, hi = np.quantile(column, q)
        out[name] = (float(lo), float(hi))
    return out
