"""Data-driven starting values for the built-in models, vectorised over curves.

Each guess takes ``x`` (``[N]`` or ``[..., N]``), ``y`` (``[..., N]``) and optionally ``mask``
(``[..., N]`` bool, True where a point is valid) and returns ``[..., P]``. With a mask, curve
k's guess is the one its valid points alone would get (``fit_batch`` row k equals ``fit`` on
that curve): every reduction runs over the valid points only, and the values at masked points
(padding, NaN) are never read. They aim at the right basin, not at the optimum: the solver
does the rest.
"""

from __future__ import annotations

import math
from typing import Protocol

import torch

Tensor = torch.Tensor


class Guess(Protocol):
    """``guess(x, y, mask=None) -> [..., P]``."""

    def __call__(self, x: Tensor, y: Tensor, mask: Tensor | None = None) -> Tensor: ...


# -- masked reductions: over every point without a mask, else over the valid ones -------------


def _zeroed(values: Tensor, mask: Tensor | None) -> Tensor:
    # torch.where, not a product: masked points may hold NaN, and NaN * 0 is NaN
    return values if mask is None else torch.where(mask, values, 0.0)


def _count(y: Tensor, mask: Tensor | None) -> Tensor:
    """``[...]`` valid points per curve, in y's dtype."""
    if mask is None:
        return torch.full(y.shape[:-1], y.shape[-1], dtype=y.dtype, device=y.device)
    return mask.sum(-1).to(y.dtype)


def _sum(values: Tensor, mask: Tensor | None) -> Tensor:
    """Left to right (a CPU cumsum): masked points add exact zeros, so a padded curve's sum
    has the bits of its valid points' sum alone (``sum`` regroups terms by row length)."""
    values = _zeroed(values, mask)
    return values.cumsum(-1)[..., -1] if values.shape[-1] > 0 else values.sum(-1)


def _mean(values: Tensor, mask: Tensor | None) -> Tensor:
    return _sum(values, mask) / _count(values, mask).clamp_min(1)


def _arg(values: Tensor, mask: Tensor | None, largest: bool) -> Tensor:
    """``[..., 1]`` index of the first largest (smallest) valid value."""
    if mask is None:
        return values.argmax(-1, keepdim=True) if largest else values.argmin(-1, keepdim=True)
    fill = -math.inf if largest else math.inf
    values = torch.where(mask, values, fill)
    return values.argmax(-1, keepdim=True) if largest else values.argmin(-1, keepdim=True)


def _at(values: Tensor, index: Tensor) -> Tensor:
    return values.gather(-1, index)[..., 0]


