"""The block LM solver (``optim/block_lm.py``) against SciPy and dense linear algebra."""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from numpy.typing import NDArray
from scipy.optimize import least_squares

from gradfit.optim.block_lm import Blocks, block_covariance, block_levenberg_marquardt, solve_damped
from gradfit.optim.lm import LMStatus
from gradfit.optim.problem import Problem

Array = NDArray[np.float64]
CONVERGED = (LMStatus.FTOL, LMStatus.XTOL, LMStatus.GTOL)


def _gaussians(seed: int, K: int = 6, N: int = 40) -> tuple[Array, Array, Array, Array]:
    """K Gaussians a·exp(-(x-m)²/(2w²)) sharing the width w = 1.3, uneven lengths (mask),
    per-point sigma."""
    rng = np.random.default_rng(seed)
    x = np.tile(np.linspace(-5.0, 5.0, N), (K, 1)) + rng.uniform(-0.5, 0.5, (K, 1))
    a, m = rng.uniform(1.0, 4.0, K), rng.uniform(-1.5, 1.5, K)
    sigma = rng.uniform(0.02, 0.08, (K, N))
    y = (
        a[:, None] * np.exp(-((x - m[:, None]) ** 2) / (2 * 1.3**2))
        + rng.normal(0, 1, (K, N)) * sigma
    )
    lengths = rng.integers(N // 2, N + 1, K)
    mask = np.arange(N)[None, :] < lengths[:, None]
    return x, np.where(mask, y, np.nan), sigma, mask


def _rows(x: Array, y: Array, sigma: Array):  # type: ignore[no-untyped-def]
    X, Y, S = (torch.as_tensor(v) for v in (x, np.nan_to_num(y), sigma))

    def rows(local: torch.Tensor, shared: torch.Tensor) -> torch.Tensor:
        a, m, w = local[:, :1], local[:, 1:], shared[0]
        d = X - m
        e = torch.exp(-(d**2) / (2 * w**2))
        f = a * e
        return torch.stack([e, f * d / w**2, f * d**2 / w**3, f - Y], dim=1) / S.unsqueeze(1)

    return rows


def _scipy(x: Array, y: Array, sigma: Array, mask: Array, start: Array) -> tuple[Array, Array]:
    """SciPy on the stacked residuals, params (a_0, m_0, a_1, m_1, ..., w); stderr from J."""
    K = x.shape[0]

    def parts(p: Array) -> tuple[list[Array], list[Array]]:
        res, jac = [], []
        w = p[-1]
        for i in range(K):
            xi, yi, si = x[i][mask[i]], y[i][mask[i]], sigma[i][mask[i]]
            a, m = p[2 * i], p[2 * i + 1]
            e = np.exp(-((xi - m) ** 2) / (2 * w**2))
            res.append((a * e - yi) / si)
            J = np.zeros((len(xi), len(p)))
            J[:, 2 * i] = e / si
            J[:, 2 * i + 1] = a * e * (xi - m) / w**2 / si
            J[:, -1] = a * e * (xi - m) ** 2 / w**3 / si
            jac.append(J)
        return res, jac

    ref = least_squares(
        lambda p: np.concatenate(parts(p)[0]), start, jac=lambda p: np.vstack(parts(p)[1]),
        method="lm", xtol=1e-15, ftol=1e-15, gtol=1e-15,
    )  # fmt: skip
    J = np.vstack(parts(ref.x)[1])
    s2 = float(ref.fun @ ref.fun) / (len(ref.fun) - len(ref.x))
    return ref.x, np.sqrt(np.diag(np.linalg.inv(J.T @ J)) * s2)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_scipy_on_stacked_residuals(seed: int) -> None:
    x, y, sigma, mask = _gaussians(seed)
    K = x.shape[0]
    local0 = np.column_stack([np.full(K, 2.0), np.zeros(K)])
    fit = block_levenberg_marquardt(
        _rows(x, y, sigma), torch.as_tensor(local0), torch.tensor([1.0], dtype=torch.float64),
        mask=torch.as_tensor(mask),
    )  # fmt: skip
    assert fit.status in CONVERGED
    ref, ref_stderr = _scipy(x, y, sigma, mask, np.r_[local0.reshape(-1), 1.0])
    got = np.r_[fit.theta_local.numpy().reshape(-1), fit.theta_shared.numpy()]
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-9)
    cov = block_covariance(fit.blocks)
    n_points, n_free = int(mask.sum()), 2 * K + 1
    s2 = 2 * fit.cost / (n_points - n_free)
    stderr = np.sqrt(np.r_[cov.variance_local.numpy().reshape(-1), np.diag(cov.shared)] * s2)
    np.testing.assert_allclose(stderr, ref_stderr, rtol=1e-3)


