"""Synthetic data sets, starting with the blog post's noisy quadratic.

Every generator returns ``(x, y)`` as float32 tensors. With ``seed=None`` the
global torch RNG is used, exactly as the post does; with a seed, a private
generator is used so the global state is left alone.
"""

from __future__ import annotations

import math

import torch


def _noise(n: int, seed: int | None) -> torch.Tensor:
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=generator)


def quadratic(n: int = 100, seed: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The post's ``generate_dataset``: ``y = 20x² + 5x - 3`` plus unit Gaussian noise on [0, 1].

    Example:
        >>> x, y = quadratic(n=100, seed=0)
        >>> tuple(x.shape), tuple(y.shape), float(x[0]), float(x[-1])
        ((100,), (100,), 0.0, 1.0)
    """
    x = torch.linspace(0, 1, n)
    y = 20 * x**2 + 5 * x - 3
    y += _noise(n, seed)  # the post adds noise in place, after the clean curve
    return x, y


def exponential_decay(
    n: int = 100, seed: int | None = None, *, a: float = 10.0, k: float = 0.5, c: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """``y = a·exp(-k·t) + c`` on t in [0, 10] with noise of standard deviation 0.2.

    Example:
        >>> t, y = exponential_decay(seed=1)
        >>> len(t)
        100
    """
    t = torch.linspace(0, 10, n)
    return t, a * torch.exp(-k * t) + c + 0.2 * _noise(n, seed)


def gaussian_peak(
    n: int = 100,
    seed: int | None = None,
    *,
    amplitude: float = 5.0,
    center: float = 0.0,
    width: float = 1.0,
    offset: float = 0.5,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A Gaussian peak ``amplitude·exp(-(x-center)²/(2·width²)) + offset`` on [-5, 5], noise 0.1.

    Example:
        >>> x, y = gaussian_peak(seed=2)
        >>> int(y.argmax()) in range(40, 60)
        True
    """
    x = torch.linspace(-5, 5, n)
    peak = amplitude * torch.exp(-((x - center) ** 2) / (2 * width**2)) + offset
    return x, peak + 0.1 * _noise(n, seed)


def sine(
    n: int = 100,
    seed: int | None = None,
    *,
    amplitude: float = 2.0,
    frequency: float = 0.5,
    phase: float = 0.3,
    offset: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``y = amplitude·sin(2π·frequency·x + phase) + offset`` on [0, 10], noise 0.1.

    Example:
        >>> x, y = sine(seed=3)
        >>> float(x[-1])
        10.0
    """
    x = torch.linspace(0, 10, n)
    wave = amplitude * torch.sin(2 * math.pi * frequency * x + phase) + offset
    return x, wave + 0.1 * _noise(n, seed)
