"""Composite models (``Model + Model``, ``-``, ``*``, ``/``) with lmfit's ``prefix=``:
expression models again, so they keep the compiled kernel, ``fit_batch`` and the CLI."""

import json

import numpy as np
import pytest
import torch
from scipy.optimize import curve_fit
from typer.testing import CliRunner

import gradfit as gf
from gradfit.cli.app import app
from gradfit.model.composite import parse_composite
from gradfit.optim import compiled_lm

needs_numba = pytest.mark.skipif(compiled_lm() is None, reason="no compiled kernel (Numba)")
TRUE = {
    "p1_amplitude": 3.0, "p1_center": -2.0, "p1_width": 0.8,
    "p2_amplitude": 2.0, "p2_center": 1.5, "p2_width": 1.2,
    "a": 0.3, "b": 1.0,
}  # fmt: skip
P0 = {
    "p1_amplitude": 2.5, "p1_center": -1.8, "p1_width": 1.0,
    "p2_amplitude": 1.5, "p2_center": 1.2, "p2_width": 1.0,
    "a": 0.0, "b": 0.5,
}  # fmt: skip
# the Gaussians' offsets and the line's b are one constant: fit b alone
FIXED = {"p1_offset": 0.0, "p2_offset": 0.0}


def two_peaks_and_line():
    return (
        gf.Model("gaussian", prefix="p1_") + gf.Model("gaussian", prefix="p2_") + gf.Model("linear")
    )


def numpy_model(x, a1, c1, w1, a2, c2, w2, a, b):
    peaks = a1 * np.exp(-((x - c1) ** 2) / (2 * w1**2)) + a2 * np.exp(
        -((x - c2) ** 2) / (2 * w2**2)
    )
    return peaks + a * x + b


def data(seed=0, n=200):
    rng = np.random.default_rng(seed)
    x = np.linspace(-6.0, 6.0, n)
    return x, numpy_model(x, *TRUE.values()) + rng.normal(0.0, 0.05, n)


@pytest.fixture
def kernel_calls(monkeypatch):
    """Counts the compiled kernel's fits (on even under ``make test``'s GRADFIT_COMPILED=0)."""
    monkeypatch.delenv("GRADFIT_COMPILED", raising=False)
    bridge = compiled_lm()
    calls = []
    if bridge is not None:
        monkeypatch.setattr(bridge, "ENABLED", True)
        real = bridge.fit_curves

        def spy(*args, **kwargs):
            calls.append(1)
            return real(*args, **kwargs)

        monkeypatch.setattr(bridge, "fit_curves", spy)
    return calls


def test_parameter_names_and_order():
    model = two_peaks_and_line()
    gauss = ("amplitude", "center", "width", "offset")
    assert model.param_names == (
        *(f"p1_{n}" for n in gauss),
        *(f"p2_{n}" for n in gauss),
        "a",
        "b",
    )
    assert model.expression is not None and model.programs is not None
    assert model.guess_fn is None  # a composite starts from p0, not from a built-in guess
    # the Lorentzian's own order survives the prefix; a prefixed built-in keeps its guess
    lorentz = gf.Model("lorentzian", prefix="q_")
    assert lorentz.param_names == tuple(f"q_{n}" for n in gauss)
    assert lorentz.guess_fn is not None and lorentz.name == "lorentzian(prefix=q_)"
    mixed = gf.Model("a*x") * gf.Model("exp(-k*x)") / gf.Model("1 + c*x") - gf.Model("d + 0*x")
    assert mixed.param_names == ("a", "k", "c", "d")
    x = torch.linspace(0.0, 2.0, 5, dtype=torch.float64)
    p = torch.tensor([2.0, 0.5, 0.3, 0.1], dtype=torch.float64)
    expected = 2.0 * x * torch.exp(-0.5 * x) / (1 + 0.3 * x) - 0.1
    torch.testing.assert_close(mixed(x, p), expected)


