"""Fit statistics: covariance, standard errors, correlation, χ², R², AIC/BIC, bands.

Everything is batched over leading dimensions (``[..., N, P]`` Jacobians), so one fit and
a million fits share the code. Conventions follow SciPy's ``curve_fit`` (covariance scaled
by the reduced χ² unless ``absolute_sigma``) and lmfit (AIC/BIC from χ²).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ParamSpec, TypeVar, cast

import numpy as np
import torch

Tensor = torch.Tensor


Array = Tensor | np.ndarray  # NumPy for one small fit on the CPU: a tenth of torch's per-op cost
#: an array of either kind, the same kind out as in
ArrayT = TypeVar("ArrayT", Tensor, np.ndarray)


def _xp(a: Array) -> Any:
    """The array namespace of ``a``: numpy or torch (both spell these operations alike)."""
    return torch if isinstance(a, Tensor) else np


def _finfo(a: Array) -> Any:
    return torch.finfo(a.dtype) if isinstance(a, Tensor) else np.finfo(a.dtype)


def _at_least(a: Array, low: float) -> Array:
    return a.clamp_min(low) if isinstance(a, Tensor) else np.maximum(a, low)


_P = ParamSpec("_P")
_R = TypeVar("_R")


def _quiet(fn: Callable[_P, _R]) -> Callable[_P, _R]:
    """NumPy warns where torch silently gives inf or NaN (inf * 0, 1 / 0): same results."""

    @functools.wraps(fn)
    def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        with np.errstate(all="ignore"):
            return fn(*args, **kwargs)

    return wrapper


def estimability_tolerance(dtype: Any) -> float:
    """``tau``: the least share of a parameter's Jacobian column that must lie outside the span
    of the other columns (column-scaled) for its standard error to mean anything.

    ``10·sqrt(eps)`` (1.5e-7 in float64, 3.5e-3 in float32): the Levenberg–Marquardt kernels and
    ``fit_batch``'s errors work with ``JᵀJ``, which squares that share, so below ``tau`` the
    normal-equation pivot of the parameter holds under 100 ulps of signal and its variance has
    no correct second digit; the fitted value along that direction is rounding as well. The
    27 NIST StRD problems at their certified solutions stay above 3.9e-5 (Bennett5).
    """
    eps = torch.finfo(dtype).eps if isinstance(dtype, torch.dtype) else np.finfo(dtype).eps
    return 10 * math.sqrt(eps)


def max_variance_inflation(dtype: Any) -> float:
    """``1/tau²``: the largest variance inflation (diagonal of the column-scaled ``(JᵀJ)⁻¹``)
    of an estimable parameter; see ``estimability_tolerance``."""
    return estimability_tolerance(dtype) ** -2


@dataclass
class Estimability:
    """What the SVD of the column-scaled Jacobian says about which parameters the data fix.

    ``covariance``: ``(JᵀJ)⁻¹`` over the resolved directions, NaN in the rows and columns of
    parameters that are not estimable; ``estimable``, ``no_effect`` ``[..., P]``: the parameter
    is determined / its Jacobian column is zero (or not finite); ``singular_values`` (relative
    to the largest) and ``vh`` (rows: right singular vectors) for naming confounded groups.
    """

    covariance: Array  # [..., P, P]
    estimable: Array  # [..., P] bool
    no_effect: Array  # [..., P] bool
    singular_values: Array  # [..., P], relative to the largest
    vh: Array  # [..., P, P]


@_quiet
def estimability(J: Array) -> Estimability:
    """Column-scale ``J`` ``[..., N, P]`` (units drop out), take its SVD, and decide per
    parameter whether the data determine it.

    A parameter is not estimable when its variance inflation exceeds ``1/tau²`` (see
    ``estimability_tolerance``) or when it has a share above ``tau`` in a direction whose
    singular value is rounding (below ``eps·max(N, P)`` of the largest, NumPy's rank cut-off):
    exact rank deficiency gives such directions noise for singular values, so they are dropped
    from the covariance rather than inverted.

    Example:
        >>> x = torch.linspace(0, 1, 5, dtype=torch.float64)
        >>> J = torch.stack([x, x, torch.ones_like(x)], dim=1)  # a*b*x + c at a = b = 1
        >>> estimability(J).estimable.tolist()
        [False, False, True]
    """
    xp, info = _xp(J), _finfo(J)
    tau = estimability_tolerance(J.dtype)
    norms = (J * J).sum(-2) ** 0.5  # [..., P]
    usable = xp.isfinite(norms) & (norms > 0)
    safe = xp.where(usable, norms, 1.0)
    Js = xp.where(usable[..., None, :], J / safe[..., None, :], 0.0)
    _, s, vh = xp.linalg.svd(Js, full_matrices=False)
    relative = s / _at_least(s[..., :1], info.tiny)
    resolved = relative > info.eps * max(J.shape[-2:])
    inv_s2 = xp.where(resolved, 1 / _at_least(s * s, info.tiny), 0.0)
    unit = (vh.mT * inv_s2[..., None, :]) @ vh  # V diag(1/s²) Vᵀ over resolved directions
    inflation = xp.diagonal(unit, 0, -2, -1)
    unresolved_share = ((vh * vh) * ~resolved[..., :, None]).sum(-2)  # Σ over those directions
    estimable = usable & (inflation <= tau**-2) & (unresolved_share <= tau * tau)
    cov = unit / (safe[..., :, None] * safe[..., None, :])
    both = estimable[..., :, None] & estimable[..., None, :]
    cov = xp.where(both, cov, xp.nan)
    return Estimability(cov, estimable, ~usable, relative, vh)


def confounded_groups(e: Estimability, share: float = 0.1) -> list[tuple[int, ...]]:
    """One fit: the groups of parameters that cannot be told apart (indices, ascending).

    Each small direction (relative singular value below ``tau·sqrt(P)``, which every parameter
    that is not estimable has weight in) names the non-estimable parameters whose component
    is at least ``share`` of its largest: they move together along it; groups that share a
    parameter merge. Parameters without effect (zero columns) are reported on their own.
    """
    estimable, no_effect = _as_list(e.estimable), _as_list(e.no_effect)
    flagged = [not ok and not none for ok, none in zip(estimable, no_effect, strict=True)]
    if not any(flagged):
        return []
    P = len(flagged)
    small = math.sqrt(P) * estimability_tolerance(e.vh.dtype)
    groups: list[set[int]] = []
    for k, relative in enumerate(_as_list(e.singular_values)):
        if not relative < small:
            continue
        weights = [abs(v) if f else 0.0 for v, f in zip(_as_list(e.vh[k]), flagged, strict=True)]
        top = max(weights)
        if top > 0:
            groups = _merge(groups, {i for i, w in enumerate(weights) if w >= share * top})
    for i in (i for i in range(P) if flagged[i] and not any(i in g for g in groups)):
        groups.append({i})
    return sorted(tuple(sorted(g)) for g in groups)


def _merge(groups: list[set[int]], new: set[int]) -> list[set[int]]:
    keep = [g for g in groups if not g & new]
    return [*keep, new.union(*(g for g in groups if g & new))]


def _as_list(a: Array) -> list[Any]:
    return a.tolist()


def estimable_variance(variance: ArrayT, normal_diagonal: ArrayT) -> ArrayT:
    """``fit_batch``: NaN where ``variance`` (diagonal of ``(JᵀJ)⁻¹`` ``[..., P]``) inflates a
    parameter beyond ``1/tau²`` (``variance · (JᵀJ)_ii``, the column-scaled diagonal), i.e.
    where the normal matrix is numerically singular in that parameter's direction."""
    xp = _xp(variance)
    inflation = variance * normal_diagonal
    ok = (variance > 0) & (inflation <= max_variance_inflation(variance.dtype))
    return cast(ArrayT, xp.where(ok, variance, xp.nan))


@_quiet
def covariance(J: Array, scale: Array | float = 1.0) -> Array:
    """``scale · (JᵀJ)⁻¹`` via the SVD of the column-scaled ``J`` ``[..., N, P]``; NaN in the
    rows and columns of parameters that are not estimable (see ``estimability``).

    Example:
        >>> J = torch.tensor([[1.0, 0.0], [1.0, 1.0], [1.0, 2.0]], dtype=torch.float64)
        >>> covariance(J).diagonal().round(decimals=12).tolist()  # (JᵀJ)⁻¹ of a line design
        [0.833333333333, 0.5]
    """
    return scaled(estimability(J).covariance, scale)


def scaled(cov: Array, scale: Array | float) -> Array:
    """``scale · cov``, one scale per matrix when ``scale`` is an array."""
    if not isinstance(scale, int | float):  # per fit: broadcast over the matrices
        scale = scale[..., None, None]
    return cov * scale


def stderr_from(cov: Array) -> Array:
    """Standard errors: the square roots of the covariance diagonal."""
    return _at_least(_xp(cov).diagonal(cov, 0, -2, -1), 0) ** 0.5


@_quiet
def correlation(cov: Array) -> Array:
    """Correlation matrix from a covariance matrix (NaN where a variance is 0 or inf)."""
    xp = _xp(cov)
    sd = stderr_from(cov)
    outer = sd[..., :, None] * sd[..., None, :]
    finite = xp.isfinite(outer) & (outer > 0)
    return cast(Array, xp.where(finite, cov / xp.where(finite, outer, 1.0), xp.nan))


@_quiet
def goodness(
    y: Array, y_pred: Array, weighted_residuals: Array, n_params: int, mask: Array | None = None
) -> dict[str, Array]:
    """χ², dof, reduced χ², R², AIC and BIC over the last dimension (points).

    ``weighted_residuals`` are ``(y_pred - y)/sigma`` (or unweighted without sigma).
    """
    xp = _xp(y)

    def masked_sum(values: Array) -> Array:
        return (values if mask is None else xp.where(mask, values, 0.0)).sum(-1)

    n = xp.zeros_like(y[..., 0]) + (y.shape[-1] if mask is None else mask.sum(-1))
    chi2 = masked_sum(weighted_residuals**2)
    dof = n - n_params
    y_mean = masked_sum(y)[..., None] / _at_least(n[..., None], 1)
    ss_tot = masked_sum((y - y_mean) ** 2)
    ss_res = masked_sum((y - y_pred) ** 2)
    log_term = n * xp.log(_at_least(chi2, _finfo(y).tiny) / _at_least(n, 1))
    return {
        "n_points": n,
        "dof": dof,
        "chi2": chi2,
        "reduced_chi2": xp.where(dof > 0, chi2 / _at_least(dof, 1), xp.nan),
        "r2": xp.where(ss_tot > 0, 1 - ss_res / _at_least(ss_tot, 1e-300), xp.nan),
        "aic": log_term + 2 * n_params,
        "bic": log_term + xp.log(_at_least(n, 1)) * n_params,
    }


def remaining_decrease(history: list[float]) -> tuple[float, float] | None:
    """How fast the loss was still falling when the loop stopped, and how much more it would
    fall: ``(fall per epoch, remaining fall relative to the loss)``; None when it had stopped
    falling.

    The last two tenths of the history give two drops, ``d1`` then ``d2``; a loss that falls
    geometrically has ``d2²/(d1 - d2)`` left (Aitken's extrapolation), one that does not slow
    down (``d2 >= d1``) has an unknown amount left: inf.

    Example:
        >>> history = [1 + 0.99**t for t in range(1000)]  # approaches 1 geometrically
        >>> per_epoch, left = remaining_decrease(history)
        >>> f"{per_epoch:.2e} {left:.2e}"  # 0.99**999 = 4.4e-05 was left
        '7.55e-07 4.36e-05'
    """
    window = len(history) // 10
    if window < 1:
        return None
    last, middle, first = history[-1], history[-1 - window], history[-1 - 2 * window]
    d1, d2 = first - middle, middle - last
    if not d2 > 0:
        return None
    left = d2 * d2 / (d1 - d2) if d1 > d2 else math.inf
    return d2 / window, left / max(abs(last), 1e-300)


def student_t_quantile(p: float, dof: float) -> float:
    """Quantile of Student's t distribution (bisection on the CDF; no SciPy at run time).

    Example:
        >>> round(student_t_quantile(0.975, 10), 4)
        2.2281
    """
    if not 0 < p < 1:
        raise ValueError(f"p must be in (0, 1), got {p}")
    if dof <= 0 or not math.isfinite(dof):
        return _normal_quantile(p)
    lo, hi = -1.0, 1.0
    while _t_cdf(lo, dof) > p:
        lo *= 2
    while _t_cdf(hi, dof) < p:
        hi *= 2
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if _t_cdf(mid, dof) < p else (lo, mid)
        if hi - lo <= 1e-13 * max(1.0, abs(mid)):
            break
    return 0.5 * (lo + hi)


def _normal_quantile(p: float) -> float:
    return float(torch.special.ndtri(torch.tensor(p, dtype=torch.float64)))


def _t_cdf(t: float, dof: float) -> float:
    x = dof / (dof + t * t)
    tail = 0.5 * _betainc(dof / 2, 0.5, x)
    return 1 - tail if t > 0 else tail


def _betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta I_x(a, b) by Lentz's continued fraction."""
    if x <= 0:
        return 0.0
    if x >= 1:
        return 1.0
    log_front = (
        math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    )
    if x > (a + 1) / (a + b + 2):  # the fraction converges fast only below this point
        return 1 - _betainc(b, a, 1 - x)
    tiny = 1e-300
    c, d = 1.0, 1 - (a + b) * x / (a + 1)
    d = 1 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        for numerator in (
            m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),
        ):
            d = 1 + numerator * d
            d = 1 / (d if abs(d) > tiny else tiny)
            c = 1 + numerator / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1) < 1e-15:
            break
    return math.exp(log_front) * h / a
