"""The batched Levenberg–Marquardt kernel against numpy / SciPy references, and its contract:
statuses, batch independence, masks, robust losses, callbacks."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import curve_fit, least_squares

from gradfit.datasets import gaussian_peak
from gradfit.optim.lm import (
    LMResult,
    LMStatus,
    autodiff_jacobian,
    describe,
    levenberg_marquardt,
)

F64 = torch.float64
Tensor = torch.Tensor
CONVERGED = (LMStatus.FTOL, LMStatus.XTOL, LMStatus.GTOL)


pytestmark = pytest.mark.usefixtures("one_thread")


def statuses(result: LMResult) -> list[LMStatus]:
    return [LMStatus(s) for s in result.status.tolist()]


# --- models -----------------------------------------------------------------------------------

X = torch.linspace(0.0, 4.0, 40, dtype=F64)


def exp_decay(theta: Tensor, x: Tensor = X) -> Tensor:
    """a * exp(-k x) + c for theta (K, 3) -> (K, N)."""
    a, k, c = theta.unsqueeze(-1).unbind(-2)
    return a * torch.exp(-k * x) + c


def gaussian(theta: Tensor, x: Tensor) -> Tensor:
    a, mu, s, c = theta.unsqueeze(-1).unbind(-2)
    return a * torch.exp(-((x - mu) ** 2) / (2 * s**2)) + c


def decay_data(k: int, seed: int = 0, noise: float = 0.02) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    true = torch.tensor([[2.5, 1.3, 0.4]], dtype=F64) * (1 + 0.3 * torch.rand(k, 3, generator=gen))
    return exp_decay(true) + noise * torch.randn(k, len(X), generator=gen, dtype=F64)


def residuals_for(model: Callable[[Tensor], Tensor], y: Tensor) -> Callable[[Tensor], Tensor]:
    return lambda theta: model(theta) - y


def scipy_fit(fun: Callable[[np.ndarray], np.ndarray], x0: np.ndarray, **kw: object) -> np.ndarray:
    tight = {"ftol": 1e-15, "xtol": 1e-15, "gtol": 1e-15, "max_nfev": 10_000}
    return least_squares(fun, x0, **(tight | kw)).x


# --- agreement with references ------------------------------------------------------------------


def test_linear_least_squares_matches_lstsq() -> None:
    gen = torch.Generator().manual_seed(1)
    K, N, P = 5, 30, 4
    A = torch.randn(K, N, P, generator=gen, dtype=F64)
    y = torch.randn(K, N, generator=gen, dtype=F64)
    fit = levenberg_marquardt(
        lambda t: (A @ t.unsqueeze(-1)).squeeze(-1) - y, torch.zeros(K, P, dtype=F64)
    )
    for k in range(K):
        expected = np.linalg.lstsq(A[k].numpy(), y[k].numpy(), rcond=None)[0]
        np.testing.assert_allclose(fit.theta[k].numpy(), expected, rtol=1e-10, atol=1e-12)
    assert all(s in CONVERGED for s in statuses(fit))
    assert int(fit.n_iter.max()) <= 10  # a converged curve stops quickly
    np.testing.assert_allclose(fit.jacobian.numpy(), A.numpy())


@settings(max_examples=15, deadline=None)
@given(
    n=st.integers(5, 40),
    p=st.integers(1, 5),
    seed=st.integers(0, 10_000),
    scale=st.floats(1e-3, 1e3),
)
def test_linear_least_squares_property(n: int, p: int, seed: int, scale: float) -> None:
    p = min(p, n)
    rng = np.random.default_rng(seed)
    A = rng.standard_normal((n, p)) * scale ** np.arange(p)  # badly scaled columns
    y = rng.standard_normal(n)
    At, yt = torch.as_tensor(A)[None], torch.as_tensor(y)[None]
    theta0 = torch.ones(1, p, dtype=F64)
    fit = levenberg_marquardt(lambda t: (At @ t.unsqueeze(-1)).squeeze(-1) - yt, theta0)
    # Compare residual norms: with columns scaled up to 1e12 apart, lstsq's own answer is only
    # backward stable, so the optimality of the residual is the sharp test.
    best = np.linalg.norm(A @ np.linalg.lstsq(A, y, rcond=None)[0] - y)
    got = np.linalg.norm(A @ fit.theta[0].numpy() - y)
    assert got <= best * (1 + 1e-10) + 1e-12 * np.linalg.norm(y)
    assert statuses(fit)[0] in CONVERGED


def test_float32_input_computes_in_float32() -> None:
    y = decay_data(1, noise=0.0).float()
    fit = levenberg_marquardt(
        lambda t: exp_decay(t, X.float()) - y, torch.tensor([[1.0, 1.0, 0.0]])
    )
    assert fit.theta.dtype == torch.float32 and fit.cost.dtype == torch.float32
    assert statuses(fit)[0] in CONVERGED
    assert float(fit.cost[0]) < 1e-8


def test_exp_decay_batch_matches_scipy() -> None:
    y = decay_data(4, seed=3)
    theta0 = torch.tensor([[1.0, 0.5, 0.0]], dtype=F64).expand(4, 3)
    fit = levenberg_marquardt(residuals_for(exp_decay, y), theta0)
    for k in range(4):

        def fun(b: np.ndarray, k: int = k) -> np.ndarray:
            return (exp_decay(torch.as_tensor(b)[None]) - y[k]).numpy()[0]

        expected = scipy_fit(fun, theta0[k].numpy(), method="lm")
        np.testing.assert_allclose(fit.theta[k].numpy(), expected, rtol=1e-8)
        assert float(fit.cost[k]) == pytest.approx(0.5 * np.sum(fun(expected) ** 2), rel=1e-12)
    assert all(s in CONVERGED for s in statuses(fit))


def test_gaussian_matches_curve_fit_including_covariance() -> None:
    rng = np.random.default_rng(7)
    x = np.linspace(-3, 3, 100)
    y = 2.0 * np.exp(-((x - 0.3) ** 2) / (2 * 0.8**2)) + 0.1 + 0.05 * rng.standard_normal(100)

    def f(x: np.ndarray, a: float, mu: float, s: float, c: float) -> np.ndarray:
        return a * np.exp(-((x - mu) ** 2) / (2 * s**2)) + c

    p0 = [1.0, 0.0, 1.0, 0.0]
    popt, pcov = curve_fit(f, x, y, p0=p0, ftol=1e-15, xtol=1e-15, gtol=1e-15)
    xt, yt = torch.as_tensor(x), torch.as_tensor(y)
    fit = levenberg_marquardt(lambda t: gaussian(t, xt) - yt, torch.tensor([p0], dtype=F64))
    # curve_fit differentiates by finite differences (~1e-8 relative): agree to 1e-6, and be
    # at least as good by the cost.
    np.testing.assert_allclose(fit.theta[0].numpy(), popt, rtol=1e-6)
    assert float(fit.cost[0]) <= 0.5 * np.sum((f(x, *popt) - y) ** 2) * (1 + 1e-14)
    J = fit.jacobian[0].numpy()
    cov = np.linalg.inv(J.T @ J) * 2 * float(fit.cost[0]) / (len(x) - 4)
    np.testing.assert_allclose(cov, pcov, rtol=1e-5)


def test_user_jacobian_gives_the_autodiff_answer() -> None:
    y = decay_data(3, seed=5)

    def jac(theta: Tensor) -> tuple[Tensor, Tensor]:
        a, k, _ = theta.unsqueeze(-1).unbind(-2)
        e = torch.exp(-k * X)
        J = torch.stack([e, -a * X * e, torch.ones_like(e)], -1)
        return a * e + theta[:, 2:] - y, J

    theta0 = torch.tensor([[1.0, 0.5, 0.0]], dtype=F64).expand(3, 3)
    auto = levenberg_marquardt(residuals_for(exp_decay, y), theta0)
    user = levenberg_marquardt(residuals_for(exp_decay, y), theta0, jacobian=jac)
    np.testing.assert_allclose(user.theta.numpy(), auto.theta.numpy(), rtol=1e-10)
    np.testing.assert_allclose(user.jacobian.numpy(), auto.jacobian.numpy(), rtol=1e-10)


def test_autodiff_jacobian_matches_torch_autograd() -> None:
    gen = torch.Generator().manual_seed(0)
    theta = torch.rand(3, 4, generator=gen, dtype=F64) + 0.5
    x = torch.linspace(-1, 1, 7, dtype=F64)
    r, J = autodiff_jacobian(lambda t: gaussian(t, x))(theta)
    for k in range(3):
        ref = torch.autograd.functional.jacobian(lambda t: gaussian(t[None], x)[0], theta[k])
        np.testing.assert_allclose(J[k].numpy(), ref.numpy(), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(r.numpy(), gaussian(theta, x).numpy())


# --- batch independence -------------------------------------------------------------------------


def mixed_batch() -> tuple[Tensor, Tensor]:
    """Easy, far-start, exact-data, degenerate (zero amplitude) and NaN-start curves."""
    y = torch.cat([decay_data(3, seed=11), exp_decay(torch.tensor([[1.0, 2.0, 0.5]], dtype=F64))])
    y = torch.cat([y, decay_data(2, seed=12)])
    theta0 = torch.tensor(
        [
            [2.0, 1.0, 0.5],  # easy
            [50.0, 0.01, -20.0],  # far away
            [1.0, 8.0, 3.0],  # steep start
            [1.5, 1.0, 0.0],  # exact data
            [0.0, 1.0, 0.0],  # zero amplitude: d/dk = 0 at the start only
            [float("nan"), 1.0, 0.0],  # non-finite start
        ],
        dtype=F64,
    )
    return y, theta0


def test_batch_curves_do_not_influence_each_other() -> None:
    y, theta0 = mixed_batch()
    batch = levenberg_marquardt(residuals_for(exp_decay, y), theta0)
    assert statuses(batch)[5:] == [LMStatus.NON_FINITE]
    assert all(s in CONVERGED for s in statuses(batch)[:5])
    for k in range(len(y)):
        single = levenberg_marquardt(residuals_for(exp_decay, y[k : k + 1]), theta0[k : k + 1])
        assert single.status.item() == batch.status[k].item()
        assert single.n_iter.item() == batch.n_iter[k].item()
        np.testing.assert_allclose(
            single.theta[0].numpy(), batch.theta[k].numpy(), rtol=1e-10, equal_nan=True
        )
        np.testing.assert_allclose(single.cost.numpy(), batch.cost[k : k + 1].numpy(), rtol=1e-10)


def test_stopped_curves_never_change() -> None:
    y, theta0 = mixed_batch()
    history: list[Tensor] = []
    fit = levenberg_marquardt(
        residuals_for(exp_decay, y), theta0, callback=lambda it, cost: history.append(cost)
    )
    costs = torch.stack(history)  # (iterations, K)
    assert costs.shape == (int(fit.n_iter.max()), len(y))
    for k, n in enumerate(fit.n_iter.tolist()):
        after = costs[max(n - 1, 0) :, k]
        np.testing.assert_array_equal(after.numpy(), after[:1].expand_as(after).numpy())


@pytest.mark.parametrize("robust", [None, "huber"])
def test_dropping_stopped_curves_changes_no_curve(robust: str | None) -> None:
    """With ``subset`` the kernel shrinks its work to the running curves; every curve's
    outcome must be what it is when all curves ride along to the end."""
    y, theta0 = mixed_batch()
    gen = torch.Generator().manual_seed(5)
    far = theta0[1:2] * (1 + torch.rand(8, 3, generator=gen, dtype=F64))  # slow curves
    y = torch.cat([y, decay_data(8, seed=13)])
    theta0 = torch.cat([theta0, far])
    mask = torch.rand(y.shape, generator=gen) > 0.2
    y = torch.where(mask, y, float("nan"))  # masked points hold NaN
    rho = {None: None, "huber": _huber}[robust]
    calls: list[int] = []

    def subset(index: Tensor):
        calls.append(len(index))
        return residuals_for(exp_decay, y[index]), None, mask[index]

    whole = levenberg_marquardt(residuals_for(exp_decay, y), theta0, mask=mask, robust=rho)
    shrunk = levenberg_marquardt(
        residuals_for(exp_decay, y), theta0, mask=mask, robust=rho, subset=subset
    )
    assert len(calls) >= 2 and calls == sorted(calls, reverse=True)  # it did shrink, twice
    assert shrunk.status.tolist() == whole.status.tolist()
    assert shrunk.n_iter.tolist() == whole.n_iter.tolist()
    for name in ("theta", "cost", "rows"):
        np.testing.assert_allclose(
            getattr(shrunk, name).numpy(), getattr(whole, name).numpy(), rtol=1e-12,
            atol=0, equal_nan=True,
        )  # fmt: skip


# --- statuses -----------------------------------------------------------------------------------


def test_non_finite_start() -> None:
    y = decay_data(1)
    fit = levenberg_marquardt(
        lambda t: torch.sqrt(t[:, :1] - 5.0) * X - y, torch.tensor([[1.0]], dtype=F64)
    )
    assert statuses(fit) == [LMStatus.NON_FINITE] and fit.n_iter.item() == 0
    assert fit.theta.tolist() == [[1.0]]


def test_non_finite_jacobian_at_start() -> None:
    y = decay_data(1)  # sqrt(b) at b = 0: finite residuals, infinite derivative
    fit = levenberg_marquardt(
        lambda t: torch.sqrt(t[:, :1]) * X - y, torch.tensor([[0.0]], dtype=F64)
    )
    assert statuses(fit) == [LMStatus.NON_FINITE]


def test_non_finite_trial_steps_are_rejected() -> None:
    # log(b x) is NaN for b < 0; the first Gauss–Newton steps from b = 50 overshoot below 0.
    x = torch.linspace(1, 5, 20, dtype=F64)
    y = torch.log(0.01 * x)[None]
    fit = levenberg_marquardt(
        lambda t: torch.log(t[:, :1] * x) - y, torch.tensor([[50.0]], dtype=F64)
    )
    assert statuses(fit)[0] in CONVERGED
    assert fit.theta.item() == pytest.approx(0.01, rel=1e-12)


@pytest.mark.parametrize(
    "model",
    [
        lambda t: t[:, :1] * X,  # the second parameter is not used at all
        lambda t: t[:, :1] * X + 0.0 * t[:, 1:],  # ... or has a constant-zero column
        lambda t: (0.0 * t).sum(-1, keepdim=True) + X,  # all-zero Jacobian
    ],
    ids=["unused", "zero-column", "zero-jacobian"],
)
def test_a_parameter_without_effect_does_not_stop_the_fit(
    model: Callable[[Tensor], Tensor],
) -> None:
    """A zero Jacobian column is scaled by 1, as MINPACK does: that parameter stays where it
    is and the others reach their least-squares values (singular is the warnings' business)."""
    y = decay_data(2)
    fit = levenberg_marquardt(lambda t: model(t) - y, torch.ones(2, 2, dtype=F64))
    assert all(s in CONVERGED for s in statuses(fit))
    assert fit.theta[:, 1].tolist() == [1.0, 1.0]
    if model(torch.zeros(1, 2, dtype=F64)).abs().sum() == 0:  # a times X: a is the lstsq slope
        slope = (y * X).sum(-1) / (X * X).sum(-1)
        torch.testing.assert_close(fit.theta[:, 0], slope, rtol=1e-10, atol=0)


def test_beale_zero_column_at_the_start() -> None:
    """MGH's Beale from (1, 1): ∂r/∂x1 = 1 - x2^t is exactly 0 there; MINPACK reaches 0."""
    t = torch.arange(1.0, 4.0, dtype=F64)
    y = torch.tensor([[1.5, 2.25, 2.625]], dtype=F64)
    fit = levenberg_marquardt(
        lambda p: p[:, :1] * (1 - p[:, 1:] ** t) - y, torch.ones(1, 2, dtype=F64)
    )
    assert statuses(fit)[0] in CONVERGED and fit.cost.item() < 1e-20
    torch.testing.assert_close(fit.theta[0], torch.tensor([3.0, 0.5], dtype=F64))


def test_max_iter() -> None:
    y = decay_data(2)
    fit = levenberg_marquardt(residuals_for(exp_decay, y), torch.ones(2, 3, dtype=F64), max_iter=1)
    assert statuses(fit) == [LMStatus.MAX_ITER] * 2 and fit.n_iter.tolist() == [1, 1]


def test_exact_start_on_exact_data_is_gtol_at_once() -> None:
    true = torch.tensor([[2.0, 1.0, 0.5]], dtype=F64)
    fit = levenberg_marquardt(residuals_for(exp_decay, exp_decay(true)), true)
    assert statuses(fit) == [LMStatus.GTOL] and fit.n_iter.item() == 0


def test_exact_data_converges_to_the_exact_parameters() -> None:
    true = torch.tensor([[2.0, 1.0, 0.5]], dtype=F64)
    fit = levenberg_marquardt(
        residuals_for(exp_decay, exp_decay(true)), torch.ones(1, 3, dtype=F64)
    )
    assert statuses(fit)[0] in CONVERGED
    np.testing.assert_allclose(fit.theta.numpy(), true.numpy(), rtol=1e-10)


def test_noisy_data_stops_converged_within_a_few_iterations() -> None:
    fit = levenberg_marquardt(residuals_for(exp_decay, decay_data(1)), torch.ones(1, 3, dtype=F64))
    # FTOL, or XTOL where the next (nearly undamped) step would have been below xtol
    assert statuses(fit) in ([LMStatus.FTOL], [LMStatus.XTOL]) and fit.n_iter.item() < 30


def test_a_good_step_is_not_rejected_for_a_slightly_large_acceleration() -> None:
    # From this rough start the first Gauss-Newton step has a gain ratio of 0.95 while its
    # geodesic acceleration is ~1% beyond the trusted ratio: it is taken, not rejected (the
    # strict rule spent five iterations raising the damping first).
    x, y = (t.to(F64) for t in gaussian_peak(n=100, seed=0))

    def gaussian(t: Tensor) -> Tensor:
        return t[:, :1] * torch.exp(-((x - t[:, 1:2]) ** 2) / (2 * t[:, 2:3] ** 2)) + t[:, 3:4]

    costs: list[float] = []
    start = torch.tensor([[4.0, 0.5, 1.5, 0.0]], dtype=F64)
    fit = levenberg_marquardt(
        lambda t: gaussian(t) - y, start, callback=lambda it, cost: costs.append(float(cost[0]))
    )
    initial = 0.5 * float(((gaussian(start) - y) ** 2).sum())
    assert costs[0] < 0.5 * initial  # the first iteration already moved
    assert statuses(fit) in ([LMStatus.FTOL], [LMStatus.XTOL]) and fit.n_iter.item() <= 8
    reference = scipy_fit(lambda p: gaussian(torch.tensor(p)[None])[0].numpy() - y.numpy(),
                          start[0].numpy())  # fmt: skip
    # the center is near 0 (2.3e-3): its error is judged against the parameters' scale (~1)
    np.testing.assert_allclose(fit.theta[0].numpy(), reference, rtol=1e-7, atol=1e-8)


def test_callback_can_stop_the_batch() -> None:
    seen: list[tuple[int, tuple[int, ...]]] = []

    def callback(iteration: int, cost: Tensor) -> bool:
        seen.append((iteration, tuple(cost.shape)))
        return iteration == 2

    fit = levenberg_marquardt(
        residuals_for(exp_decay, decay_data(3)), torch.ones(3, 3, dtype=F64), callback=callback
    )
    assert seen == [(1, (3,)), (2, (3,))]
    assert statuses(fit) == [LMStatus.MAX_ITER] * 3 and fit.n_iter.tolist() == [2, 2, 2]


def test_describe() -> None:
    assert describe(LMStatus.FTOL) == ("converged: relative reduction of the cost below ftol=1e-15")
    assert "1e-08" in describe(2, xtol=1e-8)
    assert LMStatus.SINGULAR.describe().startswith("failed")
    assert all(isinstance(describe(s), str) for s in LMStatus)


def test_theta0_must_be_a_float_matrix() -> None:
    with pytest.raises(ValueError, match=r"\(K, P\)"):
        levenberg_marquardt(lambda t: t, torch.ones(3, dtype=F64))


# --- masks and robust losses --------------------------------------------------------------------


def test_masked_nan_points_equal_dropping_them() -> None:
    y = decay_data(2, seed=4)
    mask = torch.ones_like(y, dtype=torch.bool)
    mask[0, ::3] = False
    mask[1, 5:12] = False
    y_nan = torch.where(mask, y, float("nan"))
    theta0 = torch.ones(2, 3, dtype=F64)
    fit = levenberg_marquardt(residuals_for(exp_decay, y_nan), theta0, mask=mask)
    assert torch.isfinite(fit.jacobian).all() and (fit.jacobian[~mask] == 0).all()
    for k in range(2):
        keep = mask[k]
        alone = levenberg_marquardt(
            lambda t, keep=keep, k=k: exp_decay(t, X[keep]) - y[k, keep], theta0[k : k + 1]
        )
        np.testing.assert_allclose(fit.theta[k].numpy(), alone.theta[0].numpy(), rtol=1e-10)
        np.testing.assert_allclose(fit.cost[k].item(), alone.cost.item(), rtol=1e-10)
        np.testing.assert_allclose(fit.jacobian[k, keep].numpy(), alone.jacobian[0].numpy())


def _huber(z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    big = z > 1
    sz = torch.sqrt(torch.where(big, z, 1.0))
    return (
        torch.where(big, 2 * sz - 1, z),
        torch.where(big, 1 / sz, 1.0),
        torch.where(big, -0.5 / sz**3, 0.0),
    )


def _soft_l1(z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    t = 1 + z
    return 2 * (t**0.5 - 1), t**-0.5, -0.5 * t**-1.5


def _cauchy(z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    return torch.log1p(z), 1 / (1 + z), -1 / (1 + z) ** 2


def _arctan(z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    return torch.atan(z), 1 / (1 + z**2), -2 * z / (1 + z**2) ** 2


@pytest.mark.parametrize(
    ("loss", "rho"),
    [("huber", _huber), ("soft_l1", _soft_l1), ("cauchy", _cauchy), ("arctan", _arctan)],
)
@pytest.mark.parametrize("f_scale", [0.05, 1.0])
def test_robust_losses_match_scipy(
    loss: str, rho: Callable[[Tensor], tuple[Tensor, Tensor, Tensor]], f_scale: float
) -> None:
    y = decay_data(1, seed=9, noise=0.03).clone()
    y[0, ::7] += 1.5  # outliers
    theta0 = torch.tensor([[2.0, 1.0, 0.3]], dtype=F64)
    fit = levenberg_marquardt(residuals_for(exp_decay, y), theta0, robust=rho, f_scale=f_scale)

    def fun(b: np.ndarray) -> np.ndarray:
        return (exp_decay(torch.as_tensor(b)[None]) - y).numpy()[0]

    ref = least_squares(
        fun, theta0[0].numpy(), loss=loss, f_scale=f_scale, ftol=1e-15, xtol=1e-15, gtol=1e-15
    )
    # SciPy differentiates by finite differences: agree to 1e-6 and be as good by the cost.
    np.testing.assert_allclose(fit.theta[0].numpy(), ref.x, rtol=1e-6)
    assert fit.cost.item() <= ref.cost * (1 + 1e-12)
    assert statuses(fit)[0] in CONVERGED
    # The returned Jacobian is that of the plain (un-robustified) residuals, for the covariance.
    plain = autodiff_jacobian(residuals_for(exp_decay, y))(fit.theta)[1]
    np.testing.assert_allclose(fit.jacobian.numpy(), plain.numpy(), rtol=1e-12)


@pytest.mark.gpu
@pytest.mark.filterwarnings("ignore:Attempting to run cuBLAS:UserWarning")
def test_cuda_matches_cpu() -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    y, theta0 = mixed_batch()
    cpu = levenberg_marquardt(residuals_for(exp_decay, y), theta0)
    dev = torch.device("cuda")
    x, yd = X.to(dev), y.to(dev)
    gpu = levenberg_marquardt(lambda t: exp_decay(t, x) - yd, theta0.to(dev))
    assert gpu.theta.device.type == "cuda"
    assert gpu.status.cpu().tolist() == cpu.status.tolist()
    np.testing.assert_allclose(
        gpu.theta.cpu().numpy(), cpu.theta.numpy(), rtol=1e-9, equal_nan=True
    )


def test_symbolic_rows_run_without_autograd_and_return_ordinary_tensors() -> None:
    y = decay_data(2)
    seen: list[bool] = []

    def stacked(theta: Tensor) -> Tensor:
        seen.append(torch.is_inference_mode_enabled())
        a, k, c = theta[:, :1], theta[:, 1:2], theta[:, 2:]
        e = torch.exp(-k * X)
        return torch.stack([e, -a * X * e, torch.ones_like(e), a * e + c - y], dim=1)

    theta0 = torch.ones(2, 3, dtype=F64)
    fit = levenberg_marquardt(lambda t: exp_decay(t) - y, theta0, stacked=stacked)
    reference = levenberg_marquardt(lambda t: exp_decay(t) - y, theta0)  # autograd Jacobians
    assert seen and all(seen)
    np.testing.assert_allclose(fit.theta.numpy(), reference.theta.numpy(), rtol=1e-9)
    for t in (fit.theta, fit.cost, fit.status, fit.rows):
        assert not t.is_inference()
    fit.theta.requires_grad_(True)  # refused for inference tensors