def _range(x: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """Smallest and largest valid x."""
    return _at(x, _arg(x, mask, largest=False)), _at(x, _arg(x, mask, largest=True))


def _lstsq(columns: list[Tensor], y: Tensor, mask: Tensor | None = None) -> Tensor:
    # Normal equations in float64: stable enough for low degrees on any x range once scaled.
    # Masked rows are zero in A and y, so they add nothing to AᵀA or Aᵀy.
    A = torch.stack(torch.broadcast_tensors(*columns, y)[:-1], dim=-1).double()  # (..., N, P)
    b = y.double()
    if mask is not None:
        A, b = torch.where(mask.unsqueeze(-1), A, 0.0), torch.where(mask, b, 0.0)
    At = A.transpose(-1, -2)
    solution: Tensor = torch.linalg.lstsq(At @ A, (At @ b.unsqueeze(-1))).solution
    return solution.squeeze(-1).to(y.dtype)


# -- the guesses --------------------------------------------------------------------------------


def linear(x: Tensor, y: Tensor, mask: Tensor | None = None) -> Tensor:
    return _lstsq([x, torch.ones_like(x)], y, mask)


def polynomial(degree: int) -> Guess:
    def guess(x: Tensor, y: Tensor, mask: Tensor | None = None) -> Tensor:
        return _lstsq([x**k for k in range(degree + 1)], y, mask)

    return guess


def _ends(x: Tensor, y: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """y at the smallest and largest valid x, and those x."""
    x = x.expand_as(y)
    lo, hi = _arg(x, mask, largest=False), _arg(x, mask, largest=True)
    return _at(y, lo), _at(y, hi), _at(x, lo), _at(x, hi)


def exponential(x: Tensor, y: Tensor, mask: Tensor | None = None) -> Tensor:
    y_first, y_last, x_min, x_max = _ends(x, y, mask)
    c = y_last  # the tail approximates the offset
    a = y_first - c
    mean_gap = _mean((y - c.unsqueeze(-1)).abs(), mask)
    # the area under the decay is a/k, which gives k without logarithms of noisy points
    span = (x_max - x_min).clamp_min(1e-12)
    k = (a.abs() / mean_gap.clamp_min(1e-12) / span).clamp(1e-6 / span, 1e6 / span)
    return torch.stack([a, k, c], dim=-1)


def _low_quantile(y: Tensor, mask: Tensor | None) -> Tensor:
    """The 10% quantile of the valid points (nanquantile interpolates among them alone)."""
    if mask is None:
        return torch.quantile(y, 0.1, dim=-1) if y.shape[-1] > 1 else y[..., 0]
    return torch.nanquantile(torch.where(mask, y, torch.nan), 0.1, dim=-1)


def peak(gaussian: bool) -> Guess:
    def guess(x: Tensor, y: Tensor, mask: Tensor | None = None) -> Tensor:
        x = x.expand_as(y)
        offset = _low_quantile(y, mask)
        rise = y - offset.unsqueeze(-1)
        top = _arg(rise, mask, largest=True)
        amplitude, center = _at(rise, top), _at(x, top)
        # area = amplitude * width * sqrt(2 pi) (Gaussian) or * pi (Lorentzian)
        x_min, x_max = _range(x, mask)
        dx = (x_max - x_min) / (_count(y, mask) - 1).clamp_min(1)
        area = _sum(rise.clamp_min(0), mask) * dx
        factor = math.sqrt(2 * math.pi) if gaussian else math.pi
        width = (area / (amplitude.abs().clamp_min(1e-12) * factor)).clamp_min(dx.clamp_min(1e-12))
        return torch.stack([amplitude, center, width, offset], dim=-1)

    return guess


def logistic(x: Tensor, y: Tensor, mask: Tensor | None = None) -> Tensor:
    y_first, y_last, x_min, x_max = _ends(x, y, mask)
    middle = 0.5 * (y_first + y_last)
    x = x.expand_as(y)
    nearest = _arg((y - middle.unsqueeze(-1)).abs(), mask, largest=False)
    midpoint = _at(x, nearest)
    rate = 8.0 / (x_max - x_min).clamp_min(1e-12)  # a step over about a quarter of the range
    return torch.stack([y_last - y_first, rate, midpoint, y_first], dim=-1)


def power_law(x: Tensor, y: Tensor, mask: Tensor | None = None) -> Tensor:
    # log-log line through the positive points
    ok = (x > 0) & (y.abs() > 0)
    if mask is not None:
        ok = ok & mask
    log_x = torch.where(ok, x.clamp_min(1e-300).log(), torch.zeros_like(x))
    log_y = torch.where(ok, y.abs().clamp_min(1e-300).log(), torch.zeros_like(y))
    n = _count(y, ok).clamp_min(1)
    mx, my = _sum(log_x, ok) / n, _sum(log_y, ok) / n
    dx = _zeroed(log_x - mx.unsqueeze(-1), ok)
    b = _sum(dx * (log_y - my.unsqueeze(-1)), ok) / _sum(dx * dx, ok).clamp_min(1e-12)
    sign = torch.where(_sum(y, mask) < 0, -1.0, 1.0).to(y.dtype)
    return torch.stack([sign * torch.exp(my - b * mx), b], dim=-1)


def sine(x: Tensor, y: Tensor, mask: Tensor | None = None) -> Tensor:
    x = x.expand_as(y)
    n = _count(y, mask)
    offset = _mean(y, mask)
    centred = _zeroed(y - offset.unsqueeze(-1), mask)
    k = _strongest_frequency(centred, mask)
    x_min, x_max = _range(x, mask)
    span = (x_max - x_min).clamp_min(1e-12) * n / (n - 1).clamp_min(1)
    frequency = k.to(y.dtype) / span
    amplitude = math.sqrt(2) * (_sum(centred * centred, mask) / (n - 1).clamp_min(1)).sqrt()
    # the phase from a linear fit of y on sin and cos at that frequency
    angle = 2 * math.pi * frequency.unsqueeze(-1) * x
    s, c = _lstsq([torch.sin(angle), torch.cos(angle)], centred, mask).unbind(-1)
    phase = torch.atan2(c, s)
    amplitude = torch.sqrt(s * s + c * c).where(torch.isfinite(s), amplitude)
    return torch.stack([amplitude, frequency, phase, offset], dim=-1)


def _strongest_frequency(centred: Tensor, mask: Tensor | None) -> Tensor:
    """``[...]`` the strongest non-zero frequency index (>= 1) of the (evenly sampled) data's
    spectrum, each curve's valid points taken as its whole sequence."""
    if mask is None or bool(mask.all()):
        return _spectrum_peak(centred)
    # valid points to the front, in order; then one FFT per distinct number of valid points
    # (not per curve): curve k's spectrum is that of its own n_k points, as fit computes it
    order = torch.argsort((~mask).to(torch.int8), dim=-1, stable=True)
    packed = centred.gather(-1, order)
    lengths = mask.sum(-1)
    k = torch.ones(centred.shape[:-1], dtype=torch.int64, device=centred.device)
    for length in lengths.unique().tolist():
        if length > 0:
            rows = lengths == length
            k[rows] = _spectrum_peak(packed[rows][..., :length])
    return k


def _spectrum_peak(centred: Tensor) -> Tensor:
    spectrum: Tensor = torch.fft.rfft(centred, dim=-1).abs()
    spectrum[..., 0] = 0
    return spectrum.argmax(-1).clamp_min(1)


# the built-ins' guesses by the built-in's name (model/catalog.py): the peaks share one
gaussian = peak(gaussian=True)
lorentzian = peak(gaussian=False)
