"""Coasting (lm._GEODESIC_COAST): once the geodesic acceleration is tiny and the steps are
small and good, steps go without it. It must save evaluations without changing the answer,
in both LM kernels alike."""

import numpy as np
import pytest
import torch

from gradfit.model.losses import get_loss
from gradfit.model.models import as_model
from gradfit.model.parameters import ParameterSpace
from gradfit.optim import lm
from gradfit.optim.compiled import bridge
from gradfit.optim.least_squares import residual_functions
from gradfit.optim.problem import Problem

GAUSSIAN = "amplitude*exp(-(x - center)**2/(2*width**2)) + offset"
CONVERGED = {int(lm.LMStatus.FTOL), int(lm.LMStatus.XTOL), int(lm.LMStatus.GTOL)}


@pytest.fixture
def fresh_tolerances():
    """The compiled kernel reads lm's constants through a cache: clear it around the test."""
    bridge._tolerances.cache_clear()
    yield
    bridge._tolerances.cache_clear()


def gaussian_problem():
    """60 noisy Gaussians, each started 15-20% off its truth."""
    model = as_model(GAUSSIAN)
    rng = np.random.default_rng(11)
    x = torch.linspace(0, 4, 80, dtype=torch.float64)
    truth = torch.from_numpy(rng.uniform([2, 1.5, 0.4, 0.1], [4, 2.5, 0.8, 0.5], (60, 4)))
    y = model(x, truth) + 0.05 * torch.from_numpy(rng.normal(size=(60, 80)))
    off = rng.uniform(0.15, 0.2, (60, 4)) * rng.choice([-1.0, 1.0], (60, 4))
    theta0 = truth * (1 + torch.from_numpy(off))
    space = ParameterSpace.build(model.param_names, None, None)
    loss = get_loss("mse").with_options(sigma=None, f_scale=1.0)
    return Problem(model, x, y, loss, space), theta0


def test_coasting_saves_evaluations_and_keeps_the_answer(monkeypatch, fresh_tolerances):
    problem, theta0 = gaussian_problem()
    coasting = bridge.fit_curves(problem, theta0)
    monkeypatch.setattr(lm, "_GEODESIC_COAST", -1.0)  # never coast: every step accelerated
    bridge._tolerances.cache_clear()
    always = bridge.fit_curves(problem, theta0)
    assert coasting.status.tolist() == always.status.tolist()
    assert set(coasting.status.tolist()) <= CONVERGED
    np.testing.assert_allclose(coasting.theta, always.theta, rtol=1e-7, atol=1e-9)
    # an accelerated step costs two evaluations, a coasting one; the iterations stay alike
    assert coasting.n_eval < always.n_eval - 60
    assert coasting.n_iter.sum() <= always.n_iter.sum() + 60


def test_both_kernels_coast_alike(fresh_tolerances):
    problem, theta0 = gaussian_problem()
    residuals, stacked = residual_functions(problem)
    reference = lm.levenberg_marquardt(residuals, theta0, stacked=stacked)
    compiled = bridge.fit_curves(problem, theta0)
    assert compiled.status.tolist() == reference.status.tolist()
    assert compiled.n_iter.tolist() == reference.n_iter.tolist()
    np.testing.assert_allclose(compiled.theta, reference.theta.numpy(), rtol=1e-9, atol=1e-12)


def test_the_torch_kernel_coasts(monkeypatch):
    """Its answer also stays that of the always-accelerated iteration."""
    problem, theta0 = gaussian_problem()
    residuals, stacked = residual_functions(problem)
    coasting = lm.levenberg_marquardt(residuals, theta0, stacked=stacked)
    monkeypatch.setattr(lm, "_GEODESIC_COAST", -1.0)
    always = lm.levenberg_marquardt(residuals, theta0, stacked=stacked)
    assert coasting.status.tolist() == always.status.tolist()
    torch.testing.assert_close(coasting.theta, always.theta, rtol=1e-7, atol=1e-9)
