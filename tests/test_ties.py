"""Tied parameters (``ties=``, ``--tie``): lmfit's ``expr`` by substitution into the model."""

import json

import numpy as np
import pytest
import torch
from scipy.optimize import curve_fit
from typer.testing import CliRunner

import gradfit as gf
from gradfit.cli.app import app
from gradfit.errors import OptionError
from gradfit.model.models import Model

TIES = {"p2_width": "p1_width", "p2_center": "p1_center + 1.4"}
START = {"p1_amplitude": 2.5, "p1_center": 0.3, "p1_width": 1.0, "p1_offset": 0.0}
START |= {"p2_amplitude": 1.5}
FIXED = {"p2_offset": 0.0}  # two offsets could not be told apart
# SciPy's trf to its limits: its lm stops short by 1e-8 on the offset (a higher cost)
TIGHT = {"method": "trf", "x_scale": "jac", "xtol": 1e-15, "ftol": 1e-15, "gtol": 1e-15}


def two_gaussians():
    return Model("gaussian", prefix="p1_") + Model("gaussian", prefix="p2_")


def data(seed=0, n=200):
    rng = np.random.default_rng(seed)
    x = np.linspace(-5, 8, n)
    y = 3 * np.exp(-((x - 0.5) ** 2) / (2 * 1.2**2)) + 2 * np.exp(-((x - 1.9) ** 2) / 2.88)
    return x, y + 0.05 * rng.normal(size=n)


def reduced(x, a1, c1, w1, o1, a2):
    """The tied model written by hand, with its five free parameters."""
    g1 = a1 * np.exp(-((x - c1) ** 2) / (2 * w1**2))
    return g1 + o1 + a2 * np.exp(-((x - (c1 + 1.4)) ** 2) / (2 * w1**2))


@pytest.mark.parametrize("optimizer", ["lm", "lbfgs"])
def test_ties_match_curve_fit_on_the_hand_written_reduced_function(optimizer):
    x, y = data()
    result = gf.fit(two_gaussians(), x, y, p0=START, fixed=FIXED, ties=TIES, optimizer=optimizer)
    popt, pcov = curve_fit(reduced, x, y, p0=list(START.values()), **TIGHT)
    perr = np.sqrt(np.diag(pcov))
    free = ["p1_amplitude", "p1_center", "p1_width", "p1_offset", "p2_amplitude"]
    assert result.param_names == (*free, "p2_offset")  # the fitted model's, fixed included
    assert list(result.params) == list(two_gaussians().param_names)  # the model's order
    rtol = 1e-6 if optimizer == "lm" else 1e-5
    for i, name in enumerate(free):
        assert result.params[name] == pytest.approx(popt[i], rel=rtol, abs=1e-9)
        assert result.stderr[name] == pytest.approx(perr[i], rel=1e-4)
    assert result.params["p2_width"] == pytest.approx(popt[2], rel=rtol)
    assert result.params["p2_center"] == pytest.approx(popt[1] + 1.4, rel=rtol)
    assert result.params["p2_offset"] == 0.0 and result.stderr["p2_offset"] is None
    # delta method, computed independently from curve_fit's covariance: g = d tie / d free
    for name, g in (("p2_width", [0, 0, 1, 0, 0]), ("p2_center", [0, 1, 0, 0, 0])):
        expected = float(np.sqrt(np.array(g) @ pcov @ np.array(g)))
        assert result.stderr[name] == pytest.approx(expected, rel=1e-4)
    assert result.tied == TIES
    saved = json.loads(result.to_json())
    assert saved["tied"] == TIES
    assert saved["params"]["p2_center"] == pytest.approx(result.params["p2_center"])
    assert saved["stderr"]["p2_width"] == pytest.approx(result.stderr["p2_width"])


def test_tie_of_several_parameters_gets_the_delta_method_stderr():
    x, y = data(seed=1)
    ties = {
        "p2_width": "p1_width",
        "p2_center": "p1_center + 1.4",
        "p2_amplitude": "p1_amplitude*2/3",
    }
    result = gf.fit(two_gaussians(), x, y, p0=START, fixed=FIXED, ties=ties)

    def f(x, a1, c1, w1, o1):
        return reduced(x, a1, c1, w1, o1, a1 * 2 / 3)

    popt, pcov = curve_fit(f, x, y, p0=list(START.values())[:4], **TIGHT)
    assert result.params["p2_amplitude"] == pytest.approx(popt[0] * 2 / 3, rel=1e-6)
    g = np.array([2 / 3, 0, 0, 0])
    assert result.stderr["p2_amplitude"] == pytest.approx(float(np.sqrt(g @ pcov @ g)), rel=1e-4)

    # a tie of two parameters: g = (1, 1) for a + b, against curve_fit's covariance
    t = np.linspace(0, 4, 50)
    rng = np.random.default_rng(2)
    v = 2 * np.exp(-0.7 * t) + 0.5 + rng.normal(0, 0.02, t.size)
    r = gf.fit("a*exp(-k*x) + c", t, v, ties={"c": "a*k/3 + 0.2"}, p0={"a": 1, "k": 1})
    popt, pcov = curve_fit(
        lambda x, a, k: a * np.exp(-k * x) + a * k / 3 + 0.2, t, v, p0=[1, 1], **TIGHT
    )
    g = np.array([popt[1] / 3, popt[0] / 3])
    assert r.params["c"] == pytest.approx(popt[0] * popt[1] / 3 + 0.2, rel=1e-6)
    assert r.stderr["c"] == pytest.approx(float(np.sqrt(g @ pcov @ g)), rel=1e-4)


