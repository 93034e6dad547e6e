"""Data-driven starting values for the built-in models, vectorised over curves.

Each guess takes ``x`` (``[N]`` or ``[..., N]``) and ``y`` (``[..., N]``) and returns
``[..., P]``. They aim at the right basin, not at the optimum: the solver does the rest.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

Tensor = torch.Tensor


def _lstsq(columns: list[Tensor], y: Tensor) -> Tensor:
    # Normal equations in float64: stable enough for low degrees on any x range once scaled.
    A = torch.stack(torch.broadcast_tensors(*columns, y)[:-1], dim=-1).double()  # (..., N, P)
    At = A.transpose(-1, -2)
    solution = torch.linalg.lstsq(At @ A, (At @ y.double().unsqueeze(-1))).solution
    return solution.squeeze(-1).to(y.dtype)


def linear(x: Tensor, y: Tensor) -> Tensor:
    slope_intercept = _lstsq([x, torch.ones_like(x)], y)
    return slope_intercept


def polynomial(degree: int) -> Callable[[Tensor, Tensor], Tensor]:
    def guess(x: Tensor, y: Tensor) -> Tensor:
        return _lstsq([x**k for k in range(degree + 1)], y)

    return guess


def _ends(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """y at the smallest and largest x, and the span of x."""
    x = x.expand_as(y)
    lo, hi = x.argmin(-1, keepdim=True), x.argmax(-1, keepdim=True)
    return y.gather(-1, lo)[..., 0], y.gather(-1, hi)[..., 0], x.amin(-1), x.amax(-1)


def exponential(x: Tensor, y: Tensor) -> Tensor:
    y_first, y_last, x_min, x_max = _ends(x, y)
    c = y_last  # the tail approximates the offset
    a = y_first - c
    mean_gap = (y - c.unsqueeze(-1)).abs().mean(-1)
    # the area under the decay is a/k, which gives k without logarithms of noisy points
    span = (x_max - x_min).clamp_min(1e-12)
    k = (a.abs() / mean_gap.clamp_min(1e-12) / span).clamp(1e-6 / span, 1e6 / span)
    return torch.stack([a, k, c], dim=-1)


def peak(gaussian: bool) -> Callable[[Tensor, Tensor], Tensor]:
    def guess(x: Tensor, y: Tensor) -> Tensor:
        x = x.expand_as(y)
        offset = torch.quantile(y, 0.1, dim=-1) if y.shape[-1] > 1 else y[..., 0]
        rise = y - offset.unsqueeze(-1)
        top = rise.argmax(-1, keepdim=True)
        amplitude = rise.gather(-1, top)[..., 0]
        center = x.gather(-1, top)[..., 0]
        # area = amplitude * width * sqrt(2 pi) (Gaussian) or * pi (Lorentzian)
        dx = (x.amax(-1) - x.amin(-1)) / max(y.shape[-1] - 1, 1)
        area = rise.clamp_min(0).sum(-1) * dx
        factor = math.sqrt(2 * math.pi) if gaussian else math.pi
        width = (area / (amplitude.abs().clamp_min(1e-12) * factor)).clamp_min(dx.clamp_min(1e-12))
        return torch.stack([amplitude, center, width, offset], dim=-1)

    return guess


def logistic(x: Tensor, y: Tensor) -> Tensor:
    y_first, y_last, x_min, x_max = _ends(x, y)
    middle = 0.5 * (y_first + y_last)
    x = x.expand_as(y)
    nearest = (y - middle.unsqueeze(-1)).abs().argmin(-1, keepdim=True)
    midpoint = x.gather(-1, nearest)[..., 0]
    rate = 8.0 / (x_max - x_min).clamp_min(1e-12)  # a step over about a quarter of the range
    return torch.stack([y_last - y_first, rate, midpoint, y_first], dim=-1)


def power_law(x: Tensor, y: Tensor) -> Tensor:
    # log-log line through the positive points
    ok = (x > 0) & (y.abs() > 0)
    log_x = torch.where(ok, x.clamp_min(1e-300).log(), torch.zeros_like(x))
    log_y = torch.where(ok, y.abs().clamp_min(1e-300).log(), torch.zeros_like(y))
    weight = ok.to(y.dtype)
    n = weight.sum(-1).clamp_min(1)
    mx, my = (log_x * weight).sum(-1) / n, (log_y * weight).sum(-1) / n
    dx = (log_x - mx.unsqueeze(-1)) * weight
    b = (dx * (log_y - my.unsqueeze(-1))).sum(-1) / (dx * dx).sum(-1).clamp_min(1e-12)
    sign = torch.where(y.sum(-1) < 0, -1.0, 1.0).to(y.dtype)
    return torch.stack([sign * torch.exp(my - b * mx), b], dim=-1)


def sine(x: Tensor, y: Tensor) -> Tensor:
    # the strongest non-zero frequency of the (evenly sampled) data's spectrum
    x = x.expand_as(y)
    n = y.shape[-1]
    offset = y.mean(-1)
    spectrum = torch.fft.rfft(y - offset.unsqueeze(-1), dim=-1).abs()
    spectrum[..., 0] = 0
    k = spectrum.argmax(-1).clamp_min(1)
    span = (x.amax(-1) - x.amin(-1)).clamp_min(1e-12) * n / max(n - 1, 1)
    frequency = k.to(y.dtype) / span
    amplitude = math.sqrt(2) * (y - offset.unsqueeze(-1)).std(-1)
    # the phase from a linear fit of y on sin and cos at that frequency
    angle = 2 * math.pi * frequency.unsqueeze(-1) * x
    s, c = _lstsq([torch.sin(angle), torch.cos(angle)], y - offset.unsqueeze(-1)).unbind(-1)
    phase = torch.atan2(c, s)
    amplitude = torch.sqrt(s * s + c * c).where(torch.isfinite(s), amplitude)
    return torch.stack([amplitude, frequency, phase, offset], dim=-1)
