"""Results that say when they cannot be trusted: ``FitResult.warnings``, the CLI's ``warning:``
lines, results.json's list, the batch's status vocabulary and ``warnings`` column."""

import json

import numpy as np
import pytest
import torch
from nist import NAMES, load
from typer.testing import CliRunner

import gradfit as gf
from gradfit.cli.app import app
from gradfit.optim.least_squares import _STATUS
from gradfit.optim.status import STATUSES
from gradfit.results.batch_result import NOT_CONVERGED, NOT_ESTIMABLE, STATUS_NAMES, BatchResult
from gradfit.results.stats import estimability, estimability_tolerance

pytestmark = pytest.mark.usefixtures("one_thread")


def nist_fit(name, p0=None):
    problem = load(name)
    names = [f"b{i + 1}" for i in range(problem.n_params)]
    model = gf.Model(problem.model, independent=problem.independent, params=names)
    x = problem.x if len(problem.independent) > 1 else problem.x[problem.independent[0]]
    return gf.fit(model, x, problem.y, p0=p0, optimizer="lm")


def line_data(n=50, seed=0):
    rng = np.random.default_rng(seed)
    x = np.linspace(0, 10, n)
    return x, 6 * x + 1 + rng.normal(0, 0.1, n)


# --- fits that must warn ------------------------------------------------------------------


def test_misra1a_from_ones_warns_about_b2():
    result = nist_fit("Misra1a")  # no p0: ones; exp(-b2 x) vanishes and b2 runs off
    about_b2 = [w for w in result.warnings if "b2" in w]
    assert about_b2, result.warnings
    assert any("ran away" in w or "no effect" in w for w in about_b2), about_b2
    assert result.stderr["b2"] is None
    assert json.loads(result.to_json())["stderr"]["b2"] is None


def test_parameters_that_cannot_be_told_apart_are_named_and_have_no_stderr():
    x, y = line_data()
    result = gf.fit("a*b*x + c", x, y, p0={"a": 1.0, "b": 3.0, "c": 0.0})
    assert any(w.startswith("a and b cannot be told apart") for w in result.warnings)
    assert any("covariance not estimable for a and b" in w for w in result.warnings)
    assert result.stderr["a"] is None and result.stderr["b"] is None
    data = json.loads(result.to_json())
    assert data["stderr"]["a"] is None and data["covariance"][0][0] is None
    # c is still determined: its error is the straight line's, as if a·b were one parameter
    # (the reduced χ² divides by N - 3 rather than N - 2)
    line = gf.fit("m*x + c", x, y)
    dof_ratio = (len(x) - 2) / (len(x) - 3)
    assert result.stderr["c"] == pytest.approx(line.stderr["c"] * dof_ratio**0.5, rel=1e-6)
    assert "[not estimable]" in result.report()


def test_adam_stopped_by_the_epoch_limit_far_from_the_optimum_warns():
    x, y = gf.datasets.quadratic(n=100, seed=0)
    result = gf.fit("a*x**2 + b*x + c", x, y, optimizer="adam", lr=1e-3, epochs=2000)
    assert result.status == "max_iter"
    (warning,) = result.warnings
    assert warning.startswith("not converged: stopped by the epoch limit (2000 epochs)")
    assert "still falling by" in warning and "per epoch" in warning


def test_an_lm_iteration_limit_warns():
    x, y = gf.datasets.quadratic(n=100, seed=0)
    result = gf.fit("a*exp(b*x) + c", x, y, epochs=2)
    assert result.status == "max_iter"
    assert result.warnings[0].startswith("not converged: stopped by the iteration limit (2 ")


def test_a_parameter_at_its_bound_warns():
    t = np.linspace(0, 10, 60)
    y = 80 * np.exp(-0.4 * t) + 5 + np.random.default_rng(3).normal(0, 0.5, t.size)
    result = gf.fit("a*exp(-k*x) + c", t, y, p0={"a": 50, "k": 0.1, "c": 0},
                    bounds={"k": (0, 0.2)})  # fmt: skip
    assert result.at_bound == ("k",)
    assert any(w.startswith("k = 0.2 is at its upper bound 0.2") for w in result.warnings)


