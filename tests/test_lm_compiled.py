"""The compiled LM kernel gives each curve the PyTorch kernel's answer (to rounding)."""

import math

import numpy as np
import pytest
import torch

import gradfit as gf
from gradfit.batch import fit_batch as batch
from gradfit.model.losses import get_loss
from gradfit.model.models import as_model
from gradfit.model.parameters import ParameterSpace
from gradfit.optim.compiled import bridge as lm_compiled
from gradfit.optim.compiled import interpreter as compiled_program
from gradfit.optim.least_squares import residual_functions
from gradfit.optim.lm import LMStatus, levenberg_marquardt
from gradfit.optim.problem import Problem
from gradfit.results.batch_result import TOO_FEW_POINTS

GAUSSIAN = "amplitude*exp(-(x - center)**2/(2*width**2)) + offset"
# every operation and function the parser accepts, several in derivatives only (sign, powers)
EXPRESSIONS = [
    "a*x**2 + b*x + c",
    GAUSSIAN,
    "a*exp(-k*x) + c",
    "a*log(b + x) - log10(c + x**2)",
    "a*sqrt(x + b) + c/x",
    "a*sin(b*x + c) + cos(x)*tan(0.1*x) - pi",
    "a*arcsin(x/(abs(b) + 5)) + arccos(x/7)*c + arctan(b*x)",
    "a*sinh(x/4) + b*cosh(x/5) + tanh(c*x)",
    "a*erf(b*(x - c)) + e",
    "a*abs(x - b) + c*x**-2 + x**0.5 + b**2*x**3",
    "a*x**b + c**x",
    "-a/(1 + (x - b)**2/c**2)",
    "a + 0*x",  # value constant over the points, derivatives plain numbers
]


def run_compiled(code, x, params):
    S, n = len(code.op), len(x)
    scalars, points = np.empty(S), np.empty((S, n))
    for rate in (compiled_program.PER_CURVE, compiled_program.PER_POINT):
        compiled_program.run(code.arrays, rate, x, n, params, (scalars, points))
    rate_of = code.rate
    return [
        np.full(n, scalars[s]) if rate_of[s] == compiled_program.SCALAR else points[s].copy()
        for s in code.outputs
    ]


@pytest.mark.parametrize("expression", EXPRESSIONS)
def test_interpreter_matches_the_program_on_values_and_derivatives(expression):
    model = as_model(expression)
    _, full = lm_compiled._codes(model)
    x = np.linspace(0.3, 2.9, 23)
    rng = np.random.default_rng(len(expression))
    for _ in range(3):
        params = rng.uniform(0.5, 1.5, len(model.param_names))
        got = run_compiled(full, x, params)
        want = model.value_and_derivatives(torch.from_numpy(x), torch.from_numpy(params))
        for g, w in zip(got, want, strict=True):
            np.testing.assert_allclose(g, w.numpy(), rtol=1e-12, atol=1e-300)


def test_interpreter_keeps_nan_and_domain_errors_as_torch_does():
    model = as_model("log(a*x) + sqrt(b - x) + arcsin(x) + 1/(x - a)")
    _, full = lm_compiled._codes(model)
    x = np.array([-1.0, 0.0, 0.5, 1.0, 2.0, np.nan])
    params = np.array([1.0, 1.0])
    got = run_compiled(full, x, params)
    want = model.value_and_derivatives(torch.from_numpy(x), torch.from_numpy(params))
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(np.isnan(g), np.isnan(w.numpy()))
        finite = np.isfinite(w.numpy())
        np.testing.assert_allclose(g[finite], w.numpy()[finite], rtol=1e-12)


def problem_for(expression, x, y, sigma=None, bounds=None, fixed=None, loss="mse", f_scale=1.0):
    model = as_model(expression)
    space = ParameterSpace.build(model.param_names, bounds, fixed)
    loss_fn = get_loss(loss).with_options(sigma=sigma, f_scale=f_scale)
    return Problem(model, x, y, loss_fn, space)


def both_kernels(problem, theta0, mask=None, **options):
    residuals, stacked = residual_functions(problem)
    loss = problem.loss
    robust = None if loss.name in ("mse", "sse", "chi2") else loss.rho
    reference = levenberg_marquardt(
        residuals,
        theta0,
        stacked=stacked,
        mask=mask,
        robust=robust,
        f_scale=loss.f_scale,
        **options,
    )
    compiled = lm_compiled.fit_curves(problem, theta0, mask, rows=True, **options)
    return reference, compiled


