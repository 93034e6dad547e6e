"""Figures: the post's four (dataset, before, history, after) and a fit with residuals.

Figures are built with matplotlib's object API (no pyplot global state, no display needed)
and written atomically. The ``*_figure`` functions return the figure (tests inspect its
lines); the ``plot_*`` functions write it to a PNG and return the path.
"""

from __future__ import annotations

import textwrap
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from gradfit.io.files import write_with

if TYPE_CHECKING:  # typing only: results call this module lazily, never the reverse
    from gradfit.results.fit_result import FitResult

GRID_POINTS = 400  # dense enough that a fitted curve's curvature shows between data points

Curve = Callable[[np.ndarray], Any]  # x grid -> y values (array or tensor)


def _save(figure: Figure, path: Path) -> Path:
    def writer(tmp: Path) -> None:
        figure.savefig(tmp, format="png", dpi=100, bbox_inches="tight")

    return write_with(path, writer)


def save_figure(figure: Figure, path: Path) -> Path:
    """Write ``figure`` to ``path`` as PNG, atomically."""
    return _save(figure, path)


def _np(values: Any) -> np.ndarray:
    if hasattr(values, "detach"):
        values = values.detach().cpu().numpy()
    return np.asarray(values, dtype=float)


def dense_grid(x: np.ndarray, n: int = GRID_POINTS) -> np.ndarray:
    """``n`` evenly spaced points from ``min(x)`` to ``max(x)``, whatever the order of ``x``."""
    return np.linspace(np.min(x), np.max(x), n)


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


# ---- the post's "After training" with the exact optimum beside it ----------------------


def _mse(y: np.ndarray, y_pred: np.ndarray) -> float:
    return float(np.mean((y - y_pred) ** 2))


def _headroom(ax: Axes, fraction: float) -> None:
    low, high = ax.get_ylim()
    ax.set_ylim(low, high + fraction * (high - low))


def after_training_figure(
    x: Any, y: Any, fitted: Curve, optimum: Curve, title: str = "After training"
) -> Figure:
    """The post's fourth plot, plus the least-squares optimum and the residuals.

    Top: the data, the trained model (thick red, as the post) and the exact least-squares
    optimum (dashed), both on a dense grid over x. Bottom: the trained model's residuals and,
    as a line, how far the optimum lies from it; a trend there is what the loop left undone.
    The title gives both MSEs, so a loop that stops short of the optimum shows in numbers too.
    """
    xs, ys = _np(x), _np(y)
    grid = dense_grid(xs)
    at_x, optimum_at_x = _np(fitted(xs)), _np(optimum(xs))
    on_grid, optimum_on_grid = _np(fitted(grid)), _np(optimum(grid))
    figure = Figure(figsize=(6, 6))
    top, bottom = figure.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    top.scatter(xs, ys, label="y_true", marker="o", s=50, alpha=0.75)
    top.plot(grid, on_grid, label="y_pred", c="r", linewidth=4)
    top.plot(grid, optimum_on_grid, "k--", linewidth=1.5, label="least-squares optimum")
    top.legend()
    mse, best = _mse(ys, at_x), _mse(ys, optimum_at_x)
    excess = f" ({mse / best - 1:+.1%})" if best > 0 else ""
    top.set(title=f"{title}\nMSE {mse:.4g}, optimum {best:.4g}{excess}", ylabel="y")
    top.grid(alpha=0.3)
    bottom.axhline(0, color="r", lw=1)
    bottom.plot(xs, ys - at_x, "o", ms=3, alpha=0.75, label="y_true − y_pred")
    bottom.plot(grid, optimum_on_grid - on_grid, "k--", lw=1.5, label="optimum − y_pred")
    _headroom(bottom, 0.6)  # the legend sits above the points rather than on them
    bottom.legend(fontsize="small", loc="upper center", ncols=2)
    bottom.set(xlabel="x", ylabel="residual")
    bottom.grid(alpha=0.3)
    return figure


def plot_after_training(
    x: Any, y: Any, fitted: Curve, optimum: Curve, path: Path, title: str = "After training"
) -> Path:
    """Write :func:`after_training_figure` to ``path``."""
    return _save(after_training_figure(x, y, fitted, optimum, title), path)


# ---- a fit: data, curve, confidence band, residuals ------------------------------------


def _single_x(x_data: Any, model: Any) -> tuple[str, np.ndarray, Callable[[np.ndarray], Any]]:
    """The one independent variable's name, values (1-D) and how to pass a grid to the model.

    Raises ValueError when the model has several variables or its x is not one column.
    """
    if isinstance(x_data, Mapping):
        if len(x_data) != 1:
            raise ValueError("several independent variables")
        ((name, values),) = x_data.items()
        return str(name), _column(values), lambda g: {name: g}
    values = _np(x_data)
    names = getattr(model, "independent", None) or ("x",)
    shape = values.shape[1:]  # an (N, 1) column stays a column for the model
    return names[0], _column(values), lambda g: g.reshape(-1, *shape)


def _column(values: Any) -> np.ndarray:
    array = _np(values)
    if array.ndim == 1 or (array.ndim == 2 and array.shape[1] == 1):
        return array.reshape(-1)
    raise ValueError(f"x has shape {array.shape}, not one column")


