"""`gradfit.fit` against independent references: closed-form least squares, torch.optim."""

import json
import math

import numpy as np
import pytest
import torch

import gradfit as gf
from gradfit.optim.first_order import Adam, GradientDescent, Momentum


def closed_form(x, y):
    x, y = torch.as_tensor(x, dtype=torch.float64), torch.as_tensor(y, dtype=torch.float64)
    A = torch.stack([x**2, x, torch.ones_like(x)], dim=1)
    return torch.linalg.lstsq(A, y.unsqueeze(1)).solution.squeeze(1)


def values(result, names="abc"):
    return torch.tensor([result.params[n] for n in names], dtype=torch.float64)


@pytest.mark.parametrize(
    ("optimizer", "options"),
    [
        ("lm", {}),
        ("auto", {}),
        ("lbfgs", {}),
        ("gd", {"lr": 0.6, "epochs": 30_000}),  # 0.6 < 2/λmax of the post's Hessian
        ("sgd", {"lr": 0.1, "epochs": 6_000}),
        ("adam", {"lr": 0.05, "epochs": 8_000, "tol": 1e-15}),
    ],
)
@pytest.mark.parametrize("seed", [0, 1])
def test_every_optimizer_reaches_the_least_squares_optimum(optimizer, options, seed):
    x, y = gf.datasets.quadratic(seed=seed)
    result = gf.fit("a*x**2 + b*x + c", x, y, optimizer=optimizer, **options)
    torch.testing.assert_close(values(result), closed_form(x, y), rtol=2e-6, atol=1e-6)
    design = torch.stack([x.double() ** 2, x.double(), torch.ones(len(x), dtype=torch.float64)])
    optimum_mse = float(((closed_form(x, y) @ design - y.double()) ** 2).mean())
    assert result.loss == pytest.approx(optimum_mse, rel=1e-9)


def test_the_posts_function_model_and_loss_work_unchanged():
    def f(x, params):
        a, b, c = params
        return a * (x**2) + b * x + c

    x, y = gf.datasets.quadratic(seed=4)
    model = gf.Model(f, params=["a", "b", "c"])
    result = gf.fit(model, x, y, loss=gf.losses.mse, optimizer="lm")
    torch.testing.assert_close(values(result), closed_form(x, y), rtol=1e-7, atol=1e-7)


def test_nn_module_parameters_are_fitted():
    torch.manual_seed(0)
    x = torch.linspace(-1, 1, 50, dtype=torch.float64)
    y = 3 * x - 1 + 0.1 * torch.randn(50, dtype=torch.float64)
    module = torch.nn.Linear(1, 1).double()
    result = gf.fit(module, x, y, optimizer="lm")
    assert set(result.params) == {"weight", "bias"}
    slope, intercept = np.polyfit(x.numpy(), y.numpy(), 1)
    assert result.params["weight"] == pytest.approx(slope, rel=1e-8)
    assert result.params["bias"] == pytest.approx(intercept, rel=1e-8)


def test_custom_loss_callable_uses_lbfgs_and_is_minimised():
    x = torch.linspace(0, 1, 41, dtype=torch.float64)
    y = 2 * x + 1
    y[5] += 50  # an outlier an absolute loss should shrug off

    def absolute(y_pred, y_true):
        return (y_pred - y_true).abs().sum()

    result = gf.fit("a*x + b", x, y, loss=absolute, p0={"a": 1.0, "b": 0.0})
    assert result.optimizer == "lbfgs"
    assert result.params["a"] == pytest.approx(2, abs=1e-3)
    assert result.params["b"] == pytest.approx(1, abs=1e-3)


