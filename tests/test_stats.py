"""Standard errors, covariance, goodness of fit and bands against SciPy and closed forms."""

import json
import math

import numpy as np
import pytest
from scipy import optimize
from scipy import stats as scipy_stats
from test_fit import assert_dict_matches_result  # tests/ is on sys.path (conftest)

import gradfit as gf
from gradfit.results.stats import student_t_quantile

CASES = [
    ("a*exp(-k*x) + c", lambda x, a, k, c: a * np.exp(-k * x) + c, [5.0, 0.8, 1.0], (0, 6)),
    (
        "amplitude*exp(-(x - center)**2/(2*width**2)) + offset",
        lambda x, a, m, w, o: a * np.exp(-((x - m) ** 2) / (2 * w**2)) + o,
        [3.0, 0.3, 0.9, 0.4],
        (-4, 4),
    ),
    ("a*x**2 + b*x + c", lambda x, a, b, c: a * x**2 + b * x + c, [20.0, 5.0, -3.0], (0, 1)),
    (
        "a/(1 + exp(-k*(x - m)))",
        lambda x, a, k, m: a / (1 + np.exp(-k * (x - m))),
        [2, 3, 1],
        (-2, 4),
    ),
]


@pytest.mark.parametrize(("expression", "numpy_model", "truth", "span"), CASES)
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("absolute_sigma", [False, True])
def test_stderr_and_covariance_match_curve_fit(
    expression, numpy_model, truth, span, weighted, absolute_sigma
):
    rng = np.random.default_rng(7)
    x = np.linspace(*span, 70)
    sigma = rng.uniform(0.05, 0.3, x.size) if weighted else None
    noise = rng.normal(0, 1, x.size) * (sigma if weighted else 0.1)
    y = numpy_model(x, *truth) + noise
    popt, pcov = optimize.curve_fit(
        numpy_model, x, y, p0=truth, sigma=sigma, absolute_sigma=absolute_sigma,
        xtol=1e-14, ftol=1e-14, gtol=1e-14, maxfev=100_000,
    )  # fmt: skip
    result = gf.fit(
        gf.Model(expression), x, y, sigma=sigma, p0=truth, absolute_sigma=absolute_sigma
    )
    assert result.converged, result.message
    np.testing.assert_allclose(result.values.numpy(), popt, rtol=1e-7, atol=1e-10)
    # SciPy differentiates by finite differences: compare on the scale of each entry's variances
    scale = np.sqrt(np.outer(np.diag(pcov), np.diag(pcov)))
    np.testing.assert_allclose(result.covariance.numpy() / scale, pcov / scale, atol=1e-6)
    expected_stderr = np.sqrt(np.diag(pcov))
    np.testing.assert_allclose(list(result.stderr.values()), expected_stderr, rtol=1e-5)


def test_goodness_of_fit_statistics_by_hand():
    rng = np.random.default_rng(1)
    x = np.linspace(0, 1, 40)
    y = 1 + 2 * x + rng.normal(0, 0.1, x.size)
    result = gf.fit("a*x + b", x, y)
    slope, intercept = np.polyfit(x, y, 1)
    residuals = y - (slope * x + intercept)
    chi2 = float(residuals @ residuals)
    n, k = x.size, 2
    assert result.dof == n - k
    assert result.chi2 == pytest.approx(chi2, rel=1e-10)
    assert result.reduced_chi2 == pytest.approx(chi2 / (n - k), rel=1e-10)
    ss_tot = float(((y - y.mean()) ** 2).sum())
    assert result.r2 == pytest.approx(1 - chi2 / ss_tot, rel=1e-10)
    assert result.aic == pytest.approx(n * math.log(chi2 / n) + 2 * k, rel=1e-10)
    assert result.bic == pytest.approx(n * math.log(chi2 / n) + math.log(n) * k, rel=1e-10)
    corr = result.correlation.numpy()
    cov = result.covariance.numpy()
    assert corr[0, 1] == pytest.approx(cov[0, 1] / math.sqrt(cov[0, 0] * cov[1, 1]))


def test_confidence_band_of_a_straight_line_is_the_textbook_formula():
    rng = np.random.default_rng(2)
    x = np.linspace(0, 10, 25)
    y = 0.5 * x - 1 + rng.normal(0, 0.4, x.size)
    result = gf.fit("a*x + b", x, y)
    grid = np.array([-2.0, 0.0, 5.0, 12.0])
    lower, upper = result.confidence_band(grid, level=0.9)
    n = x.size
    s = math.sqrt(result.chi2 / (n - 2))
    half = (
        scipy_stats.t.ppf(0.95, n - 2)
        * s
        * np.sqrt(1 / n + (grid - x.mean()) ** 2 / ((x - x.mean()) ** 2).sum())
    )
    center = result.predict(grid).numpy()
    np.testing.assert_allclose(upper.numpy() - center, half, rtol=1e-8)
    np.testing.assert_allclose(center - lower.numpy(), half, rtol=1e-8)