def test_a_hook_stop_says_not_converged():
    x, y = gf.datasets.quadratic(n=100, seed=0)
    result = gf.fit("a*x**2 + b*x + c", x, y, optimizer="gd", lr=1e-3, epochs=100,
                    hook=lambda epoch, loss: epoch == 9)  # fmt: skip
    assert result.status == "interrupted"
    assert result.warnings[0] == "not converged: the hook asked to stop after epoch 9"


# --- fits that must not warn ---------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_nist_problems_from_their_certified_values_have_no_warnings(name):
    result = nist_fit(name, p0=load(name).certified)
    assert result.warnings == [], result.warnings
    assert all(v is not None for v in result.stderr.values())


def test_the_nist_problems_stay_far_above_the_estimability_tolerance():
    # Bennett5, the closest, keeps 3.9e-5 of a column outside the others' span: 250x tau
    tau = estimability_tolerance(torch.float64)
    for name in ("Bennett5", "Lanczos1", "MGH10"):
        problem = load(name)
        names = [f"b{i + 1}" for i in range(problem.n_params)]
        model = gf.Model(problem.model, independent=problem.independent, params=names)
        x = torch.as_tensor(problem.x[problem.independent[0]])
        _, J = model.jacobian(x, torch.as_tensor(problem.certified))
        e = estimability(J)
        assert bool(e.estimable.all()), name
        assert float(e.covariance.diagonal().mul((J * J).sum(0)).max()) < 1e-4 / tau**2, name


@pytest.mark.parametrize(
    ("expression", "truth", "span"),
    [
        ("a*x**2 + b*x + c", [20.0, 5.0, -3.0], (0, 1)),
        ("a*exp(-k*x) + c", [5.0, 0.8, 1.0], (0, 6)),
        ("amplitude*exp(-(x - center)**2/(2*width**2)) + offset", [3.0, 0.3, 0.9, 0.4], (-4, 4)),
        ("a/(1 + exp(-k*(x - m)))", [2.0, 3.0, 1.0], (-2, 4)),
    ],
)
def test_typical_fits_have_no_warnings(expression, truth, span):
    rng = np.random.default_rng(7)
    x = np.linspace(*span, 70)
    model = gf.Model(expression)
    y = model(torch.as_tensor(x), torch.tensor(truth, dtype=torch.float64)).numpy()
    result = gf.fit(model, x, y + rng.normal(0, 0.1, x.size), p0=truth)
    assert result.converged and result.warnings == [], result.warnings


def test_the_posts_quadratic_with_lm_and_a_converged_adam_have_no_warnings():
    x, y = gf.datasets.quadratic(n=100, seed=0)
    assert gf.fit("a*x**2 + b*x + c", x, y, optimizer="lm").warnings == []
    # adam ends at its epoch limit (no tol), but on the optimum: no alarm
    adam = gf.fit("a*x**2 + b*x + c", x, y, optimizer="adam", lr=0.05, epochs=20_000)
    assert adam.status == "max_iter" and adam.warnings == []


def test_fixed_parameters_are_no_warning():
    x, y = line_data()
    result = gf.fit("m*x + c", x, y, fixed={"c": 1.0})
    assert result.warnings == [] and result.stderr["c"] is None


# --- one status vocabulary, messages without the status word --------------------------------


def test_fit_and_batch_statuses_come_from_one_vocabulary():
    assert set(_STATUS.values()) <= set(STATUSES)
    assert set(STATUS_NAMES.values()) - {"running"} <= set(STATUSES)
    assert {_STATUS[code] for code in _STATUS} == {STATUS_NAMES[int(code)] for code in _STATUS}


def test_messages_do_not_repeat_the_status():
    x, y = gf.datasets.quadratic(n=100, seed=0)
    result = gf.fit("a*x**2 + b*x + c", x, y)
    assert result.status == "converged" and not result.message.startswith("converged")
    assert "converged: converged" not in result.report()
    batch = gf.fit_batch("a*x**2 + b*x + c", x.numpy(), np.stack([y.numpy()] * 2))
    assert batch.status_names == ["converged"] * 2
    assert not batch.messages[0].startswith("converged")


# --- the CLI and results.json ---------------------------------------------------------------


