"""Figures: the fitted curve on a dense sorted grid, its band, and the demo's optimum line."""

import numpy as np
import pytest
import torch
from matplotlib.collections import PolyCollection
from matplotlib.lines import Line2D

import gradfit as gf
from gradfit.cli.demo import optimum_curve, run_demo
from gradfit.views.plots import GRID_POINTS, after_training_figure, fit_figure, plot_fit


def _decay(seed: int = 0, n: int = 30) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    t = rng.uniform(0, 10, n)  # unsorted on purpose
    return t, 10 * np.exp(-0.5 * t) + 1 + rng.normal(0, 0.2, n)


def _fit_decay(t: np.ndarray, y: np.ndarray, **options) -> gf.FitResult:
    model = gf.Model("a*exp(-k*t)+c", independent="t")
    return gf.fit(model, {"t": t}, y, p0={"a": 5, "k": 0.3, "c": 0}, **options)


def _line(figure, label: str) -> Line2D:
    lines = [line for ax in figure.axes for line in ax.get_lines() if line.get_label() == label]
    assert len(lines) == 1, [line.get_label() for ax in figure.axes for line in ax.get_lines()]
    return lines[0]


def _band(figure) -> list[PolyCollection]:
    return [c for c in figure.axes[0].collections if c.get_label() == "95% band"]


def _closed_form(result: gf.FitResult, t: np.ndarray) -> np.ndarray:
    a, k, c = (result.params[n] for n in ("a", "k", "c"))
    return a * np.exp(-k * t) + c


def test_fit_curve_is_the_model_on_a_dense_sorted_grid():
    t, y = _decay()
    result = _fit_decay(t, y)
    line = _line(fit_figure(result), "fit")
    grid, curve = np.asarray(line.get_xdata()), np.asarray(line.get_ydata())
    assert len(grid) == GRID_POINTS > len(t)
    assert np.all(np.diff(grid) > 0)
    assert grid[0] == t.min() and grid[-1] == t.max()
    np.testing.assert_allclose(curve, _closed_form(result, grid), rtol=1e-12)


def test_unsorted_data_are_drawn_left_to_right_and_as_sorted_data():
    t, y = _decay(seed=1)
    order = np.argsort(t)
    shuffled, ordered = fit_figure(_fit_decay(t, y)), fit_figure(_fit_decay(t[order], y[order]))
    for label in ("fit", "data"):
        drawn = [_xy(figure, label) for figure in (shuffled, ordered)]
        np.testing.assert_allclose(drawn[0], drawn[1], rtol=1e-9, atol=1e-12)
    x_drawn, y_drawn = _xy(shuffled, "data")
    np.testing.assert_array_equal(x_drawn, t[order])
    np.testing.assert_array_equal(y_drawn, y[order])


def _xy(figure, label: str) -> np.ndarray:
    """The data points of a line, or of an errorbar's marker line, as a [2, N] array."""
    ax = figure.axes[0]
    for container in ax.containers:  # errorbar: its markers are the container's first line
        if container.get_label() == label:
            return np.asarray(container.lines[0].get_data())
    return np.asarray(_line(figure, label).get_data())


def test_residuals_follow_the_sorted_data():
    t, y = _decay(seed=2)
    result = _fit_decay(t, y)
    residuals = fit_figure(result).axes[1].containers[0].lines[0]
    order = np.argsort(t)
    np.testing.assert_array_equal(residuals.get_xdata(), t[order])
    expected = y[order] - _closed_form(result, t[order])
    np.testing.assert_allclose(residuals.get_ydata(), expected, rtol=1e-9, atol=1e-12)


def test_band_is_drawn_when_the_covariance_is_finite():
    t, y = _decay(seed=3)
    result = _fit_decay(t, y)
    figure = fit_figure(result)
    (band,) = _band(figure)
    grid = np.asarray(_line(figure, "fit").get_xdata())
    lower, upper = (b.numpy() for b in result.confidence_band({"t": grid}))
    assert np.all(upper > lower)
    vertices = band.get_paths()[0].vertices
    assert vertices[:, 1].min() == pytest.approx(lower.min())
    assert vertices[:, 1].max() == pytest.approx(upper.max())


def test_no_band_without_degrees_of_freedom():
    result = _fit_decay(np.array([2.0, 0.0, 1.0]), np.array([2.0, 5.0, 3.0]))
    assert result.dof == 0
    figure = fit_figure(result)
    assert _band(figure) == []
    assert len(_line(figure, "fit").get_xdata()) == GRID_POINTS


def test_positional_x_and_sigma_with_column_labels(tmp_path):
    t, y = _decay(seed=4)
    result = gf.fit("exponential", torch.tensor(t), torch.tensor(y), sigma=np.full(len(t), 0.2))
    figure = fit_figure(result, labels={"x": "time", "y": "counts"})
    assert figure.axes[1].get_xlabel() == "time"
    assert figure.axes[0].get_ylabel() == "counts"
    grid, curve = _line(figure, "fit").get_data()
    assert np.all(np.diff(grid) > 0)
    np.testing.assert_allclose(curve, result.predict(grid).numpy(), rtol=1e-12)
    assert len(_band(figure)) == 1
    path = plot_fit(result, tmp_path / "fit.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_expression_variable_names_the_x_axis():
    t, y = _decay(seed=5)
    assert fit_figure(_fit_decay(t, y)).axes[1].get_xlabel() == "t"


def test_several_variables_fall_back_to_predicted_vs_observed():
    rng = np.random.default_rng(6)
    u, v = rng.uniform(0, 1, 20), rng.uniform(0, 1, 20)
    z = 2 * u + 3 * v + rng.normal(0, 0.1, 20)
    result = gf.fit(gf.Model("p*u + q*v", independent=["u", "v"]), {"u": u, "v": v}, z)
    figure = fit_figure(result)
    assert "predicted vs observed" in figure.axes[0].get_title()
    observed, predicted = _xy(figure, "data")
    np.testing.assert_array_equal(observed, z)
    np.testing.assert_allclose(predicted, result.predict({"u": u, "v": v}).numpy())


def test_demo_figure_draws_the_lstsq_optimum_on_the_grid():
    run = run_demo(seed=0, epochs=300)
    x, y = run.x.numpy().astype(float), run.y.numpy().astype(float)
    figure = after_training_figure(run.x, run.y, run.result.predict, optimum_curve(run.optimum))
    grid, drawn = _line(figure, "least-squares optimum").get_data()
    assert len(grid) == GRID_POINTS and np.all(np.diff(grid) > 0)
    design = np.stack([x**2, x, np.ones_like(x)], axis=1)
    solution = np.linalg.lstsq(design, y, rcond=None)[0]  # independently of the demo's torch code
    expected = np.stack([grid**2, grid, np.ones_like(grid)], axis=1) @ solution
    np.testing.assert_allclose(drawn, expected, rtol=1e-9, atol=1e-9)
    fit_grid, fitted = _line(figure, "y_pred").get_data()
    np.testing.assert_array_equal(fit_grid, grid)
    np.testing.assert_allclose(fitted, run.result.predict(grid).numpy(), rtol=1e-6)
    assert len(figure.axes) == 2  # the residual panel under the plot
    assert f"{run.excess:+.1%}" in figure.axes[0].get_title()
