"""``gradfit fit --intervals``, ``FitResult.prediction_band`` and its band in the fit figure."""

import json

import numpy as np
import pytest
from matplotlib.collections import PolyCollection
from typer.testing import CliRunner

import gradfit as gf
from gradfit.cli.app import app
from gradfit.results.stats import student_t_quantile
from gradfit.views.plots import fit_figure

runner = CliRunner()


@pytest.fixture
def decay_csv(tmp_path):
    rng = np.random.default_rng(3)
    t = np.linspace(0, 10, 40)
    counts = 80 * np.exp(-0.4 * t) + 5 + rng.normal(0, 0.5, t.size)
    path = tmp_path / "decay.csv"
    lines = ["t,counts"] + [
        f"{a!r},{b!r}" for a, b in zip(t.tolist(), counts.tolist(), strict=True)
    ]
    path.write_text("\n".join(lines) + "\n")
    return path, t, counts


MODEL = "a*exp(-k*t)+c"
P0 = {"a": 50.0, "k": 0.3, "c": 0.0}


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_profile_intervals_in_results_json_and_reports(decay_csv, tmp_path):
    path, t, counts = decay_csv
    out = tmp_path / "run"
    result = invoke("fit", path, "--x", "t", "--y", "counts", "--model", MODEL,
                    "--p0", "a=50,k=0.3,c=0", "--intervals", "profile", "--out", out,
                    "--report")  # fmt: skip
    assert result.exit_code == 0, result.output
    saved = json.loads((out / "results.json").read_text())
    library = gf.fit(gf.Model(MODEL, independent="t"), {"t": t}, counts, p0=P0)
    expected = library.confidence_intervals(method="profile")
    assert set(saved["intervals"]) == {"a", "k", "c"}
    for name, (lo, hi) in expected.items():
        assert saved["intervals"][name] == pytest.approx([lo, hi], rel=1e-9)
        assert lo < library.params[name] < hi
        assert f"[{lo:.6g}, {hi:.6g}]" in result.output  # the text report
    assert "[[Confidence intervals]] (68.27% profile)" in result.output
    page = (out / "report.html").read_text()
    assert "Confidence intervals (68.27% profile)" in page
    assert f"{expected['k'][0]:.6g}" in page


def test_no_intervals_key_unless_asked(decay_csv, tmp_path):
    path, _, _ = decay_csv
    result = invoke("fit", path, "--x", "t", "--y", "counts", "--model", MODEL,
                    "--p0", "a=50,k=0.3,c=0", "--json")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "intervals" not in json.loads(result.stdout)
    assert "Confidence intervals" not in result.stdout


def test_bootstrap_with_a_seed_is_reproducible(decay_csv):
    path, _, _ = decay_csv
    args = ("fit", path, "--x", "t", "--y", "counts", "--model", "exponential",
            "--intervals", "bootstrap", "--seed", "7", "--json")  # fmt: skip
    first, second = invoke(*args), invoke(*args)
    assert first.exit_code == 0, first.output
    intervals = json.loads(first.stdout)["intervals"]
    assert intervals == json.loads(second.stdout)["intervals"]
    assert all(lo < hi for lo, hi in intervals.values())


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--loss", "huber"), "--intervals needs a plain least-squares loss"),
        (("--intervals", "jackknife"), "--intervals must be one of profile, bootstrap"),
        (("--intervals", "bootstrap"), "--intervals bootstrap needs a built-in model"),
    ],
)
def test_a_refused_interval_exits_2_and_writes_nothing(decay_csv, tmp_path, args, message):
    path, _, _ = decay_csv
    out = tmp_path / "run"
    intervals = () if "--intervals" in args else ("--intervals", "profile")
    result = invoke("fit", path, "--x", "t", "--y", "counts", "--model", MODEL,
                    "--out", out, *intervals, *args)  # fmt: skip
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines
    assert not out.exists()


def _line_data(seed: int = 0, n: int = 25) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.uniform(-3, 5, n)
    return x, 1.5 - 0.7 * x + rng.normal(0, 0.4, n)


def test_prediction_band_of_a_line_is_the_textbook_formula():
    x, y = _line_data()
    result = gf.fit("a + b*x", x, y)
    x0 = np.linspace(-5, 7, 9)
    lower, upper = (b.numpy() for b in result.prediction_band(x0, level=0.9))
    # independently: ordinary least squares in NumPy, t from the data-free t table
    X = np.column_stack([np.ones_like(x), x])
    beta, *_ = np.linalg.lstsq(X, y, rcond=None)
    dof = len(x) - 2
    s = np.sqrt(np.sum((y - X @ beta) ** 2) / dof)
    t = 1.713871527747048  # Student t's 0.95 quantile, 23 degrees of freedom (SciPy)
    X0 = np.column_stack([np.ones_like(x0), x0])
    leverage = np.einsum("ij,jk,ik->i", X0, np.linalg.inv(X.T @ X), X0)
    half = t * s * np.sqrt(1 + leverage)
    assert (lower + upper) / 2 == pytest.approx(X0 @ beta, rel=1e-9, abs=1e-9)
    assert (upper - lower) / 2 == pytest.approx(half, rel=1e-5)
    # wider than the confidence band by the noise alone
    c_lower, c_upper = (b.numpy() for b in result.confidence_band(x0, level=0.9))
    confidence = t * s * np.sqrt(leverage)
    assert (c_upper - c_lower) / 2 == pytest.approx(confidence, rel=1e-5)


def test_prediction_band_with_absolute_sigma_uses_the_given_sigma():
    x, y = _line_data(seed=1)
    sigma = np.full_like(x, 0.4)
    result = gf.fit("a + b*x", x, y, sigma=sigma, absolute_sigma=True)
    x0 = np.array([0.0, 2.0])
    lower, upper = (b.numpy() for b in result.prediction_band(x0, sigma=0.4))
    c_lower, c_upper = (b.numpy() for b in result.confidence_band(x0))
    q = student_t_quantile(0.975, result.dof)
    # half-width² = t²·(gᵀCg + σ²): the confidence band's plus the given σ², no χ²ᵣ
    expected = ((c_upper - c_lower) / 2) ** 2 + q**2 * 0.4**2
    assert ((upper - lower) / 2) ** 2 == pytest.approx(expected, rel=1e-9)
    with pytest.raises(ValueError, match="sigma="):
        result.prediction_band(x0)


def test_fit_figure_draws_the_prediction_band_beside_the_confidence_band():
    x, y = _line_data()
    result = gf.fit("a + b*x", x, y)
    figure = fit_figure(result)
    bands = {c.get_label(): c for c in figure.axes[0].collections}
    assert isinstance(bands["95% prediction"], PolyCollection)
    assert bands["95% prediction"].get_alpha() < bands["95% band"].get_alpha()
    vertices = bands["95% prediction"].get_paths()[0].vertices
    grid = np.linspace(x.min(), x.max(), 400)
    lower, upper = (b.numpy() for b in result.prediction_band(grid))
    ys = vertices[:, 1]
    assert ys.min() == pytest.approx(lower.min()) and ys.max() == pytest.approx(upper.max())
    # no finite covariance (no degrees of freedom): neither band
    exact = gf.fit("a + b*x", x[:2], y[:2])
    labels = [c.get_label() for c in fit_figure(exact).axes[0].collections]
    assert "95% prediction" not in labels and "95% band" not in labels
