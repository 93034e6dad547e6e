"""Saved results read back: ``FitResult.load`` (results.json) and ``BatchResult.load``."""

import json
import math
import sys

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure
from typer.testing import CliRunner

import gradfit as gf
from gradfit.cli.app import app
from gradfit.errors import ModelError
from gradfit.results.batch_result import BatchResult
from gradfit.results.fit_result import FitResult


def _decay(n=60, seed=0):
    rng = np.random.default_rng(seed)
    t = np.linspace(0, 10, n)
    sigma = np.full(n, 0.05)
    y = 3 * np.exp(-0.4 * t) + 0.5 + rng.normal(0, 0.05, n)
    return t, y, sigma


def _same_number(a, b):
    if a is None or b is None:
        assert a is b
    elif math.isnan(a):
        assert math.isnan(b)
    else:
        assert a == b


def assert_same_result(loaded, result):
    """Every saved number of ``result`` equal in ``loaded``, and the same JSON again."""
    assert loaded.param_names == result.param_names
    assert loaded.params == result.params
    assert loaded.stderr == result.stderr
    assert torch.equal(loaded.covariance.isnan(), result.covariance.isnan())
    torch.testing.assert_close(loaded.covariance, result.covariance, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(
        loaded.correlation, result.correlation, rtol=0, atol=0, equal_nan=True
    )
    for name in ("loss", "chi2", "reduced_chi2", "r2", "aic", "bic"):
        _same_number(getattr(loaded, name), getattr(result, name))
    for name in (
        "n_iter", "n_eval", "converged", "status", "message", "optimizer", "loss_name",
        "n_points", "dof", "absolute_sigma", "n_omitted", "at_bound", "fixed", "warnings",
        "provenance",
    ):  # fmt: skip
        assert getattr(loaded, name) == getattr(result, name), name
    assert loaded.history == result.history
    assert loaded.model.formula == result.model.formula
    assert loaded.model.param_names == result.model.param_names
    assert loaded.to_dict() == result.to_dict()  # the data, versions and model text too


def _fit_line_data(figure):
    (line,) = [ln for ax in figure.axes for ln in ax.get_lines() if ln.get_label() == "fit"]
    return line.get_xydata()


def test_expression_fit_round_trip(tmp_path):
    t, y, sigma = _decay()
    model = gf.Model("a*exp(-k*t) + c", independent="t")
    result = gf.fit(model, t, y, sigma=sigma, p0={"a": 1, "k": 1, "c": 0})
    path = result.save(tmp_path / "results.json")
    loaded = FitResult.load(path)
    assert_same_result(loaded, result)
    assert loaded.model.expression is not None and loaded.model.independent == ("t",)
    new_t = torch.linspace(-1, 12, 37, dtype=torch.float64)
    assert torch.equal(loaded.predict(new_t), result.predict(new_t))
    for got, want in zip(loaded.confidence_band(new_t), result.confidence_band(new_t), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    figure = loaded.plot()
    assert isinstance(figure, Figure) and len(figure.axes) == 2  # the fit and its residuals
    np.testing.assert_array_equal(_fit_line_data(figure), _fit_line_data(result.plot()))
    # the data came back too: the same points, the same residuals
    points = figure.axes[1].containers[0].lines[0].get_xydata()
    np.testing.assert_array_equal(points, result.plot().axes[1].containers[0].lines[0].get_xydata())


def test_plot_returns_the_figure_and_writes_it_with_a_path(tmp_path):
    x, y = gf.datasets.quadratic(seed=1)
    result = gf.fit("a*x**2 + b*x + c", x, y)
    figure = result.plot(tmp_path / "fit.png")
    assert isinstance(figure, Figure)
    assert (tmp_path / "fit.png").stat().st_size > 0
    paths = result.save_plots(tmp_path / "out")
    assert [p.name for p in paths] == ["fit.png", "history.png"]
    assert all(p.stat().st_size > 0 for p in paths)


def test_builtin_model_round_trip(tmp_path):
    x = np.linspace(-3, 3, 80)
    y = 2 * np.exp(-((x - 0.3) ** 2) / (2 * 0.7**2)) + 0.1 + 0.01 * np.sin(9 * x)
    result = gf.fit("gaussian", x, y)
    loaded = FitResult.load(result.save(tmp_path / "results.json"))
    assert_same_result(loaded, result)
    assert loaded.model.name == "gaussian" and loaded.model.guess_fn is not None
    grid = np.linspace(-5, 5, 11)
    assert torch.equal(loaded.predict(grid), result.predict(grid))


def test_function_model_loads_numbers_and_refuses_to_predict(tmp_path):
    t, y, _ = _decay()

    def decay(t, a, k, c):
        return a * torch.exp(-k * t) + c

    result = gf.fit(decay, t, y, p0={"a": 1, "k": 1, "c": 0})
    path = result.save(tmp_path / "results.json")
    assert json.loads(path.read_text())["model_spec"]["kind"] == "function"
    loaded = FitResult.load(path)
    assert_same_result(loaded, result)
    with pytest.raises(ModelError, match=r"cannot be rebuilt.*model="):
        loaded.predict(t)
    with pytest.raises(ModelError, match="cannot be rebuilt"):
        loaded.plot()
    # given the function again, it predicts as the original did
    again = FitResult.load(path, model=decay)
    assert torch.equal(again.predict(t), result.predict(t))
    with pytest.raises(ModelError, match="parameters"):
        FitResult.load(path, model="a*x + b")


def test_versions_and_cli_provenance_recorded(tmp_path, monkeypatch):
    x, y = gf.datasets.quadratic(seed=3)
    saved = json.loads(gf.fit("a*x**2 + b*x + c", x, y).to_json())
    assert saved["versions"]["gradfit"] == gf.__version__
    assert saved["versions"]["torch"] == torch.__version__
    assert saved["provenance"] == {}
    t, counts, _ = _decay()
    table = tmp_path / "decay.csv"
    np.savetxt(table, np.column_stack([t, counts]), delimiter=",", header="t,counts", comments="")
    args = ["fit", str(table), "--x", "t", "--y", "counts", "--model", "a*exp(-k*t)+c",
            "--p0", "a=1,k=1,c=0", "--out", str(tmp_path / "run")]  # fmt: skip
    monkeypatch.setattr(sys, "argv", ["gradfit", *args])
    outcome = CliRunner().invoke(app, args)
    assert outcome.exit_code == 0, outcome.output
    loaded = FitResult.load(tmp_path / "run" / "results.json")
    assert loaded.provenance == {"input": str(table), "command": ["gradfit", *args]}
    assert loaded.saved_versions["gradfit"] == gf.__version__
    assert loaded.saved_versions["torch"] == torch.__version__
    assert loaded.data["labels"] == {"x": "t", "y": "counts"}
    figure = loaded.plot()
    assert figure.axes[1].get_xlabel() == "t"
    assert loaded.predict({"t": t}).shape == (len(t),)


def _batch():
    x = torch.linspace(0, 1, 20, dtype=torch.float64)
    slopes = torch.tensor([1.0, 2.0, -1.0, 0.5], dtype=torch.float64)
    Y = slopes[:, None] * x + 0.3 + 0.01 * torch.sin(17 * x * (1 + slopes[:, None]))
    Y[3, :19] = float("nan")  # too few points: a status other than converged, NaN stderr
    return gf.fit_batch("a*x + b", x, Y, fixed={"b": 0.3})


@pytest.mark.parametrize("suffix", [".parquet", ".csv"])
def test_batch_result_round_trip(tmp_path, suffix):
    result = _batch()
    result.keys, result.key_name = np.array(["p", "q", "r", "s"]), "pixel"
    path = result.save(tmp_path / f"params{suffix}")
    loaded = BatchResult.load(path)
    assert loaded.param_names == result.param_names and loaded.key_name == "pixel"
    assert list(loaded.keys) == ["p", "q", "r", "s"]
    for name in ("params", "stderr", "loss", "reduced_chi2", "r2"):
        torch.testing.assert_close(
            getattr(loaded, name), getattr(result, name), rtol=0, atol=0, equal_nan=True
        )
    assert loaded.n_points.tolist() == result.n_points.tolist()
    assert loaded.n_iter.tolist() == result.n_iter.tolist()
    assert loaded.status_names == result.status_names
    if suffix == ".parquet":  # the schema's metadata keeps what the columns do not
        assert (loaded.optimizer, loaded.loss_name, loaded.fixed) == ("lm", "mse", ("b",))
        assert list(loaded.warning_texts()) == list(result.warning_texts())


def test_fit_many_output_loads(tmp_path):
    rng = np.random.default_rng(0)
    rows = []
    for g in range(3):
        t = np.linspace(0, 1, 15)
        rows += [(g, ti, (g + 1) * ti + 0.2 + rng.normal(0, 0.01)) for ti in t]
    table = tmp_path / "long.csv"
    np.savetxt(table, np.array(rows), delimiter=",", header="g,x,y", comments="")
    out = tmp_path / "params.parquet"
    outcome = CliRunner().invoke(
        app, ["fit-many", str(table), "--group", "g", "--model", "linear", "--out", str(out)]
    )
    assert outcome.exit_code == 0, outcome.output
    loaded = BatchResult.load(out)
    assert loaded.key_name == "g" and len(loaded) == 3
    assert loaded.status_names == ["converged"] * 3
    np.testing.assert_allclose(loaded.params[:, 0].numpy(), [1, 2, 3], atol=0.05)


def test_long_history_goes_to_an_npz_and_comes_back_bit_exact(tmp_path, monkeypatch):
    from gradfit.results import history_store

    t, y, _ = _decay()
    result = gf.fit("a*exp(-k*x) + c", t, y, p0={"a": 1, "k": 1, "c": 0}, optimizer="adam",
                    epochs=300, tol=None)  # fmt: skip
    monkeypatch.setattr(history_store, "INLINE_HISTORY", 100)
    path = result.save(tmp_path / "results.json")
    saved = json.loads(path.read_text())
    assert saved["history"] == {"file": "results.history.npz", "length": 300}
    loaded = FitResult.load(path)
    assert loaded.history == result.history  # float64 in the npz: every bit kept
    assert_same_result(loaded, result)

    short = gf.fit("a*exp(-k*x) + c", t, y, p0={"a": 1, "k": 1, "c": 0}, optimizer="adam",
                   epochs=50, tol=None)  # fmt: skip
    short.save(tmp_path / "short.json")  # stays inline, no npz beside it
    assert isinstance(json.loads((tmp_path / "short.json").read_text())["history"], list)
    assert not (tmp_path / "short.history.npz").exists()

    # the JSON and the npz from different runs are refused, naming the file
    saved["history"]["length"] = 299
    path.write_text(json.dumps(saved))
    with pytest.raises(gf.DataError, match=r"results\.history\.npz: holds 300 epochs"):
        FitResult.load(path)


def test_demo_stores_its_history_beside_results_json(tmp_path, monkeypatch):
    from gradfit.results import history_store

    monkeypatch.setattr(history_store, "INLINE_HISTORY", 100)
    out = tmp_path / "demo"
    ran = CliRunner().invoke(app, ["demo", "--epochs", "200", "--seed", "3", "--out", str(out)])
    assert ran.exit_code == 0, ran.output
    assert json.loads((out / "results.json").read_text())["history"]["length"] == 200
    loaded = FitResult.load(out / "results.json")
    with np.load(out / "results.history.npz") as npz:
        assert loaded.history == npz["loss"].tolist() and len(loaded.history) == 200