def test_block_covariance_equals_the_dense_inverse() -> None:
    """(JᵀJ)⁻¹ from the blocks, diagonal and full matrix, against NumPy's dense inverse."""
    rng = np.random.default_rng(5)
    K, L, S, N = 4, 2, 2, 9
    rows = torch.as_tensor(rng.normal(size=(K, L + S + 1, N)))
    J = np.zeros((K * N, K * L + S))
    for i in range(K):
        J[i * N : (i + 1) * N, i * L : (i + 1) * L] = rows[i, :L].numpy().T
        J[i * N : (i + 1) * N, K * L :] = rows[i, L : L + S].numpy().T
    dense = np.linalg.inv(J.T @ J)
    cov = block_covariance(Blocks.of(rows, L))
    np.testing.assert_allclose(cov.variance_local.numpy().reshape(-1), np.diag(dense)[: K * L])
    np.testing.assert_allclose(cov.shared.numpy(), dense[K * L :, K * L :])
    np.testing.assert_allclose(cov.covariance().numpy(), dense, atol=1e-12)


def test_damped_step_solves_the_dense_system() -> None:
    rng = np.random.default_rng(6)
    K, L, S, N = 3, 2, 1, 7
    rows = torch.as_tensor(rng.normal(size=(K, L + S + 1, N)))
    blocks = Blocks.of(rows, L)
    d_local, d_shared = torch.as_tensor(rng.uniform(0.1, 1, (K, L))), torch.tensor([0.3])
    step_l, step_s, solved = solve_damped(
        blocks, d_local, d_shared.double(), blocks.g_local, blocks.g_shared
    )
    J = np.zeros((K * N, K * L + S))
    r = rows[:, -1].numpy().reshape(-1)
    for i in range(K):
        J[i * N : (i + 1) * N, i * L : (i + 1) * L] = rows[i, :L].numpy().T
        J[i * N : (i + 1) * N, K * L :] = rows[i, L : L + S].numpy().T
    H = J.T @ J + np.diag(np.r_[d_local.numpy().reshape(-1), 0.3])
    expected = -np.linalg.solve(H, J.T @ r)
    assert solved
    np.testing.assert_allclose(np.r_[step_l.numpy().reshape(-1), step_s.numpy()], expected)


def test_an_iteration_limit_is_not_called_converged() -> None:
    x, y, sigma, mask = _gaussians(3)
    K = x.shape[0]
    fit = block_levenberg_marquardt(
        _rows(x, y, sigma), torch.as_tensor(np.column_stack([np.full(K, 2.0), np.zeros(K)])),
        torch.tensor([1.0], dtype=torch.float64), mask=torch.as_tensor(mask), max_iter=2,
    )  # fmt: skip
    assert fit.status == LMStatus.MAX_ITER and fit.n_iter == 2


def test_a_non_finite_start_fails_at_once() -> None:
    x, y, sigma, mask = _gaussians(4)
    K = x.shape[0]
    local = torch.as_tensor(np.column_stack([np.full(K, 2.0), np.zeros(K)]))
    fit = block_levenberg_marquardt(
        _rows(x, y, sigma), local, torch.tensor([0.0], dtype=torch.float64),
        mask=torch.as_tensor(mask),
    )  # fmt: skip
    assert fit.status == LMStatus.NON_FINITE and fit.n_iter == 0


# -- the compiled evaluator and damped solve (optim/compiled/blocks.py) against PyTorch's


def _gaussian_problem(seed: int, *, K: int = 7, N: int = 25, bounded: bool = True):  # type: ignore[no-untyped-def]
    """Gaussians with an offset, width shared: bounds on three parameters, the offset fixed,
    per-point sigma, uneven lengths and one group without points."""
    from gradfit.model.losses import Loss
    from gradfit.model.models import as_model
    from gradfit.model.parameters import ParameterSpace
    from gradfit.optim.problem import Problem

    x, y, sigma, mask = _gaussians(seed, K, N)
    mask[-1] = False
    model = as_model("a*exp(-(x - m)**2/(2*w**2)) + c")
    bounds = {"a": (0.0, None), "m": (-3.0, 3.0), "w": (None, 5.0)} if bounded else None
    space = ParameterSpace.build(model.param_names, bounds, {"c": 0.01})
    t = torch.as_tensor
    problem = Problem(model, t(x), t(np.nan_to_num(y)), Loss("mse", None, sigma=t(sigma)), space)
    free = [model.param_names[i] for i in space.free]
    local, shared = [free.index("a"), free.index("m")], [free.index("w")]
    rng = np.random.default_rng(seed)
    theta = t(rng.uniform(-1.0, 1.0, (K, len(free))))
    return problem, t(mask), local, shared, theta