def test_a_name_in_both_operands_is_one_shared_parameter():
    model = gf.Model("a*exp(-k*x)") + gf.Model("a*x + c")
    assert model.param_names == ("a", "k", "c")


def test_recovers_the_parameters_as_curve_fit_does(kernel_calls):
    x, y = data()
    result = gf.fit(two_peaks_and_line(), x, y, p0=P0, fixed=FIXED)
    assert result.status == "converged"
    reference, _ = curve_fit(numpy_model, x, y, p0=list(P0.values()))
    fitted = np.array([result.params[n] for n in TRUE])
    np.testing.assert_allclose(fitted, reference, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(fitted, list(TRUE.values()), atol=0.05)
    if compiled_lm() is not None:
        assert kernel_calls, "a composite of expressions runs the compiled kernel"


@needs_numba
def test_fit_batch_runs_the_compiled_kernel_and_equals_fit(kernel_calls):
    curves = [data(seed) for seed in range(4)]
    x = curves[0][0]
    Y = np.stack([y for _, y in curves])
    model = two_peaks_and_line()
    batch = gf.fit_batch(model, x, Y, p0=P0, fixed=FIXED)
    assert kernel_calls
    for k, (_, y) in enumerate(curves):
        one = gf.fit(model, x, y, p0=P0, fixed=FIXED)
        assert batch.status_names[k] == one.status
        np.testing.assert_allclose(
            batch.params[k].numpy(), [one.params[n] for n in model.param_names], rtol=1e-9
        )


def test_function_and_module_models_are_refused():
    def line(x, a, b):
        return a * x + b

    with pytest.raises(gf.ModelError, match=r"Python function.*expression models and built-ins"):
        gf.Model(line) + gf.Model("gaussian")
    with pytest.raises(gf.ModelError, match=r"nn\.Module"):
        gf.Model("gaussian") * gf.Model(torch.nn.Linear(1, 1))
    with pytest.raises(gf.ModelError, match="Python function"):
        gf.Model(line, prefix="p1_")
    with pytest.raises(gf.ModelError, match="independent"):
        gf.Model("a*t", independent="t") + gf.Model("linear")
    with pytest.raises(TypeError):
        gf.Model("linear") + 1.0


def test_cli_form_is_parsed_without_eval():
    model = parse_composite("gaussian(prefix=p1_) + gaussian(prefix=p2_) + linear")
    assert model is not None and model.param_names == two_peaks_and_line().param_names
    assert parse_composite("a*x + b") is None  # a plain expression stays one
    assert parse_composite("gaussian") is None  # a built-in stays the built-in
    product = parse_composite("linear * (exp(-k*x)) + (c + 0*x)")
    assert product is not None and product.param_names == ("a", "b", "k", "c")
    with pytest.raises(gf.ModelError, match="not a term"):
        parse_composite("gaussian(prefix=p1_) + a*x")
    with pytest.raises(gf.ModelError, match="not a term"):
        parse_composite("gaussian(prefix=__import__('os')) + linear")


def test_cli_fits_a_composite(tmp_path):
    x, y = data()
    path = tmp_path / "peaks.csv"
    path.write_text(
        "t,y\n" + "".join(f"{a!r},{b!r}\n" for a, b in zip(x.tolist(), y.tolist(), strict=True))
    )
    spec = "gaussian(prefix=p1_) + gaussian(prefix=p2_) + linear"
    p0 = ",".join(f"{k}={v}" for k, v in P0.items())
    fix = ",".join(f"{k}={v}" for k, v in FIXED.items())
    args = ["fit", str(path), "--x", "t", "--model", spec, "--p0", p0, "--fix", fix, "--json"]
    out = CliRunner().invoke(app, args)
    assert out.exit_code == 0, out.output
    params = json.loads(out.stdout)["params"]
    library = gf.fit(two_peaks_and_line(), x, y, p0=P0, fixed=FIXED).params
    for name in TRUE:
        assert params[name] == pytest.approx(library[name], rel=1e-9)