def assert_same_outcome(reference, compiled, rtol=1e-9, iterations=True, reference_rows=None):
    assert compiled.status.tolist() == reference.status.tolist()
    if iterations:  # exact fits stop on rounding noise, after a rounding-dependent count
        assert compiled.n_iter.tolist() == reference.n_iter.tolist()
    np.testing.assert_allclose(compiled.theta, reference.theta.numpy(), rtol=rtol, atol=1e-12)
    np.testing.assert_allclose(compiled.cost, reference.cost.numpy(), rtol=1e-8, atol=1e-14)
    rows = reference.rows if reference_rows is None else reference_rows
    np.testing.assert_allclose(compiled.rows, rows.numpy(), rtol=1e-7, atol=1e-10)


def noisy(expression, truth, x, K, noise, seed):
    model = as_model(expression)
    rng = np.random.default_rng(seed)
    scale = torch.from_numpy(rng.uniform(0.8, 1.2, (K, len(truth))))
    params = torch.tensor(truth, dtype=torch.float64) * scale
    y = model(x, params) + noise * torch.from_numpy(rng.normal(size=(K, x.shape[-1])))
    return y


@pytest.mark.parametrize(
    ("expression", "truth", "start"),
    [
        ("a*x**2 + b*x + c", [2.0, -1.0, 0.5], [1.0, 1.0, 1.0]),
        (GAUSSIAN, [3.0, 0.5, 0.8, 0.2], [2.0, 0.2, 1.0, 0.0]),
        ("a*exp(-k*x) + c", [2.0, 1.3, 0.1], [1.0, 0.5, 0.0]),
        ("a*sin(w*x + p)", [1.0, 2.0, 0.3], [1.2, 1.9, 0.1]),
    ],
)
def test_same_iterations_statuses_and_solutions_as_the_torch_kernel(expression, truth, start):
    x = torch.linspace(0, 4, 60, dtype=torch.float64)
    y = noisy(expression, truth, x, K=50, noise=0.05, seed=3)
    problem = problem_for(expression, x, y)
    theta0 = torch.tensor(start, dtype=torch.float64).expand(50, -1).clone()
    assert_same_outcome(*both_kernels(problem, theta0))


def test_bounds_fixed_parameters_sigma_and_masks():
    rng = np.random.default_rng(7)
    K, N = 30, 40
    x = torch.from_numpy(np.sort(rng.uniform(0, 5, (K, N)), axis=1))
    y = noisy("a*exp(-k*x) + c + d*x", [2.0, 0.7, 0.3, 0.0], x, K, 0.05, 8)
    sigma = torch.from_numpy(rng.uniform(0.02, 0.1, (K, N)))
    mask = torch.from_numpy(rng.uniform(size=(K, N)) > 0.2)
    bounds = {"a": (0.0, 5.0), "k": (0.1, None), "c": (None, 2.0)}
    problem = problem_for("a*exp(-k*x) + c + d*x", x, y, sigma, bounds, {"d": 0.0})
    p0 = torch.tensor([1.0, 1.0, 0.0, 0.0], dtype=torch.float64).expand(K, -1)
    theta0 = problem.space.to_theta(p0)
    reference, compiled = both_kernels(problem, theta0, mask)
    # with bounds, the rows handed back differentiate with respect to the model's parameters
    params = problem.space.to_params(reference.theta)
    rows = torch.where(mask.unsqueeze(1), batch._weighted_rows(problem, params), 0.0)
    assert_same_outcome(reference, compiled, reference_rows=rows)


@pytest.mark.parametrize("loss", ["huber", "soft_l1", "cauchy", "arctan"])
def test_robust_losses_as_the_torch_kernel(loss):
    rng = np.random.default_rng(9)
    x = torch.linspace(0, 4, 50, dtype=torch.float64)
    y = noisy("a*exp(-k*x) + c", [2.0, 1.3, 0.1], x, 30, 0.05, 10)
    y[:, ::7] += torch.from_numpy(rng.normal(0, 1.0, y[:, ::7].shape))  # outliers
    mask = torch.from_numpy(rng.uniform(size=y.shape) > 0.1)
    problem = problem_for("a*exp(-k*x) + c", x, y, loss=loss, f_scale=0.1)
    theta0 = torch.tensor([1.0, 0.5, 0.0], dtype=torch.float64).expand(30, -1)
    assert_same_outcome(*both_kernels(problem, theta0, mask))


