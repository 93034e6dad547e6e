"""`fit_batch` with the post's first-order optimizers (gd, sgd, adam): curve i of the batch
moves exactly as `gradfit.fit` moves curve i alone, stops on its own, and keeps its best."""

import numpy as np
import pytest
import torch

import gradfit as gf

MODEL = "a*exp(-(x - c)**2/2) + b*x"


def curves(K=10, N=40, seed=3):
    """K noisy peaks on a shared grid; curve 2 is NaN-padded to a shorter length."""
    rng = np.random.default_rng(seed)
    x = np.linspace(-3, 3, N)
    y = np.stack(
        [
            rng.uniform(1, 3) * np.exp(-((x - rng.uniform(-1, 1)) ** 2) / 2)
            + rng.uniform(-0.2, 0.2) * x
            + rng.normal(0, 0.05, N)
            for _ in range(K)
        ]
    )
    y[min(2, K - 1), 28:] = np.nan
    return x, y


def assert_same_as_fit(batch, x, y, i, **options):
    keep = ~np.isnan(y[i])
    single = gf.fit(MODEL, x[keep], y[i][keep], p0=[1.0, 0.0, 0.0], **options)
    row = batch[i]
    assert row["n_iter"] == single.n_iter
    for name, value in single.params.items():
        assert row["params"][name] == pytest.approx(value, rel=1e-8, abs=1e-12), name
        assert row["stderr"][name] == pytest.approx(single.stderr[name], rel=1e-6), name
    assert row["loss"] == pytest.approx(single.loss, rel=1e-9)
    return single


@pytest.mark.parametrize(
    ("optimizer", "lr", "loss"),
    [("gd", 0.05, "mse"), ("sgd", 0.02, "huber"), ("adam", 0.05, "mse"), ("adam", 0.05, "mae")],
)
def test_each_curve_moves_as_fit_moves_it_alone(optimizer, lr, loss):
    x, y = curves()
    options = {"optimizer": optimizer, "lr": lr, "epochs": 300, "loss": loss}
    batch = gf.fit_batch(MODEL, x, y, p0=[1.0, 0.0, 0.0], chunk_size=4, **options)
    assert batch.optimizer == optimizer and batch.loss_name == loss
    assert batch.status_names == ["max_iter"] * len(y)
    assert "quantiles over converged or max_iter curves" in batch.summary()
    for i in (0, 2, 7):
        assert_same_as_fit(batch, x, y, i, **options)


def test_adam_reaches_the_least_squares_optimum_of_a_linear_model():
    x = np.linspace(0, 1, 50)
    rng = np.random.default_rng(0)
    y = np.stack([a * x + b + rng.normal(0, 0.1, 50) for a, b in [(2, 1), (-1, 3), (0.5, 0)]])
    batch = gf.fit_batch("a*x + b", x, y, optimizer="adam", lr=0.05, epochs=4000)
    design = np.column_stack([x, np.ones_like(x)])
    for i in range(3):
        exact = np.linalg.lstsq(design, y[i], rcond=None)[0]  # the closed form, not our output
        np.testing.assert_allclose(batch.params[i].numpy(), exact, rtol=1e-6, atol=1e-8)


def test_each_curve_stops_on_its_own_loss_change():
    x, y = curves(K=6)
    options = {"optimizer": "adam", "lr": 0.05, "epochs": 5000, "tol": 1e-10}
    batch = gf.fit_batch(MODEL, x, y, p0=[1.0, 0.0, 0.0], **options)
    assert set(batch.status_names) == {"converged"}
    assert len(set(batch.n_iter.tolist())) > 1  # curves stopped after different epoch counts
    assert int(batch.n_iter.max()) < 5000
    single = assert_same_as_fit(batch, x, y, 4, **options)
    assert single.converged


def test_a_diverging_curve_keeps_its_best_parameters_and_does_not_disturb_the_others():
    x1, y = curves(K=4)
    x = np.tile(x1, (4, 1))
    x[1] *= 30  # the curvature in b grows 900-fold: gd's steps overshoot ever more
    options = {"optimizer": "gd", "lr": 0.05, "epochs": 400}
    batch = gf.fit_batch(MODEL, x, y, p0=[1.0, 0.0, 0.0], **options)
    assert batch.status_names == ["max_iter", "diverged", "max_iter", "max_iter"]
    assert torch.isfinite(batch.params[1]).all()
    keep = ~np.isnan(y[1])
    single = gf.fit(MODEL, x[1][keep], y[1][keep], p0=[1.0, 0.0, 0.0], **options)
    assert single.status == "diverged"
    assert batch[1]["n_iter"] == single.n_iter
    np.testing.assert_allclose(batch.params[1].numpy(), single.values.numpy(), rtol=1e-12)
    for i in (0, 2, 3):
        assert_same_as_fit(batch, x1, y, i, **options)


def test_bounds_and_fixed_parameters_with_adam():
    x, y = curves(K=3)
    options = {"optimizer": "adam", "lr": 0.05, "epochs": 300}
    batch = gf.fit_batch(
        MODEL, x, y, p0=[1.0, 0.0, 0.0], bounds={"a": (0, 2)}, fixed={"b": 0.0}, **options
    )
    assert (batch.params[:, 0] <= 2).all() and (batch.params[:, 2] == 0).all()
    keep = ~np.isnan(y[2])
    single = gf.fit(
        MODEL, x[keep], y[2][keep], p0=[1.0, 0.0, 0.0], bounds={"a": (0, 2)}, fixed={"b": 0.0},
        **options,
    )  # fmt: skip
    np.testing.assert_allclose(batch.params[2].numpy(), single.values.numpy(), rtol=1e-8)


def test_auto_picks_lm_for_least_squares_and_adam_otherwise():
    x, y = curves(K=2)
    assert gf.fit_batch(MODEL, x, y, p0=[1.0, 0.0, 0.0], optimizer="auto").optimizer == "lm"
    robust = gf.fit_batch(MODEL, x, y, p0=[1.0, 0.0, 0.0], optimizer="auto", loss="mae", epochs=5)
    assert robust.optimizer == "adam"


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"optimizer": "lbfgs"}, "does not batch lbfgs"),
        ({"optimizer": "newton"}, "optimizer"),
        ({"optimizer": "adam", "lr": 0.0}, "lr must be > 0"),
        ({"optimizer": "adam", "loss": lambda p, t: (p - t).abs().max()}, "needs a named loss"),
        ({"optimizer": "lm", "loss": "mae"}, "needs a least-squares loss"),
    ],
)
def test_unbatched_choices_are_refused_clearly(options, message):
    x, y = curves(K=2)
    with pytest.raises(gf.errors.OptionError, match=message):
        gf.fit_batch(MODEL, x, y, **options)