@pytest.mark.parametrize(
    "builtin",
    [
        "linear",
        "quadratic",
        "exponential",
        "gaussian",
        "lorentzian",
        "logistic",
        "power_law",
        "sine",
    ],
)
def test_builtins_recover_their_parameters_from_their_own_guess(builtin):
    model = gf.Model(builtin)
    truth = {
        "linear": [2.0, -1.0],
        "polynomial2": [1.0, -2.0, 3.0],
        "exponential": [5.0, 0.7, 1.0],
        "gaussian": [3.0, 0.4, 0.8, 0.5],
        "lorentzian": [3.0, -0.5, 0.6, 0.2],
        "logistic": [4.0, 2.5, 1.0, -1.0],
        "power_law": [2.0, 1.5],
        "sine": [1.5, 0.35, 0.4, 0.2],
    }[model.name]
    x = torch.linspace(0.1, 10, 200, dtype=torch.float64)
    if builtin in ("gaussian", "lorentzian", "logistic", "linear", "quadratic"):
        x = x - 5  # centre the peaks and the step in the sampled range
    y = model(x, torch.tensor(truth, dtype=torch.float64))
    y = y + 0.01 * torch.randn(200, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    result = gf.fit(model, x, y)
    assert result.converged, result.message
    for name, true in zip(model.param_names, truth, strict=True):
        assert result.params[name] == pytest.approx(true, rel=0.02, abs=0.02), name


def test_p0_mapping_bounds_and_fixed_parameters():
    t = torch.linspace(0, 10, 80, dtype=torch.float64)
    y = 4 * torch.exp(-0.6 * t) + 0.5
    model = gf.Model("a*exp(-k*t) + c", independent="t")
    result = gf.fit(
        model, t, y, p0={"a": 1, "k": 2, "c": 0}, fixed={"c": 0.5}, bounds={"k": (0, None)}
    )
    assert result.params["c"] == 0.5
    assert result.stderr["c"] is None
    assert result.params["a"] == pytest.approx(4, rel=1e-8)
    assert result.params["k"] == pytest.approx(0.6, rel=1e-8)


def test_an_active_bound_holds_and_is_reported():
    x = torch.linspace(0, 1, 30, dtype=torch.float64)
    y = -2 * x + 1  # the unconstrained slope is -2
    for optimizer in ("lm", "lbfgs", "adam"):
        epochs = 3000 if optimizer == "adam" else None
        p0 = {"a": 1, "b": 0}
        result = gf.fit(
            "a*x + b", x, y, bounds={"a": (0, 10)}, optimizer=optimizer, p0=p0, epochs=epochs
        )
        assert result.params["a"] >= 0
        assert result.params["a"] == pytest.approx(0, abs=1e-3), optimizer


def test_several_independent_variables_as_a_mapping():
    rng = np.random.default_rng(0)
    x1, x2 = rng.uniform(0, 1, 60), rng.uniform(0, 1, 60)
    y = 1.5 * x1 - 2 * x2 + 0.3
    model = gf.Model("a*x1 + b*x2 + c", independent=["x1", "x2"])
    result = gf.fit(model, {"x1": x1, "x2": x2}, y)
    assert result.params == pytest.approx({"a": 1.5, "b": -2.0, "c": 0.3}, abs=1e-9)


def test_nan_policy_omit_drops_rows_and_raise_names_the_row():
    x = np.linspace(0, 1, 20)
    y = 2 * x + 1
    y[7] = np.nan
    with pytest.raises(gf.DataError, match="row 7"):
        gf.fit("a*x + b", x, y)
    result = gf.fit("a*x + b", x, y, nan_policy="omit")
    assert result.n_omitted == 1
    assert result.n_points == 19
    assert result.params["a"] == pytest.approx(2)


def test_a_diverging_run_stops_and_keeps_the_best_finite_parameters():
    x, y = gf.datasets.quadratic(seed=0)
    result = gf.fit("a*x**2 + b*x + c", x, y, optimizer="gd", lr=50.0, epochs=5000)
    assert result.status == "diverged"
    assert not result.converged
    assert "epoch" in result.message and "learning rate" in result.message
    assert all(math.isfinite(v) for v in result.params.values())
    assert math.isfinite(result.loss)
    assert result.loss <= result.history[0]


def test_tol_stops_the_loop_early():
    x, y = gf.datasets.quadratic(seed=0)
    result = gf.fit("a*x**2 + b*x + c", x, y, optimizer="adam", lr=0.05, epochs=50_000, tol=1e-9)
    assert result.converged
    assert result.n_iter < 50_000
    assert "tol" in result.message


#: every key of ``FitResult.to_dict()``: a new key must be added here, and so compared below
DICT_KEYS = {
    "model", "param_names", "params", "stderr", "covariance", "correlation", "loss",
    "loss_name", "optimizer", "n_iter", "n_eval", "converged", "status", "message",
    "warnings", "n_points", "n_omitted", "dof", "chi2", "reduced_chi2", "r2", "aic", "bic",
    "absolute_sigma", "fixed", "at_bound", "history", "model_spec", "versions", "provenance",
    "data",
}  # fmt: skip


def assert_dict_matches_result(data, result, rel=0.0):
    """Every value of ``data`` (``to_dict()``, ``to_json()``, results.json) against ``result``.

    Numbers equal the result's own (``rel``: relative tolerance; 0 is exact), NaN/inf are
    JSON null; stderr is null for fixed and undetermined parameters.
    """

    def number(got, want):
        if want is None or not math.isfinite(want):
            assert got is None, (got, want)
        else:
            assert got == pytest.approx(float(want), rel=rel, abs=0), (got, want)

    def numbers(got, want):
        assert len(got) == len(want)
        for g, w in zip(got, want, strict=True):
            if isinstance(w, list):
                numbers(g, w)
            else:
                number(g, w)

    assert set(data) == DICT_KEYS
    assert data["model"] == getattr(result.model, "formula", str(result.model))
    assert data["param_names"] == list(result.param_names)
    assert list(data["params"]) == list(result.params) == list(result.param_names)
    numbers(list(data["params"].values()), list(result.params.values()))
    assert list(data["stderr"]) == list(result.param_names)
    numbers(list(data["stderr"].values()), list(result.stderr.values()))
    numbers(data["covariance"], result.covariance.tolist())
    numbers(data["correlation"], result.correlation.tolist())
    for key in ("loss", "chi2", "reduced_chi2", "r2", "aic", "bic"):
        number(data[key], getattr(result, key))
    numbers(data["history"], result.history)
    for key in (
        "loss_name", "optimizer", "n_iter", "n_eval", "converged", "status", "message",
        "warnings", "n_points", "n_omitted", "dof", "absolute_sigma",
    ):  # fmt: skip
        assert data[key] == getattr(result, key), key
    assert type(data["converged"]) is bool and type(data["absolute_sigma"]) is bool
    assert data["fixed"] == list(result.fixed)
    assert data["at_bound"] == list(result.at_bound)


def test_predict_and_json_round_trip(tmp_path):
    x, y = gf.datasets.quadratic(seed=2)
    result = gf.fit("a*x**2 + b*x + c", x, y)
    p = values(result)
    grid = torch.tensor([0.0, 0.5, 2.0], dtype=torch.float64)
    torch.testing.assert_close(result.predict(grid), p[0] * grid**2 + p[1] * grid + p[2])
    as_dict = result.to_dict()
    assert_dict_matches_result(as_dict, result)
    assert json.loads(result.to_json()) == as_dict  # JSON loses nothing: floats round-trip
    assert json.loads(result.save(tmp_path / "results.json").read_text()) == as_dict
    # the values computable without gradfit: least squares by hand on the design matrix
    xd, yd = x.double(), y.double()
    design = torch.stack([xd**2, xd, torch.ones_like(xd)], dim=1)
    n, k = len(xd), 3
    residuals = yd - design @ p
    chi2 = float(residuals @ residuals)
    assert list(as_dict["params"].values()) == pytest.approx(closed_form(x, y).tolist())
    assert as_dict["n_points"] == n and as_dict["n_omitted"] == 0
    assert as_dict["dof"] == n - k
    assert as_dict["chi2"] == pytest.approx(chi2, rel=1e-10)
    assert as_dict["loss"] == pytest.approx(chi2 / n, rel=1e-10)  # mse
    assert as_dict["history"][-1] == pytest.approx(chi2 / n, rel=1e-10)
    assert as_dict["n_iter"] == len(as_dict["history"])
    assert as_dict["reduced_chi2"] == pytest.approx(chi2 / (n - k), rel=1e-10)
    assert as_dict["r2"] == pytest.approx(1 - chi2 / float(((yd - yd.mean()) ** 2).sum()))
    assert as_dict["aic"] == pytest.approx(n * math.log(chi2 / n) + 2 * k, rel=1e-10)
    assert as_dict["bic"] == pytest.approx(n * math.log(chi2 / n) + math.log(n) * k, rel=1e-10)
    covariance = chi2 / (n - k) * torch.linalg.inv(design.T @ design)
    np.testing.assert_allclose(as_dict["covariance"], covariance.numpy(), rtol=1e-8)
    stderr = covariance.diagonal().sqrt()
    assert list(as_dict["stderr"].values()) == pytest.approx(stderr.tolist(), rel=1e-8)
    correlation = covariance / torch.outer(stderr, stderr)
    np.testing.assert_allclose(as_dict["correlation"], correlation.numpy(), rtol=1e-8)
    assert as_dict["param_names"] == list("abc")
    assert (as_dict["optimizer"], as_dict["loss_name"]) == ("lm", "mse")
    assert as_dict["status"] == "converged" and as_dict["converged"] is True
    assert as_dict["warnings"] == [] and as_dict["fixed"] == [] and as_dict["at_bound"] == []
    assert as_dict["absolute_sigma"] is False


def test_json_of_fixed_and_bounded_parameters():
    t = torch.linspace(0, 10, 80, dtype=torch.float64)
    y = 4 * torch.exp(-0.6 * t) + 0.5
    model = gf.Model("a*exp(-k*t) + c", independent="t")
    result = gf.fit(model, t, y, p0={"a": 1, "k": 2, "c": 0}, fixed={"c": 0.5})
    as_dict = json.loads(result.to_json())
    assert_dict_matches_result(as_dict, result)
    assert as_dict["fixed"] == ["c"] and as_dict["stderr"]["c"] is None
    assert as_dict["params"]["c"] == 0.5
    assert as_dict["dof"] == 80 - 2  # the fixed parameter is not fitted
    bounded = gf.fit("a*x + b", t, -2 * t + 1, bounds={"a": (0, 10)}, p0={"a": 1, "b": 0})
    as_dict = json.loads(bounded.to_json())
    assert_dict_matches_result(as_dict, bounded)
    assert as_dict["at_bound"] == ["a"]
    assert any("bound" in warning for warning in as_dict["warnings"])


@pytest.mark.parametrize(
    ("ours", "theirs"),
    [
        (GradientDescent(lr=0.1), lambda p: torch.optim.SGD([p], lr=0.1)),
        (Momentum(lr=0.05, momentum=0.9), lambda p: torch.optim.SGD([p], lr=0.05, momentum=0.9)),
        (Adam(lr=0.01), lambda p: torch.optim.Adam([p], lr=0.01)),
    ],
)
def test_our_steps_match_torch_optim(ours, theirs):
    torch.manual_seed(0)
    target = torch.randn(5, dtype=torch.float64)
    mine = torch.zeros(5, dtype=torch.float64, requires_grad=True)
    reference = torch.zeros(5, dtype=torch.float64, requires_grad=True)
    state, optimizer = ours.init(mine), theirs(reference)
    for _ in range(200):
        (grad,) = torch.autograd.grad(((mine - target) ** 4).sum(), mine)
        ours.update(mine, grad, state)
        optimizer.zero_grad()
        ((reference - target) ** 4).sum().backward()
        optimizer.step()
    torch.testing.assert_close(mine.detach(), reference.detach(), rtol=1e-12, atol=1e-12)


def test_a_diverged_fit_still_plots(tmp_path):
    # the loss reaches ~1e305 before it overflows: the log-scale history must not overflow
    x, y = gf.datasets.quadratic(seed=0)
    result = gf.fit("a*x**2 + b*x + c", x, y, optimizer="gd", lr=10.0, epochs=500)
    assert result.status == "diverged" and max(result.history) > 1e300
    paths = result.save_plots(tmp_path)
    assert all(p.stat().st_size > 0 for p in paths)


@pytest.mark.parametrize("loss", ["huber", "soft_l1", "cauchy", "arctan"])
def test_lm_reports_the_robust_loss_itself_whatever_f_scale(loss):
    x = np.linspace(0, 1, 50)
    y = 2 * x + 1 + 0.3 * np.sin(40 * x)
    y[5] += 5
    f_scale = 0.5
    loss_fn = gf.losses.get_loss(loss).with_options(f_scale=f_scale)
    single = gf.fit("a*x + b", x, y, loss=loss, f_scale=f_scale, optimizer="lm")
    expected = float(loss_fn(single.predict(x), torch.tensor(y)))
    assert single.loss == pytest.approx(expected, rel=1e-12)
    assert single.history[-1] == pytest.approx(expected, rel=1e-12)
    batch = gf.fit_batch("a*x + b", x, np.stack([y, y]), loss=loss, f_scale=f_scale)
    np.testing.assert_allclose(batch.loss.numpy(), [expected, expected], rtol=1e-9)
