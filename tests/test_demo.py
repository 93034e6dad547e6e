"""`gradfit demo` reproduces the post's program step for step."""

import json

import numpy as np
import pytest
import torch
from post_verbatim import run_post
from typer.testing import CliRunner

from gradfit.cli.app import app
from gradfit.cli.demo import least_squares_optimum, optimum_curve, run_demo, write_demo
from gradfit.views.plots import after_training_figure


@pytest.mark.parametrize("seed", [0, 1, 7, 2024])
def test_demo_reproduces_the_post_step_for_step(seed):
    epochs = 3000
    x, y, initial, final, history = run_post(seed, epochs=epochs)
    run = run_demo(seed=seed, epochs=epochs)
    assert torch.equal(run.x, x)
    assert torch.equal(run.y, y)
    assert torch.equal(run.initial, initial)
    assert len(run.result.history) == epochs
    torch.testing.assert_close(
        torch.tensor(run.result.history), torch.tensor(history), rtol=2e-7, atol=0
    )
    fitted = torch.tensor([run.result.params[n] for n in "abc"])
    torch.testing.assert_close(fitted, final, rtol=1e-6, atol=1e-6)


def test_full_demo_matches_the_post_and_misses_the_optimum():
    x, y, _, final, history = run_post(3)
    run = run_demo(seed=3)
    assert run.result.history[-1] == pytest.approx(history[-1], rel=1e-6)
    torch.testing.assert_close(
        torch.tensor([run.result.params[n] for n in "abc"]), final, rtol=1e-5, atol=1e-5
    )
    # the post's loop stops well above the exact least-squares optimum
    _, optimum_loss = least_squares_optimum(x, y)
    assert history[-1] > 1.05 * optimum_loss
    assert run.excess > 0.05


def test_least_squares_optimum_is_the_closed_form():
    x = torch.linspace(0, 1, 50)
    y = 3 * x**2 - 2 * x + 0.5
    optimum, loss = least_squares_optimum(x, y)
    assert optimum["a"] == pytest.approx(3, abs=1e-5)
    assert optimum["b"] == pytest.approx(-2, abs=1e-5)
    assert optimum["c"] == pytest.approx(0.5, abs=1e-5)
    assert loss < 1e-10


def test_demo_command_writes_the_posts_figures_and_results(tmp_path):
    out = tmp_path / "demo"
    result = CliRunner().invoke(app, ["demo", "--out", str(out), "--seed", "0", "--epochs", "500"])
    assert result.exit_code == 0, result.output
    names = {p.name for p in out.iterdir()}
    assert names == {
        "dataset.png",
        "before_training.png",
        "history.png",
        "after_training.png",
        "results.json",
    }
    data = json.loads((out / "results.json").read_text())
    assert data["seed"] == 0
    assert len(data["history"]) == 500
    assert data["true_params"] == {"a": 20.0, "b": 5.0, "c": -3.0}
    assert "NOT reached" in result.output
    # a second run into the same folder is refused without --overwrite
    again = CliRunner().invoke(app, ["demo", "--out", str(out), "--epochs", "10"])
    assert again.exit_code == 2
    assert "--overwrite" in again.output


def test_demo_with_lm_reaches_the_optimum(tmp_path):
    out = tmp_path / "demo"
    args = ["demo", "--out", str(out), "--seed", "5", "--optimizer", "lm"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    data = json.loads((out / "results.json").read_text())
    for name in "abc":
        assert data["params"][name] == pytest.approx(data["optimum_params"][name], rel=1e-4)


def test_optimum_curve_is_the_fitted_quadratic():
    x = torch.linspace(-1, 2, 40)
    optimum, _ = least_squares_optimum(x, 3 * x**2 - 2 * x + 0.5)
    grid = np.linspace(-1, 2, 7)
    expected = 3 * grid**2 - 2 * grid + 0.5
    np.testing.assert_allclose(optimum_curve(optimum)(grid), expected, atol=1e-5)


@pytest.mark.parametrize(
    ("optimizer", "epochs", "apart"), [("gd", 2000, True), ("lm", None, False)]
)
def test_after_training_figure_shows_whether_the_optimum_was_reached(optimizer, epochs, apart):
    options = {} if epochs is None else {"epochs": epochs}
    run = run_demo(seed=0, optimizer=optimizer, **options)
    figure = after_training_figure(run.x, run.y, run.result.predict, optimum_curve(run.optimum))
    lines = {line.get_label(): line.get_ydata() for line in figure.axes[0].get_lines()}
    gap = np.abs(lines["least-squares optimum"] - lines["y_pred"]).max()
    assert bool(gap > 0.1) is apart, gap
    # the residual panel draws the same gap, optimum minus the trained curve
    residual_lines = figure.axes[1].get_lines()
    (difference,) = [ln for ln in residual_lines if ln.get_label() == "optimum − y_pred"]
    assert np.abs(difference.get_ydata()).max() == pytest.approx(gap)


def test_demo_writes_the_after_training_figure(tmp_path):
    run = run_demo(seed=0, epochs=50)
    written = write_demo(run, tmp_path)
    assert [p.name for p in written][3] == "after_training.png"
    assert (tmp_path / "after_training.png").read_bytes()[:4] == b"\x89PNG"