@pytest.mark.parametrize(
    ("ties", "fixed", "message"),
    [
        ({"p2_width": "p1_width", "p1_width": "p2_width"}, None, "cycle"),
        ({"p2_width": "p1_widht"}, None, "unknown parameter 'p1_widht'"),
        ({"p2_offset": "p1_offset"}, {"p2_offset": 0.0}, "fixed"),
        ({"p2_width": "p1_width*x"}, None, "not the variable 'x'"),
        ({"p9": "p1_width"}, None, "no parameter 'p9'"),
        ({"p2_width": "__import__('os')"}, None, "tie p2_width="),
    ],
)
def test_bad_ties_are_refused_naming_the_tie(ties, fixed, message):
    x, y = data()
    with pytest.raises(OptionError, match=message) as error:
        gf.fit(two_gaussians(), x, y, ties=ties, fixed=fixed)
    assert "tie " in str(error.value)


def test_ties_of_function_models_are_refused():
    def line(x, a, b):
        return a * x + b

    with pytest.raises(OptionError, match="expression models"):
        gf.fit(line, np.arange(5.0), np.arange(5.0), ties={"b": "a"})


def test_fit_batch_with_ties_equals_fit_curve_by_curve():
    x = data()[0]
    Y = np.stack([data(seed)[1] * scale for seed, scale in ((0, 1.0), (3, 1.3), (4, 0.8))])
    batch = gf.fit_batch(two_gaussians(), x, Y, p0=START, fixed=FIXED, ties=TIES)
    assert batch.param_names == two_gaussians().param_names
    for k in range(len(Y)):
        one = gf.fit(two_gaussians(), x, Y[k], p0=START, fixed=FIXED, ties=TIES)
        for i, name in enumerate(batch.param_names):
            assert float(batch.params[k, i]) == pytest.approx(one.params[name], rel=1e-8)
            expected = np.nan if one.stderr[name] is None else one.stderr[name]
            assert float(batch.stderr[k, i]) == pytest.approx(expected, rel=1e-6, nan_ok=True)
    assert batch.status_names == ["converged"] * 3
    assert batch.warning_flags.tolist() == [0, 0, 0]


def test_cli_tie_end_to_end(tmp_path):
    x, y = data()
    path = tmp_path / "peaks.csv"
    path.write_text("x,y\n" + "".join(f"{a},{b}\n" for a, b in zip(x, y, strict=True)))
    out = tmp_path / "run"
    args = [
        "fit", str(path), "--model", "gaussian(prefix=p1_) + gaussian(prefix=p2_)",
        "--p0", ",".join(f"{k}={v}" for k, v in START.items()), "--fix", "p2_offset=0",
        "--tie", "p2_width=p1_width", "--tie", "p2_center = p1_center + 1.4", "--out", str(out),
    ]  # fmt: skip
    run = CliRunner().invoke(app, args)
    assert run.exit_code == 0, run.output
    saved = json.loads((out / "results.json").read_text())
    expected = gf.fit(two_gaussians(), x, y, p0=START, fixed=FIXED, ties=TIES)
    assert saved["tied"] == TIES
    for name, value in expected.params.items():
        assert saved["params"][name] == pytest.approx(value, rel=1e-9, abs=1e-12)
    # comma-joined, and a bad one: one error line, exit 2
    joined = CliRunner().invoke(
        app, [*args[:-2], "--tie", "p2_width=p1_width,p2_center=p1_center+1.4"]
    )
    assert joined.exit_code == 0, joined.output
    bad = CliRunner().invoke(app, [*args[:-2], "--tie", "p2_width=nope"])
    assert bad.exit_code == 2
    assert "unknown parameter 'nope'" in bad.output


def test_ties_keep_a_built_in_guess_and_reduce_p0_vectors():
    x = torch.linspace(-3, 3, 80, dtype=torch.float64)
    y = 2 * torch.exp(-(x**2) / 2) + 0.5
    r = gf.fit("gaussian", x, y, ties={"offset": "0.5"})
    assert r.params["offset"] == 0.5 and r.stderr["offset"] == 0.0
    assert r.params["amplitude"] == pytest.approx(2.0, rel=1e-8)
    vector = gf.fit("a*x + b", [0.0, 1.0, 2.0], [1.0, 3.0, 5.0], p0=[1.0, 9.0], ties={"b": "a/2"})
    assert vector.params["a"] == pytest.approx(vector.params["b"] * 2)
    assert json.loads(vector.to_json())["tied"] == {"b": "a/2"}


@pytest.mark.parametrize("optimizer", ["lm", "adam"])
def test_fit_batch_ties_with_a_curve_too_short_to_fit(optimizer):
    x = np.linspace(0, 4, 30)
    Y = np.stack([2 * np.exp(-0.7 * x) + 0.5, np.full(30, np.nan)])
    Y[1, 0] = 1.0  # one point: too few (a singular covariance must not fail the chunk)
    batch = gf.fit_batch("a*exp(-k*x)+c", x, Y, ties={"c": "a/4"}, optimizer=optimizer)
    assert batch.param_names == ("a", "k", "c")
    assert batch.status_names[1] == "too_few_points"
    assert np.isnan(batch.params[1].numpy()).all() and np.isnan(batch.stderr[1].numpy()).all()
    assert float(batch.params[0, 2]) == pytest.approx(float(batch.params[0, 0]) / 4)
