"""Functions written in NumPy, as curve_fit users write them: Levenberg–Marquardt with a
finite-difference Jacobian (the same answers as scipy.optimize.curve_fit), gradient-based
optimizers refused with the fix named, torch functions on their autodiff path as before."""

import numpy as np
import pytest
import torch

import gradfit as gf
from gradfit.errors import OptionError

curve_fit = pytest.importorskip("scipy.optimize").curve_fit


def decay(x, a, k, c):
    return a * np.exp(-k * x) + c


def decay_torch(x, a, k, c):
    return a * torch.exp(-k * x) + c


def gaussian(x, amplitude, center, width, offset):
    return amplitude * np.exp(-((x - center) ** 2) / (2 * width**2)) + offset


def noisy(f, x, true, seed=0, scale=0.05):
    rng = np.random.default_rng(seed)
    return f(x, *true) + rng.normal(0, scale, x.size)


def assert_matches_curve_fit(result, f, x, y, p0):
    popt, pcov = curve_fit(f, x, y, p0=p0)
    got = np.array([result.params[n] for n in result.param_names])
    stderr = np.array([result.stderr[n] for n in result.param_names])
    np.testing.assert_allclose(got, popt, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(stderr, np.sqrt(np.diag(pcov)), rtol=1e-4)


def test_numpy_exponential_equals_curve_fit():
    x = np.linspace(0, 5, 60)
    y = noisy(decay, x, (3.0, 0.8, 0.5))
    result = gf.fit(decay, x, y, p0=[1.0, 1.0, 0.0])
    assert result.converged, result.message
    assert_matches_curve_fit(result, decay, x, y, [1.0, 1.0, 0.0])
    assert result.model.numerical and result.jacobian == "numerical"
    assert "finite differences" in result.message
    assert "finite differences" in result.to_dict()["message"]  # results.json says it too
    prediction = result.predict(x)
    assert isinstance(prediction, torch.Tensor) and prediction.shape == (60,)


def test_numpy_gaussian_equals_curve_fit():
    x = np.linspace(-4, 6, 80)
    y = noisy(gaussian, x, (2.0, 1.0, 0.7, 0.3), seed=1)
    p0 = [1.5, 0.8, 1.0, 0.0]
    result = gf.fit(gaussian, x, y, p0=p0)
    assert result.converged, result.message
    assert_matches_curve_fit(result, gaussian, x, y, p0)
    lo, hi = result.confidence_band(x)  # the band's Jacobian by finite differences too
    assert bool((lo <= hi).all())


def test_numpy_vector_form():
    def vector(x, params):
        a, k, c = params
        return a * np.exp(-k * x) + c

    x = np.linspace(0, 5, 60)
    y = noisy(decay, x, (3.0, 0.8, 0.5))
    result = gf.fit(gf.Model(vector, params=["a", "k", "c"]), x, y, p0=[1.0, 1.0, 0.0])
    assert_matches_curve_fit(result, decay, x, y, [1.0, 1.0, 0.0])


@pytest.mark.parametrize("optimizer", ["adam", "gd", "sgd", "lbfgs"])
def test_gradient_optimizers_are_refused_with_the_fix(optimizer):
    x = np.linspace(0, 5, 30)
    y = noisy(decay, x, (3.0, 0.8, 0.5))
    with pytest.raises(OptionError, match="NumPy") as error:
        gf.fit(decay, x, y, p0=[1.0, 1.0, 0.0], optimizer=optimizer, epochs=10)
    assert "torch" in str(error.value) and "optimizer='lm'" in str(error.value)


def test_torch_functions_keep_autodiff():
    x = np.linspace(0, 5, 60)
    y = noisy(decay, x, (3.0, 0.8, 0.5))
    model = gf.Model(decay_torch)
    result = gf.fit(model, x, y, p0=[1.0, 1.0, 0.0])
    assert not model.numerical and result.jacobian == "analytic"
    assert "finite differences" not in result.message
    expression = gf.fit("a*exp(-k*x) + c", x, y, p0={"a": 1.0, "k": 1.0, "c": 0.0})
    for name in ("a", "k", "c"):  # autodiff and symbolic derivatives agree to rounding
        assert result.params[name] == pytest.approx(expression.params[name], rel=1e-10)
        assert result.stderr[name] == pytest.approx(expression.stderr[name], rel=1e-8)
    # gradients flow: the first-order optimizers still work on torch functions
    adam = gf.fit(gf.Model(decay_torch), x, y, p0=[1.0, 1.0, 0.0], optimizer="adam", epochs=5)
    assert adam.n_iter == 5


def test_fit_batch_fits_numpy_functions_curve_by_curve():
    x = np.linspace(0, 5, 40)
    truths = [(3.0, 0.8, 0.5), (2.0, 0.5, 0.1), (4.0, 1.2, -0.3)]
    Y = np.stack([noisy(decay, x, t, seed=i) for i, t in enumerate(truths)])
    batch = gf.fit_batch(decay, x, Y, p0=[1.0, 1.0, 0.0])
    params = np.asarray(batch.params)
    stderr = np.asarray(batch.stderr)
    for i in range(len(truths)):
        popt, pcov = curve_fit(decay, x, Y[i], p0=[1.0, 1.0, 0.0])
        np.testing.assert_allclose(params[i], popt, rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(stderr[i], np.sqrt(np.diag(pcov)), rtol=1e-4)


def test_fit_batch_refuses_adam_for_numpy_functions():
    x = np.linspace(0, 5, 20)
    Y = np.stack([noisy(decay, x, (3.0, 0.8, 0.5), seed=i) for i in range(2)])
    with pytest.raises(OptionError, match="NumPy"):
        gf.fit_batch(decay, x, Y, p0=[1.0, 1.0, 0.0], optimizer="adam", lr=0.01, epochs=5)
