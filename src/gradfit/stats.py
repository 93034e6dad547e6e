"""Fit statistics: covariance, standard errors, correlation, χ², R², AIC/BIC, bands.

Everything is batched over leading dimensions (``[..., N, P]`` Jacobians), so one fit and
a million fits share the code. Conventions follow SciPy's ``curve_fit`` (covariance scaled
by the reduced χ² unless ``absolute_sigma``) and lmfit (AIC/BIC from χ²).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

Tensor = torch.Tensor


Array = Tensor | np.ndarray  # NumPy for one small fit on the CPU: a tenth of torch's per-op cost


def _xp(a: Array) -> Any:
    """The array namespace of ``a``: numpy or torch (both spell these operations alike)."""
    return torch if isinstance(a, Tensor) else np


def _finfo(a: Array) -> Any:
    return torch.finfo(a.dtype) if isinstance(a, Tensor) else np.finfo(a.dtype)


def _at_least(a: Array, low: float) -> Array:
    return a.clamp_min(low) if isinstance(a, Tensor) else np.maximum(a, low)


def _quiet(fn: Callable[..., Any]) -> Callable[..., Any]:
    """NumPy warns where torch silently gives inf or NaN (inf * 0, 1 / 0): same results."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with np.errstate(all="ignore"):
            return fn(*args, **kwargs)

    return wrapper


@_quiet
def covariance(J: Array, scale: Array | float = 1.0) -> Array:
    """``scale · (JᵀJ)⁻¹`` via the SVD of ``J`` ``[..., N, P]``; inf where ``J`` is rank-deficient.

    Example:
        >>> J = torch.tensor([[1.0, 0.0], [1.0, 1.0], [1.0, 2.0]], dtype=torch.float64)
        >>> covariance(J).diagonal().round(decimals=12).tolist()  # (JᵀJ)⁻¹ of a line design
        [0.833333333333, 0.5]
    """
    xp = _xp(J)
    _, s, vh = xp.linalg.svd(J, full_matrices=False)  # s (..., P), vh (..., P, P)
    eps = _finfo(J).eps * max(J.shape[-2:])
    singular = (s <= eps * s[..., :1]).any(-1) | ~xp.isfinite(s).all(-1)
    inv_s2 = xp.where(s > 0, 1 / _at_least(s * s, _finfo(J).tiny), xp.inf)
    cov = (vh.mT * inv_s2[..., None, :]) @ vh  # V diag(1/s²) Vᵀ
    if not isinstance(scale, int | float):  # per fit: broadcast over the matrices
        scale = scale[..., None, None]
    cov = cov * scale
    return xp.where(singular[..., None, None], xp.inf, cov)


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
    return xp.where(finite, cov / xp.where(finite, outer, 1.0), xp.nan)


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