def _band_available(result: FitResult) -> bool:
    """A band needs a finite covariance of the free parameters and some degrees of freedom."""
    free = [i for i, n in enumerate(result.param_names) if n not in result.fixed]
    if not free or result.dof <= 0:
        return False
    cov = _np(result.covariance)[np.ix_(free, free)]
    return bool(np.isfinite(cov).all())


def _grid_sigma(sigma: np.ndarray | None) -> tuple[bool, float | None]:
    """Whether a prediction band can be drawn, and a new point's σ for it: None for an
    unweighted fit, the common σ of a weighted fit whose σ is constant; no band when σ
    varies along x."""
    if sigma is None:
        return True, None
    if len(sigma) and bool(np.all(sigma == sigma[0])):
        return True, float(sigma[0])
    return False, None


def _per_point(sigma: Any, n: int) -> np.ndarray | None:
    return None if sigma is None else np.broadcast_to(_np(sigma).reshape(-1), (n,)).copy()


def _labels(result: FitResult, labels: Mapping[str, str] | None, x_name: str) -> tuple[str, str]:
    """Axis labels: given ones, else ``result.data["labels"]``, else the variable's name."""
    known = {**(result.data.get("labels") or {}), **(labels or {})}
    return known.get("x", x_name), known.get("y", "y")


def _title(result: FitResult) -> str:
    return textwrap.shorten(str(getattr(result.model, "name", "model")), width=70)


def _draw_residuals(
    ax: Axes, x: np.ndarray, residuals: np.ndarray, sigma: np.ndarray | None
) -> None:
    ax.axhline(0, color="k", lw=0.8)
    ax.errorbar(x, residuals, yerr=sigma, fmt="o", ms=3)
    ax.set_ylabel("residual")
    ax.grid(alpha=0.3)


def fit_figure(result: FitResult, labels: Mapping[str, str] | None = None) -> Figure:
    """Data, fitted curve with its 95% confidence band, and residuals below.

    With one 1-D independent variable: the data against x (sorted), the model on a dense
    grid of 400 points over the x range, and the delta-method band
    (``result.confidence_band``) when the covariance is finite, with the lighter 95%
    prediction band (``result.prediction_band``) beside it (not for a weighted fit whose σ
    varies along x: a new point's σ is unknown there). Axes are labelled
    ``labels["x"]``/``labels["y"]`` (or ``result.data["labels"]``), else with the
    variable's name. With several independent variables, or an x that is not one column,
    there is no curve to draw: the figure is predicted against observed instead.
    """
    if "x" not in result.data or "y" not in result.data:
        raise ValueError("this result holds no data to plot (a results.json without them)")
    try:
        name, xs, as_model_x = _single_x(result.data["x"], result.model)
    except ValueError:
        return _predicted_vs_observed(result, labels)
    y, n = _np(result.data["y"]).reshape(-1), len(xs)
    sigma = _per_point(result.data.get("sigma"), n)
    order = np.argsort(xs, kind="stable")  # unsorted data must still draw left to right
    xs, y = xs[order], y[order]
    sigma = None if sigma is None else sigma[order]
    grid = dense_grid(xs)
    xlabel, ylabel = _labels(result, labels, name)
    figure = Figure(figsize=(7, 6))
    top, bottom = figure.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    top.errorbar(xs, y, yerr=sigma, fmt="o", ms=3, label="data")
    top.plot(grid, _np(result.predict(as_model_x(grid))).reshape(-1), "r-", label="fit")
    if _band_available(result):
        drawable, noise = _grid_sigma(sigma)
        if drawable:  # the prediction band first, so the confidence band is on top
            pred = result.prediction_band(as_model_x(grid), sigma=noise)
            lower, upper = (_np(b).reshape(-1) for b in pred)
            top.fill_between(grid, lower, upper, color="r", alpha=0.08, label="95% prediction")
        lower, upper = (_np(b).reshape(-1) for b in result.confidence_band(as_model_x(grid)))
        top.fill_between(grid, lower, upper, color="r", alpha=0.2, label="95% band")
    top.legend()
    top.set(ylabel=ylabel, title=_title(result))
    top.grid(alpha=0.3)
    residuals = y - _np(result.predict(as_model_x(xs))).reshape(-1)
    _draw_residuals(bottom, xs, residuals, sigma)
    bottom.set_xlabel(xlabel)
    return figure


def _predicted_vs_observed(result: FitResult, labels: Mapping[str, str] | None) -> Figure:
    """The fallback of :func:`fit_figure`: predicted against observed, and the residuals."""
    y = _np(result.data["y"]).reshape(-1)
    predicted = _np(result.predict(result.data["x"])).reshape(-1)
    sigma = _per_point(result.data.get("sigma"), len(y))
    _, ylabel = _labels(result, labels, "x")
    figure = Figure(figsize=(7, 6))
    top, bottom = figure.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    top.errorbar(y, predicted, xerr=sigma, fmt="o", ms=3, label="data")
    low, high = float(np.min(y)), float(np.max(y))
    top.plot([low, high], [low, high], "r-", label="predicted = observed")
    top.legend()
    top.set(ylabel=f"predicted {ylabel}", title=f"{_title(result)}\n(predicted vs observed)")
    top.grid(alpha=0.3)
    _draw_residuals(bottom, y, y - predicted, sigma)
    bottom.set_xlabel(f"observed {ylabel}")
    return figure


def plot_fit(result: FitResult, path: Path, labels: Mapping[str, str] | None = None) -> Path:
    """Write :func:`fit_figure` to ``path``."""
    return _save(fit_figure(result, labels), path)
