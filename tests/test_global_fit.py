"""``gradfit.fit_global``: several datasets, some parameters shared, one stacked fit."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from numpy.typing import NDArray
from scipy.optimize import least_squares

import gradfit as gf
from gradfit.errors import OptionError

MODEL = "a*exp(-k*x) + c"
Arrays = tuple[NDArray[np.float64], ...]


def _datasets() -> list[Arrays]:
    """Three decays sharing k = 0.8, different a and c, lengths 40, 55, 30; sigma on one."""
    rng = np.random.default_rng(7)
    out: list[Arrays] = []
    for n, a, c, noise in ((40, 5.0, 1.0, 0.05), (55, 2.0, -0.5, 0.08), (30, 8.0, 0.3, 0.1)):
        x = np.sort(rng.uniform(0.0, 6.0, n))
        y = a * np.exp(-0.8 * x) + c + rng.normal(0.0, noise, n)
        out.append((x, y))
    x1, y1 = out[1]
    out[1] = (x1, y1, np.full(len(x1), 0.08) * rng.uniform(0.5, 1.5, len(x1)))
    return out


def _reference(datasets: list[Arrays], start: NDArray[np.float64]) -> tuple[Any, Any]:
    """SciPy on the hand-written stacked residuals; params (a_0, a_1, a_2, k, c_0, c_1, c_2)."""
    K = len(datasets)

    def unpack(p: NDArray[np.float64], i: int) -> tuple[float, float, float]:
        return p[i], p[K], p[K + 1 + i]

    def residuals(p: NDArray[np.float64]) -> NDArray[np.float64]:
        parts = []
        for i, (x, y, *sigma) in enumerate(datasets):
            a, k, c = unpack(p, i)
            r = a * np.exp(-k * x) + c - y
            parts.append(r / sigma[0] if sigma else r)
        return np.concatenate(parts)

    def jacobian(p: NDArray[np.float64]) -> NDArray[np.float64]:
        blocks = []
        for i, (x, _, *sigma) in enumerate(datasets):
            a, k, _c = unpack(p, i)
            J = np.zeros((len(x), len(p)))
            e = np.exp(-k * x)
            J[:, i], J[:, K], J[:, K + 1 + i] = e, -a * x * e, 1.0
            blocks.append(J / sigma[0][:, None] if sigma else J)
        return np.vstack(blocks)

    ref = least_squares(
        residuals, start, jac=jacobian, method="lm", xtol=1e-15, ftol=1e-15, gtol=1e-15
    )
    J = jacobian(ref.x)
    chi2_r = float(ref.fun @ ref.fun) / (len(ref.fun) - len(ref.x))
    stderr = np.sqrt(np.diag(np.linalg.inv(J.T @ J)) * chi2_r)
    return ref.x, stderr


def test_shared_decay_matches_scipy_on_stacked_residuals() -> None:
    datasets = _datasets()
    result = gf.fit_global(MODEL, datasets, shared=["k"], p0={"a": 3.0, "k": 0.5, "c": 0.0})
    names = ["a_0", "a_1", "a_2", "k", "c_0", "c_1", "c_2"]
    assert list(result.params) == names
    assert result.converged and result.warnings == []
    start = np.array([3.0, 3.0, 3.0, 0.5, 0.0, 0.0, 0.0])
    ref_params, ref_stderr = _reference(datasets, start)
    got = np.array([result.params[n] for n in names])
    np.testing.assert_allclose(got, ref_params, rtol=1e-6, atol=1e-9)
    stderr = np.array([result.stderr[n] for n in names])
    np.testing.assert_allclose(stderr, ref_stderr, rtol=1e-3)
    cov = np.asarray(result.covariance)
    np.testing.assert_allclose(np.sqrt(np.diag(cov)), ref_stderr, rtol=1e-3)


def test_p0_by_global_name_and_function_model() -> None:
    datasets = _datasets()

    def decay(x: torch.Tensor, a: torch.Tensor, k: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return a * torch.exp(-k * x) + c

    p0 = {"a": 3.0, "a_2": 7.0, "k": 0.5, "c": 0.0}
    by_expr = gf.fit_global(MODEL, datasets, shared=["k"], p0=p0)
    by_fn = gf.fit_global(decay, datasets, shared="k", p0=p0)
    assert list(by_fn.params) == list(by_expr.params)
    for name, value in by_expr.params.items():
        assert by_fn.params[name] == pytest.approx(value, rel=1e-6)


def test_fixed_and_bounds_on_base_and_global_names() -> None:
    datasets = _datasets()
    result = gf.fit_global(
        MODEL,
        datasets,
        shared=["k"],
        p0={"a": 3.0, "k": 0.5, "c": 0.0},
        fixed={"c": 0.0, "c_0": 1.0},
        bounds={"k": (0.1, 2.0)},
    )
    assert result.params["c_0"] == 1.0
    assert result.params["c_1"] == 0.0 and result.params["c_2"] == 0.0
    assert 0.1 < result.params["k"] < 2.0


def test_no_shared_parameter_equals_independent_fits() -> None:
    datasets = _datasets()
    p0 = {"a": 3.0, "k": 0.5, "c": 0.0}
    together = gf.fit_global(MODEL, datasets, shared=[], p0=p0)
    for i, (x, y, *sigma) in enumerate(datasets):
        alone = gf.fit(MODEL, x, y, sigma=sigma[0] if sigma else None, p0=p0)
        for name, value in alone.params.items():
            assert together.params[f"{name}_{i}"] == pytest.approx(value, rel=1e-6, abs=1e-9)


def test_length_mismatch_is_an_option_error() -> None:
    datasets: list[Any] = _datasets()
    x, y = datasets[2]
    datasets[2] = (x, y[:-1])
    with pytest.raises(OptionError, match=r"dataset 2: x has 30 points and y has 29"):
        gf.fit_global(MODEL, datasets, shared=["k"])
    x, y, sigma = _datasets()[1]
    with pytest.raises(OptionError, match=r"dataset 0: sigma has 54 points and y has 55"):
        gf.fit_global(MODEL, [(x, y, sigma[1:])], shared=["k"])


def test_unknown_shared_name_is_an_option_error() -> None:
    with pytest.raises(OptionError, match=r"unknown shared parameter 'kk'.*'k'"):
        gf.fit_global(MODEL, _datasets(), shared=["kk"])


def test_unknown_names_and_bad_datasets_are_option_errors() -> None:
    with pytest.raises(OptionError, match=r"parameter in p0 'b'"):
        gf.fit_global(MODEL, _datasets(), shared=["k"], p0={"b": 1.0})
    with pytest.raises(OptionError, match=r"parameter in fixed 'c_3'"):
        gf.fit_global(MODEL, _datasets(), shared=["k"], fixed={"c_3": 1.0})
    with pytest.raises(OptionError, match="datasets is empty"):
        gf.fit_global(MODEL, [], shared=["k"])
    with pytest.raises(OptionError, match=r"dataset 0 must be \(x, y\)"):
        gf.fit_global(MODEL, [([1.0, 2.0],)], shared=["k"])


def test_nan_rows_are_omitted_per_dataset() -> None:
    datasets: list[Any] = _datasets()
    x, y = datasets[0]
    y_nan = y.copy()
    y_nan[5] = np.nan
    p0 = {"a": 3.0, "k": 0.5, "c": 0.0}
    options = gf.FitOptions(nan_policy="omit", p0=p0)
    with_nan = gf.fit_global(MODEL, [(x, y_nan), *datasets[1:]], shared=["k"], options=options)
    dropped = [(np.delete(x, 5), np.delete(y, 5)), *datasets[1:]]
    without = gf.fit_global(MODEL, dropped, shared=["k"], p0=p0)
    assert with_nan.n_omitted == 1
    for name, value in without.params.items():
        assert with_nan.params[name] == pytest.approx(value, rel=1e-9)
    with pytest.raises(gf.DataError, match=r"dataset 0: y has a non-finite value"):
        gf.fit_global(MODEL, [(x, y_nan)], shared=["k"])


def test_a_dataset_too_short_for_its_parameters_is_fitted_and_flagged() -> None:
    """One point for a_1 and c_1: the fit runs (the dense path) and says they are not
    determined, instead of failing."""
    (x0, y0), (x1, y1, _), _ = _datasets()
    p0 = {"a": 3.0, "k": 0.5, "c": 0.0}
    result = gf.fit_global(MODEL, [(x0, y0), (x1[:1], y1[:1])], shared=["k"], p0=p0)
    assert result.stderr["a_1"] is None and result.stderr["c_1"] is None
    assert any("a_1 and c_1" in w for w in result.warnings)
    alone = gf.fit(MODEL, x0, y0, p0=p0)
    assert result.params["k"] == pytest.approx(alone.params["k"], rel=1e-6)