def write_csv(path, x, y):
    lines = ["x,y"] + [f"{a},{b}" for a, b in zip(x, y, strict=True)]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_cli_prints_warning_lines_and_results_json_lists_them(tmp_path):
    data = write_csv(tmp_path / "line.csv", *line_data())
    out = tmp_path / "run"
    args = ["fit", data, "--x", "x", "--y", "y", "--model", "a*b*x + c", "--p0", "a=1,b=3,c=0"]
    result = CliRunner().invoke(app, [str(a) for a in [*args, "--out", out, "--report"]])
    assert result.exit_code == 0, result.output
    lines = [line for line in result.stderr.splitlines() if line.startswith("warning: ")]
    assert any("a and b cannot be told apart" in line for line in lines), result.stderr
    saved = json.loads((out / "results.json").read_text())
    assert [f"warning: {w}" for w in saved["warnings"]] == lines
    assert saved["stderr"]["a"] is None and saved["stderr"]["c"] is not None
    assert "cannot be told apart" in (out / "report.html").read_text()
    assert result.stdout.index("[[Warnings]]") < result.stdout.index("[[Parameters]]")


def test_cli_good_fit_has_an_empty_warnings_list(tmp_path):
    data = write_csv(tmp_path / "line.csv", *line_data())
    args = ["fit", data, "--x", "x", "--y", "y", "--model", "m*x + c", "--json"]
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["warnings"] == []
    assert "warning:" not in result.stderr


# --- per curve in BatchResult -----------------------------------------------------------------


def test_batch_warnings_column_flags_only_the_curves_to_doubt():
    x = np.linspace(0, 1, 20)
    rng = np.random.default_rng(0)
    y = np.stack([2 * x**2 - x + 1 + rng.normal(0, 0.01, 20) for _ in range(3)])
    y[1, 2:] = np.nan  # 2 points for 3 parameters
    batch = gf.fit_batch("a*x**2 + b*x + c", x, y)
    assert batch.status_names == ["converged", "too_few_points", "converged"]
    texts = batch.to_arrow().column("warnings").to_pylist()
    assert texts[0] == texts[2] == ""
    assert texts[1].startswith("fit failed (too_few_points)")
    assert batch.warning_flags.tolist() == [0, NOT_CONVERGED, 0]
    assert batch[1]["warnings"] == [texts[1]]


def test_batch_first_order_at_the_epoch_limit_is_not_converged():
    x = np.linspace(0, 1, 20)
    y = np.stack([2 * x**2 - x + 1, x**2 + 1])
    batch = gf.fit_batch("a*x**2 + b*x + c", x, y, optimizer="adam", lr=0.05, epochs=50)
    assert batch.warnings(0) == ["not converged: stopped after the maximum of 50 epochs"]


def test_batch_nan_stderr_of_free_parameters_only_is_flagged():
    nan = float("nan")
    stderr = torch.tensor([[0.1, nan, nan], [0.1, 0.2, nan], [nan, nan, nan]])
    batch = BatchResult(
        params=torch.zeros(3, 3), stderr=stderr, loss=torch.zeros(3),
        n_iter=torch.tensor([5, 5, 0]), status=torch.tensor([1, 4, 7]),
        param_names=("a", "b", "c"), reduced_chi2=torch.zeros(3), r2=torch.zeros(3),
        n_points=torch.tensor([9, 9, 1]), fixed=("c",),
    )  # fmt: skip
    assert batch.warning_flags.tolist() == [NOT_ESTIMABLE, NOT_CONVERGED, NOT_CONVERGED]
    assert batch.warnings(0) == ["covariance not estimable for b"]
    assert batch.warnings(1) == ["not converged: stopped after the maximum of 5 iterations"]
    assert batch.warnings(2)[0].startswith("fit failed (too_few_points)")


@pytest.mark.parametrize("compiled", [True, False], ids=["compiled", "torch"])
def test_batch_stderr_of_parameters_that_cannot_be_told_apart_is_nan(compiled, monkeypatch):
    from gradfit.optim.compiled import bridge as lm_compiled

    monkeypatch.setattr(lm_compiled, "ENABLED", compiled)
    x, y = line_data()
    batch = gf.fit_batch("a*b*x + c", x, np.stack([y, y + 1]), p0=[1.0, 3.0, 0.0])
    assert bool(batch.stderr[:, :2].isnan().all())
    assert all("covariance not estimable for a, b" in t for t in batch.warning_texts())