def test_stopping_codes_for_hard_cases():
    x = torch.linspace(0, 1, 12, dtype=torch.float64)
    y = torch.stack(
        [
            2 * x + 1,  # exact: converges at once
            torch.full_like(x, 3.0),  # constant curve (R² undefined)
            torch.cos(7 * x),  # a line fits badly: still converges
        ]
    )
    problem = problem_for("a*x + b", x, y)
    theta0 = torch.ones(3, 2, dtype=torch.float64)
    assert_same_outcome(*both_kernels(problem, theta0), iterations=False)
    # a parameter that does not act, non-finite start, iteration limit
    converged = (LMStatus.FTOL, LMStatus.XTOL, LMStatus.GTOL)
    cases = [("a*x + b*0", [1.0, 1.0], converged), ("log(a*x)", [-1.0], (LMStatus.NON_FINITE,))]
    for expression, start, status in cases:
        problem = problem_for(expression, x[1:], y[:1, 1:])
        theta0 = torch.tensor([start], dtype=torch.float64)
        reference, compiled = both_kernels(problem, theta0)
        assert compiled.status.tolist() == reference.status.tolist()
        assert compiled.status[0] in status
    problem = problem_for(GAUSSIAN, x, y[2:])
    theta0 = torch.tensor([[1.0, 0.5, 0.5, 0.0]], dtype=torch.float64)
    reference, compiled = both_kernels(problem, theta0, max_iter=2)
    assert compiled.status.tolist() == reference.status.tolist() == [LMStatus.MAX_ITER]
    np.testing.assert_allclose(compiled.theta, reference.theta.numpy(), rtol=1e-9, atol=1e-12)


def test_history_records_the_cost_after_each_iteration():
    x = torch.linspace(-2, 2, 50, dtype=torch.float64)
    y = noisy(GAUSSIAN, [3.0, 0.2, 0.8, 0.1], x, K=2, noise=0.05, seed=4)
    problem = problem_for(GAUSSIAN, x, y)
    theta0 = torch.tensor([2.0, 0.0, 1.0, 0.0], dtype=torch.float64).expand(2, -1)
    costs = []
    residuals, stacked = residual_functions(problem)
    levenberg_marquardt(
        residuals, theta0, stacked=stacked, callback=lambda i, c: costs.append(c.clone())
    )
    fitted = lm_compiled.fit_curves(problem, theta0, history=True, max_iter=50)
    n = fitted.n_iter.tolist()
    for k in range(2):
        want = [float(c[k]) for c in costs[: n[k]]]
        np.testing.assert_allclose(fitted.history[k, : n[k]], want, rtol=1e-9)
        assert np.isnan(fitted.history[k, n[k] :]).all()


def batch_both_ways(monkeypatch, *args, **kwargs):
    compiled = gf.fit_batch(*args, **kwargs)
    with monkeypatch.context() as patch:
        patch.setattr(lm_compiled, "ENABLED", False)
        reference = gf.fit_batch(*args, **kwargs)
    return compiled, reference


def assert_same_batch(compiled, reference, degenerate=()):
    """Equal per curve; ``degenerate`` curves (singular JᵀJ or χ² ≈ 0) have no unique
    solution, and which test stops them is rounding: only their fit quality must agree."""
    assert compiled.n_points.tolist() == reference.n_points.tolist()
    keep = [k for k in range(len(compiled.status)) if k not in degenerate]
    assert compiled.status[keep].tolist() == reference.status[keep].tolist()
    assert compiled.n_iter[keep].tolist() == reference.n_iter[keep].tolist()
    for k in degenerate:
        assert compiled.converged[k] == reference.converged[k], k
    for name in ("params", "loss", "stderr", "reduced_chi2", "r2"):
        rows = keep if name in ("params", "stderr") else slice(None)
        torch.testing.assert_close(
            getattr(compiled, name)[rows], getattr(reference, name)[rows], rtol=1e-7,
            atol=1e-12, equal_nan=True, msg=name,
        )  # fmt: skip


