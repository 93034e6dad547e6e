"""Fit statistics: covariance, standard errors, correlation, χ², R², AIC/BIC, bands.

Everything is batched over leading dimensions (``[..., N, P]`` Jacobians), so one fit and
a million fits share the code. Conventions follow SciPy's ``curve_fit`` (covariance scaled
by the reduced χ² unless ``absolute_sigma``) and lmfit (AIC/BIC from χ²).
"""

from __future__ import annotations

import math

import torch

Tensor = torch.Tensor


def covariance(J: Tensor, scale: Tensor | float = 1.0) -> Tensor:
    """``scale · (JᵀJ)⁻¹`` via the SVD of ``J`` ``[..., N, P]``; inf where ``J`` is rank-deficient.

    Example:
        >>> J = torch.tensor([[1.0, 0.0], [1.0, 1.0], [1.0, 2.0]], dtype=torch.float64)
        >>> covariance(J).diagonal().round(decimals=12).tolist()  # (JᵀJ)⁻¹ of a line design
        [0.833333333333, 0.5]
    """
    _, s, vh = torch.linalg.svd(J, full_matrices=False)  # s (..., P), vh (..., P, P)
    eps = torch.finfo(J.dtype).eps * max(J.shape[-2:])
    singular = (s <= eps * s[..., :1]).any(-1) | ~torch.isfinite(s).all(-1)
    inv_s2 = torch.where(s > 0, 1 / (s * s).clamp_min(torch.finfo(J.dtype).tiny), torch.inf)
    cov = (vh.transpose(-1, -2) * inv_s2.unsqueeze(-2)) @ vh  # V diag(1/s²) Vᵀ
    if isinstance(scale, Tensor):
        scale = scale[..., None, None]
    cov = cov * scale
    return torch.where(singular[..., None, None], torch.full_like(cov, math.inf), cov)


def stderr_from(cov: Tensor) -> Tensor:
    """Standard errors: the square roots of the covariance diagonal."""
    return cov.diagonal(dim1=-2, dim2=-1).clamp_min(0).sqrt()


def correlation(cov: Tensor) -> Tensor:
    """Correlation matrix from a covariance matrix (NaN where a variance is 0 or inf)."""
    sd = stderr_from(cov)
    outer = sd.unsqueeze(-1) * sd.unsqueeze(-2)
    finite = torch.isfinite(outer) & (outer > 0)
    return torch.where(finite, cov / torch.where(finite, outer, 1.0), torch.nan)


def goodness(
    y: Tensor, y_pred: Tensor, weighted_residuals: Tensor, n_params: int, mask: Tensor | None = None
) -> dict[str, Tensor]:
    """χ², dof, reduced χ², R², AIC and BIC over the last dimension (points).

    ``weighted_residuals`` are ``(y_pred - y)/sigma`` (or unweighted without sigma).
    """
    if mask is None:
        mask = torch.ones_like(y, dtype=torch.bool)
    zero = torch.zeros((), dtype=y.dtype, device=y.device)
    n = mask.sum(-1).to(y.dtype)
    chi2 = torch.where(mask, weighted_residuals**2, zero).sum(-1)
    dof = n - n_params
    y_mean = torch.where(mask, y, zero).sum(-1, keepdim=True) / n.unsqueeze(-1).clamp_min(1)
    ss_tot = torch.where(mask, (y - y_mean) ** 2, zero).sum(-1)
    ss_res = torch.where(mask, (y - y_pred) ** 2, zero).sum(-1)
    log_term = n * torch.log(chi2.clamp_min(torch.finfo(y.dtype).tiny) / n.clamp_min(1))
    return {
        "n_points": n,
        "dof": dof,
        "chi2": chi2,
        "reduced_chi2": torch.where(dof > 0, chi2 / dof.clamp_min(1), torch.nan),
        "r2": torch.where(ss_tot > 0, 1 - ss_res / ss_tot.clamp_min(1e-300), torch.nan),
        "aic": log_term + 2 * n_params,
        "bic": log_term + torch.log(n.clamp_min(1)) * n_params,
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
