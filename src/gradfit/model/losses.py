"""Losses: the post's ``mse``, least-squares relatives, robust losses, and custom callables.

A loss is called like the post's: ``loss(y_pred, y_true)`` -> scalar tensor. Losses of
least-squares form also expose ``rho`` (SciPy's ``least_squares`` convention: ``rho(z)``
with ``z = (r / f_scale)²`` returning ``rho, rho', rho''``) so Levenberg–Marquardt can
minimise them by iteratively reweighted residuals.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from gradfit.errors import OptionError, unknown_name

Tensor = torch.Tensor
Rho = Callable[[Tensor], tuple[Tensor, Tensor, Tensor]]


def mse(y_pred: Tensor, y_true: Tensor) -> Tensor:
    """Returns the mean squared error between y_pred and y_true (the post's loss).

    Example:
        >>> float(mse(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 4.0])))
        2.0
    """
    return ((y_pred - y_true) ** 2).mean()


def _linear(z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    one = torch.ones_like(z)
    return z, one, torch.zeros_like(z)


def _huber(z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    inside = z <= 1
    sqrt_z = torch.sqrt(torch.where(inside, torch.ones_like(z), z))
    rho = torch.where(inside, z, 2 * sqrt_z - 1)
    d1 = torch.where(inside, torch.ones_like(z), 1 / sqrt_z)
    d2 = torch.where(inside, torch.zeros_like(z), -0.5 / (sqrt_z * z))
    return rho, d1, d2


def _soft_l1(z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    t = 1 + z
    root = torch.sqrt(t)
    return 2 * (root - 1), 1 / root, -0.5 / (t * root)


def _cauchy(z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    t = 1 + z
    return torch.log1p(z), 1 / t, -1 / t**2


def _arctan(z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    t = 1 + z**2
    return torch.arctan(z), 1 / t, -2 * z / t**2


@dataclass(frozen=True)
class Loss:
    """A named loss: ``reduce(f_scale² · rho((r / f_scale)²))`` over residuals ``r``.

    ``r = (y_pred - y_true) / sigma`` when ``sigma`` is set (weighted fits).
    ``least_squares`` is true when LM can minimise it (``rho`` is known).
    """

    name: str
    rho: Rho | None
    reduction: str = "mean"  # "mean" or "sum"; does not move the optimum
    f_scale: float = 1.0
    sigma: Tensor | None = None
    custom: Callable[[Tensor, Tensor], Tensor] | None = None

    @property
    def least_squares(self) -> bool:
        return self.rho is not None

    def with_options(self, *, f_scale: float | None = None, sigma: Tensor | None = None) -> Loss:
        """A copy with another ``f_scale`` or per-point ``sigma``."""
        if f_scale is not None and not f_scale > 0:
            raise OptionError(f"f_scale must be > 0, got {f_scale}")
        return replace(
            self,
            f_scale=self.f_scale if f_scale is None else float(f_scale),
            sigma=self.sigma if sigma is None else sigma,
        )

    def __call__(self, y_pred: Tensor, y_true: Tensor) -> Tensor:
        if self.custom is not None:
            return self.custom(y_pred, y_true)
        r = y_pred - y_true
        if self.sigma is not None:
            r = r / self.sigma
        values = self.pointwise(r)
        return values.mean() if self.reduction == "mean" else values.sum()

    def pointwise(self, r: Tensor) -> Tensor:
        """Each point's term for residuals ``r`` (already divided by sigma); named losses."""
        if self.rho is _linear:  # plain squares: keep the post's arithmetic exactly
            return r**2
        if self.rho is None:  # mae
            return r.abs()
        return self.f_scale**2 * self.rho((r / self.f_scale) ** 2)[0]


LOSSES: dict[str, Loss] = {
    "mse": Loss("mse", _linear),
    "sse": Loss("sse", _linear, reduction="sum"),
    "chi2": Loss("chi2", _linear, reduction="sum"),
    "mae": Loss("mae", None),
    "huber": Loss("huber", _huber),
    "soft_l1": Loss("soft_l1", _soft_l1),
    "cauchy": Loss("cauchy", _cauchy),
    "arctan": Loss("arctan", _arctan),
}


def get_loss(loss: str | Loss | Callable[[Tensor, Tensor], Tensor]) -> Loss:
    """Look a loss up by name, or wrap a callable ``loss(y_pred, y_true)``.

    Example:
        >>> get_loss("huber").least_squares, get_loss(lambda p, t: (p - t).abs().max()).name
        (True, 'custom')
    """
    if isinstance(loss, Loss):
        return loss
    if loss is mse:  # the post's own function is our named "mse"
        return LOSSES["mse"]
    if isinstance(loss, str):
        if loss not in LOSSES:
            raise unknown_name("loss", loss, LOSSES)
        return LOSSES[loss]
    if callable(loss):
        name = getattr(loss, "__name__", "custom")
        return Loss("custom" if name == "<lambda>" else name, None, custom=loss)
    raise OptionError(f"loss must be a name or a callable, got {type(loss).__name__}")