@pytest.mark.parametrize("dof", [1, 2, 3.5, 10, 97, 1000])
@pytest.mark.parametrize("p", [0.6, 0.9, 0.975, 0.995, 0.05])
def test_student_t_quantile_matches_scipy(dof, p):
    assert student_t_quantile(p, dof) == pytest.approx(scipy_stats.t.ppf(p, dof), rel=1e-9)


def test_truth_lies_within_three_sigma_at_the_expected_rate():
    # 300 synthetic exponential decays: |estimate - truth| < 3·stderr for ~99.7% of them
    truth = np.array([4.0, 0.7, 0.5])
    x = np.linspace(0, 8, 50)
    rng = np.random.default_rng(11)
    inside, inside_one = 0, 0
    trials = 300
    for _ in range(trials):
        y = truth[0] * np.exp(-truth[1] * x) + truth[2] + rng.normal(0, 0.15, x.size)
        result = gf.fit("a*exp(-k*x) + c", x, y, p0=[3.0, 1.0, 0.0])
        error = np.abs(result.values.numpy() - truth)
        stderr = np.array(list(result.stderr.values()))
        inside += int((error < 3 * stderr).all())
        inside_one += int(error[1] < stderr[1])
    # all three inside 3σ: at least ~99.2% expected; binomial slack for 300 draws
    assert inside >= 0.97 * trials
    # one parameter within 1σ: about 68%
    assert 0.58 * trials <= inside_one <= 0.78 * trials


def test_a_parameter_the_model_ignores_gives_infinite_error_not_a_crash():
    x = np.linspace(0, 1, 20)
    y = 2 * x
    result = gf.fit(gf.Model("a*x + 0*b"), x, y, optimizer="lbfgs")
    # a is fixed by the data (an exact line: zero error); b by nothing
    assert result.stderr["a"] == pytest.approx(0, abs=1e-6) and result.stderr["b"] is None
    assert any("b" in warning for warning in result.warnings)
    as_dict = result.to_dict()
    assert_dict_matches_result(as_dict, result)
    assert json.loads(result.to_json()) == as_dict  # NaN is null, never a JSON error
    # b's row and column of the covariance and correlation are NaN: null in the dict
    for key in ("covariance", "correlation"):
        assert as_dict[key][1] == [None, None] and [row[1] for row in as_dict[key]] == [None] * 2
    assert as_dict["covariance"][0][0] == pytest.approx(0, abs=1e-12)
    assert as_dict["stderr"]["b"] is None and as_dict["stderr"]["a"] == pytest.approx(0, abs=1e-6)
    assert as_dict["params"]["a"] == pytest.approx(2, rel=1e-6)
    assert as_dict["dof"] == x.size - 2 and as_dict["n_points"] == x.size
    residuals = y - result.predict(x).numpy()
    assert as_dict["chi2"] == pytest.approx(float(residuals @ residuals), rel=1e-9, abs=1e-20)
    assert as_dict["warnings"] == result.warnings and as_dict["optimizer"] == "lbfgs"


def test_to_dict_of_a_weighted_fit_matches_its_statistics():
    rng = np.random.default_rng(5)
    x = np.linspace(0, 6, 50)
    sigma = rng.uniform(0.05, 0.3, x.size)
    y = 5 * np.exp(-0.8 * x) + 1 + rng.normal(0, 1, x.size) * sigma
    result = gf.fit("a*exp(-k*x) + c", x, y, sigma=sigma, p0=[5.0, 0.8, 1.0])
    as_dict = result.to_dict()
    assert_dict_matches_result(as_dict, result)
    a, k, c = result.values.numpy()
    weighted = (y - (a * np.exp(-k * x) + c)) / sigma
    chi2, n = float(weighted @ weighted), x.size
    assert as_dict["chi2"] == pytest.approx(chi2, rel=1e-10)
    assert as_dict["dof"] == n - 3
    assert as_dict["reduced_chi2"] == pytest.approx(chi2 / (n - 3), rel=1e-10)
    assert as_dict["loss"] == pytest.approx(chi2 / n, rel=1e-10)  # mse of (y_pred - y)/sigma
    J = np.stack([np.exp(-k * x), -a * x * np.exp(-k * x), np.ones_like(x)], axis=1)
    J /= sigma[:, None]
    covariance = chi2 / (n - 3) * np.linalg.inv(J.T @ J)
    np.testing.assert_allclose(as_dict["covariance"], covariance, rtol=1e-7)
    expected_stderr = np.sqrt(np.diag(covariance))
    np.testing.assert_allclose(list(as_dict["stderr"].values()), expected_stderr, rtol=1e-7)
