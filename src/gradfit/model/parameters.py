"""Named parameters: starting values, bounds and fixed values, and the map the solvers see.

Solvers work on an unconstrained vector ``theta`` of the free parameters. Bounds become
smooth transforms (MINUIT's, as lmfit uses): two-sided ``lo + (hi-lo)(sin θ + 1)/2``,
one-sided ``lo - 1 + sqrt(θ² + 1)``; fixed parameters are held out of ``theta``. The
covariance is computed afterwards in the model's own parameters, so no transform
derivative (zero at a bound) leaks into the error bars.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from gradfit.errors import OptionError, unknown_name

Tensor = torch.Tensor
Bound = tuple[float | None, float | None]


def _check_names(kind: str, given: Mapping[str, object], names: Sequence[str]) -> None:
    for name in given:
        if name not in names:
            raise unknown_name(f"parameter in {kind}", name, names)


def _finite_or_none(value: float | None, inf: float) -> float | None:
    if value is None or value == inf:
        return None
    return float(value)


@dataclass(frozen=True, eq=False)
class ParameterSpace:
    """Maps the free, unconstrained ``theta`` ``[..., F]`` to model parameters ``[..., P]``."""

    names: tuple[str, ...]
    lower: tuple[float | None, ...]
    upper: tuple[float | None, ...]
    fixed: tuple[float | None, ...]

    @classmethod
    def build(
        cls,
        names: Sequence[str],
        bounds: Mapping[str, Bound] | None = None,
        fixed: Mapping[str, float] | None = None,
    ) -> ParameterSpace:
        """Validate ``bounds`` ``{name: (lo, hi)}`` and ``fixed`` ``{name: value}``.

        Example:
            >>> space = ParameterSpace.build(["a", "k"], bounds={"k": (0, None)}, fixed={"a": 2})
            >>> space.free_names
            ('k',)
        """
        bounds, fixed = dict(bounds or {}), dict(fixed or {})
        _check_names("bounds", bounds, names)
        _check_names("fixed", fixed, names)
        lower, upper = [], []
        for name in names:
            lo, hi = bounds.get(name, (None, None))
            lo, hi = _finite_or_none(lo, -math.inf), _finite_or_none(hi, math.inf)
            if lo is not None and hi is not None and not lo < hi:
                raise OptionError(f"bounds for {name!r}: lower {lo} must be < upper {hi}")
            if any(v is not None and math.isnan(v) for v in (lo, hi)):
                raise OptionError(f"bounds for {name!r} must be numbers, got NaN")
            lower.append(lo)
            upper.append(hi)
        values = tuple(None if n not in fixed else float(fixed[n]) for n in names)
        for name, value in zip(names, values, strict=True):
            if value is not None and not math.isfinite(value):
                raise OptionError(f"fixed value of {name!r} must be finite, got {value}")
        if all(v is not None for v in values):
            raise OptionError("every parameter is fixed: nothing left to fit")
        return cls(tuple(names), tuple(lower), tuple(upper), values)

    @property
    def free(self) -> list[int]:
        return [i for i, v in enumerate(self.fixed) if v is None]

    @property
    def free_names(self) -> tuple[str, ...]:
        return tuple(self.names[i] for i in self.free)

    @functools.cached_property
    def is_identity(self) -> bool:  # cached: asked at every step of the loop
        no_bounds = all(v is None for v in self.lower + self.upper)
        return no_bounds and all(v is None for v in self.fixed)

    def check_start(self, p0: Tensor) -> None:
        """p0 must lie inside its bounds (strictly for the transforms to be invertible)."""
        values = p0.reshape(-1, len(self.names))
        for i, name in enumerate(self.names):
            lo, hi = self.lower[i], self.upper[i]
            if self.fixed[i] is not None or (lo is None and hi is None):
                continue
            column = values[:, i]
            if (lo is not None and bool((column < lo).any())) or (
                hi is not None and bool((column > hi).any())
            ):
                bad = float(column[0]) if column.numel() == 1 else "some curves"
                raise OptionError(f"p0 of {name!r} ({bad}) lies outside its bounds [{lo}, {hi}]")

    def to_theta(self, p: Tensor) -> Tensor:
        """Model parameters ``[..., P]`` -> free unconstrained ``theta`` ``[..., F]``."""
        if self.is_identity:
            return p.clone()
        columns = []
        for i in self.free:
            lo, hi, v = self.lower[i], self.upper[i], p[..., i]
            if lo is not None and hi is not None:
                # a start exactly on a bound would sit where the transform is flat
                s = (2 * (v - lo) / (hi - lo) - 1).clamp(-1 + 1e-9, 1 - 1e-9)
                columns.append(torch.asin(s))
            elif lo is not None:
                columns.append(torch.sqrt(((v - lo + 1) ** 2 - 1).clamp_min(1e-18)))
            elif hi is not None:
                columns.append(torch.sqrt(((hi - v + 1) ** 2 - 1).clamp_min(1e-18)))
            else:
                columns.append(v)
        return torch.stack(columns, dim=-1)

    def to_params(self, theta: Tensor) -> Tensor:
        """Free ``theta`` ``[..., F]`` -> model parameters ``[..., P]`` (differentiable)."""
        if self.is_identity:
            return theta
        columns, free = [], iter(range(theta.shape[-1]))
        for i in range(len(self.names)):
            if (value := self.fixed[i]) is not None:
                columns.append(torch.full_like(theta[..., 0], value))
                continue
            t, lo, hi = theta[..., next(free)], self.lower[i], self.upper[i]
            if lo is not None and hi is not None:
                columns.append(lo + (hi - lo) * (torch.sin(t) + 1) / 2)
            elif lo is not None:
                columns.append(lo - 1 + torch.sqrt(t * t + 1))
            elif hi is not None:
                columns.append(hi + 1 - torch.sqrt(t * t + 1))
            else:
                columns.append(t)
        return torch.stack(columns, dim=-1)

    def derivative(self, theta: Tensor) -> Tensor:
        """``d params[free] / d theta`` ``[..., F]``: the transforms act elementwise."""
        columns = []
        for j, i in enumerate(self.free):
            t, lo, hi = theta[..., j], self.lower[i], self.upper[i]
            if lo is not None and hi is not None:
                columns.append((hi - lo) / 2 * torch.cos(t))
            elif lo is not None:
                columns.append(t / torch.sqrt(t * t + 1))
            elif hi is not None:
                columns.append(-t / torch.sqrt(t * t + 1))
            else:
                columns.append(torch.ones_like(t))
        return torch.stack(columns, dim=-1)

    def at_bound(self, p: Tensor, rtol: float = 1e-8) -> Tensor:
        """``[..., P]`` bool: parameter sits on one of its bounds (its error bar is unreliable)."""
        flags = torch.zeros_like(p, dtype=torch.bool)
        for i in self.free:
            for bound in (self.lower[i], self.upper[i]):
                if bound is not None:
                    tol = rtol * max(abs(bound), 1.0)
                    flags[..., i] |= (p[..., i] - bound).abs() <= tol
        return flags
