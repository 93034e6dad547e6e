"""All 27 NIST StRD nonlinear problems from both starts through the batched LM kernel.

Default settings, float64, autograd Jacobians of the hand-written torch models in ``nist.py``.
Agreement is NIST's log relative error (matching significant digits) with the certified values:
at least 6 for the parameters and 4 for the standard deviations, computed from the returned
Jacobian as sqrt(diag((JᵀJ)⁻¹) · RSS / (N - P)).  Lanczos1's standard deviations are skipped:
its certified residual sum of squares (~1.4e-25) is below what float64 residuals resolve.

Both starts of a dataset run as one K = 2 batch (curves are independent, which
``test_lm.py`` checks); each (dataset, start) pair is still its own test.
"""

from __future__ import annotations

from functools import cache

import numpy as np
import pytest
import torch
from nist import NAMES, eval_model_text, load, lre, residual_fn, torch_model

from gradfit.optim.lm import LMResult, LMStatus, levenberg_marquardt

pytestmark = pytest.mark.usefixtures("one_thread")


@cache
def fit_both_starts(name: str) -> LMResult:
    problem = load(name)
    theta0 = torch.tensor(np.stack([problem.start1, problem.start2]), dtype=torch.float64)
    return levenberg_marquardt(residual_fn(problem), theta0)


def stderr(jacobian: np.ndarray, rss: float, dof: int) -> np.ndarray:
    """sqrt(diag((JᵀJ)⁻¹) · RSS/dof) through the SVD of J (no squared condition number)."""
    _, s, vt = np.linalg.svd(jacobian, full_matrices=False)
    return np.sqrt(((vt.T / s) ** 2).sum(axis=1) * rss / dof)


@pytest.mark.parametrize("start", [1, 2])
@pytest.mark.parametrize("name", NAMES)
def test_certified_values(name: str, start: int) -> None:
    problem, fit = load(name), fit_both_starts(name)
    k = start - 1
    status = LMStatus(int(fit.status[k]))
    assert status in (LMStatus.FTOL, LMStatus.XTOL, LMStatus.GTOL), status
    theta = fit.theta[k].numpy()
    digits = lre(theta, problem.certified)
    assert digits.min() >= 6, f"{name} start {start}: parameter LRE {digits.round(1)}"
    rss = 2 * float(fit.cost[k])
    assert rss == pytest.approx(problem.rss, rel=1e-6 if name != "Lanczos1" else 0.1)
    if name == "Lanczos1":
        return
    # N - P degrees of freedom (Rat43's header says 9 for 15 points and 4 parameters, but its
    # certified residual standard deviation is sqrt(RSS / 11)).
    dof = len(problem.y) - problem.n_params
    digits = lre(stderr(fit.jacobian[k].numpy(), rss, dof), problem.certified_stderr)
    assert digits.min() >= 4, f"{name} start {start}: stderr LRE {digits.round(1)}"


@pytest.mark.parametrize("name", NAMES)
def test_parsed_model_text_matches_the_torch_model(name: str) -> None:
    problem = load(name)
    b = [torch.tensor([[v]], dtype=torch.float64) for v in problem.certified]
    x = {k: torch.as_tensor(v) for k, v in problem.x.items()}
    expected = torch_model(name)(b, x)
    torch.testing.assert_close(eval_model_text(problem, b, x), expected, rtol=1e-13, atol=0)
    expr = pytest.importorskip("gradfit.model.expr")
    parsed = expr.parse_expression(problem.model, independent=problem.independent)
    values = {f"b{i + 1}": v for i, v in enumerate(b)} | x
    torch.testing.assert_close(parsed.evaluate(values), expected, rtol=1e-13, atol=0)


@cache
def fit_with_expression(name: str) -> LMResult:
    """Both starts again, with residuals and a symbolic Jacobian from ``gradfit.model.expr``."""
    expr = pytest.importorskip("gradfit.model.expr")
    problem = load(name)
    parsed = expr.parse_expression(problem.model, independent=problem.independent)
    params = [f"b{i + 1}" for i in range(problem.n_params)]
    derivatives = [parsed.diff(p) for p in params]
    x = {k: torch.as_tensor(v) for k, v in problem.x.items()}
    y = torch.as_tensor(problem.y)

    def env(theta: torch.Tensor) -> dict[str, torch.Tensor]:
        return {p: theta[:, i : i + 1] for i, p in enumerate(params)} | x  # (K, 1) and (N,)

    def residuals(theta: torch.Tensor) -> torch.Tensor:
        return parsed.evaluate(env(theta)) - y

    def jacobian(theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (theta.shape[0], len(y))
        cols = [d.evaluate(env(theta)).broadcast_to(shape) for d in derivatives]
        return residuals(theta), torch.stack(cols, -1)

    theta0 = torch.tensor(np.stack([problem.start1, problem.start2]), dtype=torch.float64)
    return levenberg_marquardt(residuals, theta0, jacobian=jacobian)


@pytest.mark.parametrize("name", NAMES)
def test_certified_values_with_symbolic_jacobian(name: str) -> None:
    problem, fit = load(name), fit_with_expression(name)
    for k in (0, 1):
        digits = lre(fit.theta[k].numpy(), problem.certified)
        assert digits.min() >= 6, f"{name} start {k + 1}: parameter LRE {digits.round(1)}"