def test_fit_batch_statistics_equal_the_torch_path(monkeypatch):
    rng = np.random.default_rng(11)
    K, N = 40, 50
    x = np.linspace(-4, 4, N)
    y = noisy(GAUSSIAN, [2.0, 0.0, 1.0, 0.1], torch.from_numpy(x), K, 0.05, 12).numpy()
    y[rng.uniform(size=(K, N)) < 0.1] = np.nan  # NaN points are dropped
    y[3, 2:] = np.nan  # too few points for three or four parameters
    y[4] = 1.0  # constant: R² undefined
    sigma = rng.uniform(0.03, 0.08, (K, N))
    p0 = [2.0, 0.0, 1.0, 0.0]
    bounds = {"width": (0.1, 3.0), "amplitude": (0.0, None)}
    for kwargs in ({}, {"sigma": sigma}, {"sigma": sigma, "absolute_sigma": True},
                   {"bounds": bounds}, {"fixed": {"offset": 0.1}, "loss": "sse"},
                   {"loss": "soft_l1", "f_scale": 0.1, "bounds": bounds}):  # fmt: skip
        compiled, reference = batch_both_ways(monkeypatch, GAUSSIAN, x, y, p0=p0, **kwargs)
        assert_same_batch(compiled, reference, degenerate=[3, 4])
        assert math.isnan(compiled.r2[4]) and math.isnan(reference.r2[4])
        assert compiled.status[3] == reference.status[3] == TOO_FEW_POINTS


def test_fit_batch_falls_back_where_the_kernel_does_not_apply(monkeypatch):
    calls = []
    original = lm_compiled.fit_curves
    monkeypatch.setattr(
        lm_compiled, "fit_curves", lambda *a, **k: calls.append(1) or original(*a, **k)
    )
    x = np.linspace(0, 1, 20)
    y = np.stack([2 * x + 1, 3 - x])
    gf.fit_batch("a*x + b", x, y)
    gf.fit_batch("a*x + b", x, y, loss="huber")
    assert len(calls) == 2
    result = gf.fit_batch("a*x + b", x, y, dtype=torch.float32)
    np.testing.assert_allclose(result.params.numpy(), [[2, 1], [-1, 3]], rtol=1e-4)
    line = gf.Model(lambda x, p: p[..., :1] * x + p[..., 1:], params=["a", "b"])
    gf.fit_batch(line, x, y, p0=[1.0, 1.0])
    assert len(calls) == 2


def test_a_single_curve_without_rows_or_history():
    fitted = lm_compiled.fit_curves(
        problem_for("a*x", torch.ones(3, dtype=torch.float64), torch.ones(3).double()),
        torch.ones(1, 1, dtype=torch.float64),
    )
    assert fitted.theta.shape == (1, 1) and math.isclose(float(fitted.theta[0, 0]), 1.0)
    assert fitted.rows is None and fitted.history is None


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"loss": "cauchy", "f_scale": 0.05},
        {"bounds": {"k": (0.0, 5.0), "a": (0.5, None)}},
        {"fixed": {"c": 0.1}, "sigma": 0.05, "absolute_sigma": True},
        {"epochs": 2},
    ],
)
def test_fit_gives_the_torch_kernels_result(monkeypatch, options):
    x = np.linspace(0, 4, 40)
    y = noisy("a*exp(-k*x) + c", [2.0, 1.3, 0.1], torch.from_numpy(x), 1, 0.05, 5).numpy()[0]
    compiled = gf.fit("a*exp(-k*x) + c", x, y, p0=[1.0, 0.5, 0.0], **options)
    monkeypatch.setattr(lm_compiled, "ENABLED", False)
    reference = gf.fit("a*exp(-k*x) + c", x, y, p0=[1.0, 0.5, 0.0], **options)
    assert (compiled.status, compiled.message) == (reference.status, reference.message)
    assert compiled.n_iter == reference.n_iter
    np.testing.assert_allclose(compiled.history, reference.history, rtol=1e-9)
    for name in ("a", "k", "c"):
        assert compiled.params[name] == pytest.approx(reference.params[name], rel=1e-9)
        if reference.stderr[name] is not None:
            assert compiled.stderr[name] == pytest.approx(reference.stderr[name], rel=1e-7)
    assert compiled.loss == pytest.approx(reference.loss, rel=1e-9)


def test_without_numba_every_fit_takes_the_torch_kernel(monkeypatch):
    from gradfit.optim import dispatch  # fit and fit_batch both ask dispatch.lm_kernel

    monkeypatch.setattr(dispatch, "compiled_lm", lambda: None)
    monkeypatch.setattr(lm_compiled, "fit_curves", None)  # would fail if called
    x = np.linspace(0, 1, 20)
    assert gf.fit("a*x + b", x, 2 * x + 1).params["a"] == pytest.approx(2.0)
    result = gf.fit_batch("a*x + b", x, np.stack([2 * x + 1, 3 - x]))
    np.testing.assert_allclose(result.params.numpy(), [[2, 1], [-1, 3]], rtol=1e-9)
