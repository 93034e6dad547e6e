"""Figures: the post's four (dataset, before, history, after) and a fit with residuals.

Figures are built with matplotlib's object API (no pyplot global state, no display needed)
and written atomically.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from .files import write_with


def _save(figure: Figure, path: Path) -> Path:
    def writer(tmp: Path) -> None:
        figure.savefig(tmp, format="png", dpi=100, bbox_inches="tight")

    return write_with(path, writer)


def _np(values: Any) -> np.ndarray:
    if hasattr(values, "detach"):
        values = values.detach().cpu().numpy()
    return np.asarray(values, dtype=float)


def plot_dataset(x: Any, y: Any, path: Path) -> Path:
    """The post's 'Dataset' scatter."""
    figure = Figure(figsize=(6, 4.5))
    ax = figure.subplots()
    ax.scatter(_np(x), _np(y))
    ax.set(xlabel="$x$", ylabel="$y_{true}$", title="Dataset")
    ax.grid()
    return _save(figure, path)


def plot_prediction(x: Any, y: Any, y_pred: Any, title: str, path: Path) -> Path:
    """The post's ``plot_pred_vs_true``: data as dots, the model as a thick red line."""
    figure = Figure(figsize=(6, 4.5))
    ax = figure.subplots()
    ax.scatter(_np(x), _np(y), label="y_true", marker="o", s=50, alpha=0.75)
    ax.plot(_np(x), _np(y_pred), label="y_pred", c="r", linewidth=4)
    ax.legend()
    ax.set(title=title, xlabel="x")
    return _save(figure, path)


def plot_history(history: Sequence[float], path: Path, ylabel: str = "Loss") -> Path:
    """The post's 'MSE vs. Epoch' curve (log scale when it spans decades)."""
    figure = Figure(figsize=(6, 4.5))
    ax = figure.subplots()
    # a diverging run can reach 1e305, where matplotlib's log ticks overflow: clip the display
    values = np.minimum(_np(history), 1e200)
    ax.plot(values)
    if len(values) and (values > 0).all() and values.max() / values.min() > 100:
        ax.set_yscale("log")
    ax.set(xlabel="Epoch", ylabel=ylabel, title="Loss vs. Epoch")
    ax.grid()
    return _save(figure, path)


def plot_fit(result: Any, path: Path) -> Path:
    """Data with error bars, the fitted curve with its 95% band, and residuals below."""
    x_data = result.data["x"]
    figure = Figure(figsize=(7, 6))
    top, bottom = figure.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    y, sigma = _np(result.data["y"]), result.data.get("sigma")
    if isinstance(x_data, dict):  # several variables: plot against the point index
        xs = np.arange(len(y), dtype=float)
        top.errorbar(xs, y, yerr=None if sigma is None else _np(sigma), fmt="o", ms=3, label="data")
        top.plot(xs, _np(result.predict(x_data)), "r-", label="fit")
        residuals = y - _np(result.predict(x_data))
        bottom.set_xlabel("point")
    else:
        xs = _np(x_data)
        top.errorbar(xs, y, yerr=None if sigma is None else _np(sigma), fmt="o", ms=3, label="data")
        grid = np.linspace(xs.min(), xs.max(), 400)
        top.plot(grid, _np(result.predict(grid)), "r-", label="fit")
        if all(v is not None for v in result.stderr.values()) and result.dof > 0:
            lower, upper = result.confidence_band(grid)
            top.fill_between(grid, _np(lower), _np(upper), color="r", alpha=0.2, label="95% band")
        residuals = y - _np(result.predict(xs))
        bottom.set_xlabel("x")
    top.legend()
    top.set(ylabel="y", title=f"{getattr(result.model, 'name', 'model')}")
    top.grid(alpha=0.3)
    bottom.axhline(0, color="k", lw=0.8)
    bottom.plot(xs, residuals, "o", ms=3)
    bottom.set_ylabel("residual")
    bottom.grid(alpha=0.3)
    return _save(figure, path)
