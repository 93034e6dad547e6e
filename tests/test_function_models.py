"""Python-function models written SciPy's way, f(x, a, k, c), beside the post's f(x, params):
names from the signature, and the same answers as scipy.optimize.curve_fit."""

import numpy as np
import pytest
import torch

import gradfit as gf

curve_fit = pytest.importorskip("scipy.optimize").curve_fit


def decay(x, a, k, c):
    return a * torch.exp(-k * x) + c


def decay_np(x, a, k, c):
    return a * np.exp(-k * x) + c


def peak(x, amplitude, center, width, offset=0.5):
    return amplitude * torch.exp(-((x - center) ** 2) / (2 * width**2)) + offset


def peak_np(x, amplitude, center, width, offset):
    return amplitude * np.exp(-((x - center) ** 2) / (2 * width**2)) + offset


def noisy(f, x, true, seed=0, scale=0.05):
    rng = np.random.default_rng(seed)
    return f(x, *true) + rng.normal(0, scale, x.size)


def test_names_come_from_the_signature():
    model = gf.Model(decay)
    assert model.param_names == ("a", "k", "c")
    assert model.formula == "decay(x, a, k, c)"
    assert model.initial_params() is None  # no defaults: fit starts at ones, as curve_fit


@pytest.mark.parametrize("p0", [[2.0, 1.0, 0.0], {"a": 2.0, "k": 1.0, "c": 0.0}])
def test_fit_matches_curve_fit(p0):
    x = np.linspace(0, 5, 80)
    y = noisy(decay_np, x, (3.0, 0.7, 0.5))
    result = gf.fit(decay, x, y, p0=p0)
    start = list(p0.values()) if isinstance(p0, dict) else p0
    popt, pcov = curve_fit(decay_np, x, y, p0=start)
    assert list(result.params) == ["a", "k", "c"]
    assert list(result.params.values()) == pytest.approx(popt, rel=1e-6)
    assert list(result.stderr.values()) == pytest.approx(np.sqrt(np.diag(pcov)), rel=1e-4)


def test_fit_with_sigma_and_a_default_as_start_matches_curve_fit():
    x = np.linspace(-3, 3, 120)
    true = (2.0, 0.3, 0.8, 0.1)
    y = noisy(peak_np, x, true, seed=1, scale=0.02)
    sigma = np.full_like(x, 0.02)
    model = gf.Model(peak)
    assert model.initial_params().tolist() == [1.0, 1.0, 1.0, 0.5]  # offset=0.5: its start
    result = gf.fit(model, x, y, sigma=sigma, p0={"center": 0.0}, absolute_sigma=True)
    popt, pcov = curve_fit(peak_np, x, y, p0=[1, 0, 1, 0.5], sigma=sigma, absolute_sigma=True)
    assert result.params == pytest.approx(dict(zip(model.param_names, popt, strict=True)), 1e-6)
    assert list(result.stderr.values()) == pytest.approx(np.sqrt(np.diag(pcov)), rel=1e-4)


def test_first_order_optimizers_and_fit_batch_take_them_too():
    x = torch.linspace(0, 5, 60, dtype=torch.float64)
    y = 3 * torch.exp(-0.7 * x) + 0.5
    adam = gf.fit(decay, x, y, p0=[3.0, 0.6, 0.4], optimizer="adam", lr=1e-2, epochs=3000)
    assert adam.params == pytest.approx({"a": 3, "k": 0.7, "c": 0.5}, rel=1e-2)
    many = gf.fit_batch(decay, x, torch.stack([y, 2 * y]), p0=[1.0, 1.0, 0.0])
    assert many.param_names == ("a", "k", "c")
    expected = torch.tensor([[3, 0.7, 0.5], [6, 0.7, 1.0]], dtype=torch.float64)
    torch.testing.assert_close(many.params, expected, rtol=1e-6, atol=1e-8)


def test_the_vector_form_keeps_working():
    x = torch.linspace(-1, 1, 30, dtype=torch.float64)
    y = 2 * x + 1

    def line_params(x, params):
        a, b = params
        return a * x + b

    def line_theta(x, theta):
        return theta[0] * x + theta[1]

    def line_w(x, w):  # any name, with params= given
        return w[0] * x + w[1]

    for f in (line_params, line_theta, line_w):
        model = gf.Model(f, params=["a", "b"])
        assert model.formula == f"{f.__name__}(x, params)"
        assert gf.fit(model, x, y).params == pytest.approx({"a": 2, "b": 1})


def test_params_naming_the_signature_is_the_scipy_form():
    model = gf.Model(decay, params=["a", "k", "c"])
    assert model.formula == "decay(x, a, k, c)"


@pytest.mark.parametrize(
    ("build", "expected"),
    [
        (lambda: gf.Model(lambda x, params: x), ["takes its parameters as one vector",
                                                  "Model(f, params=[...])"]),
        (lambda: gf.Model(lambda x, *p: x), ["*args cannot name the parameters"]),
        (lambda: gf.Model(lambda x, a, *, k: a * x), ["keyword-only parameters (k)",
                                                       "make them positional"]),
        (lambda: gf.Model(lambda x: x), ["has no parameters to fit"]),
        (lambda: gf.Model(lambda x, a, mode="lin": a * x), ["'mode'", "non-numeric default"]),
        (lambda: gf.Model(decay, params=["A", "K", "C"]), ["one by one (a, k, c)"]),
        (lambda: gf.fit(lambda x, *p: x, [0, 1, 2], [0, 1, 2]), ["*args"]),
    ],
)  # fmt: skip
def test_signatures_that_cannot_name_parameters_are_refused(build, expected):
    with pytest.raises(gf.ModelError) as info:
        build()
    for text in expected:
        assert text in str(info.value)


def test_keyword_only_with_a_default_is_left_out_of_the_fit():
    def scaled(x, a, b, *, scale=2.0):
        return scale * (a * x + b)

    x = torch.linspace(0, 1, 20, dtype=torch.float64)
    result = gf.fit(scaled, x, 2 * (3 * x - 1))
    assert result.params == pytest.approx({"a": 3, "b": -1})