@pytest.mark.parametrize("bounded", [True, False])
def test_compiled_blocks_equal_those_of_the_rows(bounded: bool) -> None:
    from gradfit.optim.block_lm import evaluate_blocks
    from gradfit.optim.compiled.blocks import block_evaluator
    from gradfit.optim.shared_lm import _rows_function

    problem, mask, local, shared, theta = _gaussian_problem(1, bounded=bounded)
    t_local, t_shared = theta[:, local], theta[0, shared]
    order = torch.tensor([*local, *shared, len(local) + len(shared)])
    rows_of = _rows_function(problem, 3, local, shared)
    ref_res, ref = evaluate_blocks(rows_of, t_local, t_shared, mask=mask, chunk=3, order=order)
    with ThreadPoolExecutor(2) as pool:  # chunks side by side, as fit_shared runs them
        evaluate = block_evaluator(problem, mask, local, shared, chunk=3, chunk_map=pool.map)
        res, got = evaluate(t_local, t_shared)
    for name in ("A", "B", "C", "g_local", "g_shared", "group_cost2"):
        want = getattr(ref, name)
        np.testing.assert_allclose(getattr(got, name), want, rtol=1e-12, atol=1e-12, err_msg=name)
    assert got.cost2 == pytest.approx(ref.cost2, rel=1e-13)
    np.testing.assert_allclose(torch.cat(res), torch.cat(ref_res), rtol=1e-13, atol=1e-15)
    assert (got.A[-1] == 0).all() and got.group_cost2[-1] == 0  # the empty group


def test_compiled_blocks_of_a_non_finite_jacobian_have_a_nan_cost() -> None:
    from gradfit.model.losses import Loss
    from gradfit.model.models import as_model
    from gradfit.model.parameters import ParameterSpace
    from gradfit.optim.block_lm import evaluate_blocks
    from gradfit.optim.compiled.blocks import block_evaluator
    from gradfit.optim.shared_lm import _rows_function

    model = as_model("sqrt(a*x) + b")  # ∂/∂a = x / (2 sqrt(a x)): 0/0 at x = 0
    x = torch.linspace(0, 1, 6, dtype=torch.float64)
    y = torch.ones(2, 6, dtype=torch.float64)
    space = ParameterSpace.build(model.param_names)
    problem = Problem(model, x, y, Loss("mse", None), space)
    mask = torch.ones(2, 6, dtype=torch.bool)
    theta = torch.tensor([[1.0, 0.0], [2.0, 0.0]], dtype=torch.float64)
    order = torch.tensor([0, 1, 2])
    _, ref = evaluate_blocks(
        _rows_function(problem, 2, [0], [1]), theta[:, :1], theta[0, 1:], mask=mask, chunk=2,
        order=order,
    )  # fmt: skip
    _, got = block_evaluator(problem, mask, [0], [1], chunk=2)(theta[:, :1], theta[0, 1:])
    assert math.isnan(ref.cost2) and math.isnan(got.cost2)
    assert math.isfinite(float(got.group_cost2.sum()))  # the residuals themselves are finite


@pytest.mark.parametrize("S", [0, 1, 2])
def test_compiled_damped_solve_equals_torch(S: int) -> None:
    from gradfit.optim.compiled.blocks import solve_damped as compiled_solve

    rng = np.random.default_rng(7 + S)
    K, L, N = 5, 3, 9
    rows = torch.as_tensor(rng.normal(size=(K, L + S + 1, N)))
    blocks = Blocks.of(rows, L)
    d_local = torch.as_tensor(rng.uniform(0.01, 1, (K, L)))
    d_shared = torch.as_tensor(rng.uniform(0.01, 1, S))
    ref = solve_damped(blocks, d_local, d_shared, blocks.g_local, blocks.g_shared)
    with ThreadPoolExecutor(2) as pool:
        for chunk in (None, 2):  # all groups in one loop, or chunks side by side
            got = compiled_solve(
                blocks, d_local, d_shared, blocks.g_local, blocks.g_shared, chunk=chunk,
                chunk_map=pool.map,
            )  # fmt: skip
            assert ref[2] and got[2]
            np.testing.assert_allclose(got[0], ref[0], rtol=1e-10)
            np.testing.assert_allclose(got[1], ref[1], rtol=1e-10)
        # a block that is not positive definite voids the step, as in torch
        blocks.A[2] = -torch.eye(L, dtype=torch.float64)
        step_l, step_s, solved = compiled_solve(
            blocks, d_local, d_shared, blocks.g_local, blocks.g_shared, chunk=2,
            chunk_map=pool.map,
        )  # fmt: skip
    assert not solved and step_l.isnan().all() and step_s.isnan().all()
