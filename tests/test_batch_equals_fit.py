"""`fit_batch` row i equals `gradfit.fit` on curve i's valid points alone, however the batch is
padded (NaN in y, NaN in x and y, a mask over junk values), with the built-ins' own guesses or
a p0, on both Levenberg–Marquardt kernels; an nn.Module starts from its own parameters; a
curve with too few points has NaN parameters and no iterations.

Every expected value comes from an independent single `gradfit.fit` on the curve's valid
points, never from the batch path itself.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import gradfit as gf
from gradfit.errors import OptionError
from gradfit.optim.compiled import bridge as lm_compiled
from gradfit.optim.lm import describe
from gradfit.results.batch_result import CONVERGED

Array = np.ndarray
RTOL, ATOL = 1e-9, 1e-12
X_RANGE = (0.1, 4.0)  # positive: the power law needs x > 0


def _uniform(rng: np.random.Generator, *ranges: tuple[float, float]) -> list[Array]:
    return [rng.uniform(lo, hi, (1,)) for lo, hi in ranges]


# model -> (true curve from a random draw, a p0 near every draw) ; each well posed on X_RANGE
CURVES: dict[str, tuple[Callable[[Array, np.random.Generator], Array], list[float]]] = {
    "linear": (lambda x, r: np.polyval(r.uniform(-2, 2, 2), x), [1.0, 0.0]),
    "quadratic": (lambda x, r: np.polyval(r.uniform(-1, 1, 3), x), [0.0, 0.0, 0.0]),
    "exponential": (
        lambda x, r: (lambda a, k, c: a * np.exp(-k * x) + c)(
            *_uniform(r, (1, 3), (0.7, 2), (-0.5, 0.5))
        ),
        [2.0, 1.0, 0.0],
    ),
    "gaussian": (
        lambda x, r: (lambda a, m, w, c: a * np.exp(-((x - m) ** 2) / (2 * w**2)) + c)(
            *_uniform(r, (1, 3), (1.2, 1.8), (0.4, 0.7), (-0.2, 0.2))
        ),
        [2.0, 1.5, 0.5, 0.0],
    ),
    "lorentzian": (
        lambda x, r: (lambda a, m, w, c: a * w**2 / ((x - m) ** 2 + w**2) + c)(
            *_uniform(r, (1, 3), (1.2, 1.8), (0.4, 0.7), (-0.2, 0.2))
        ),
        [2.0, 1.5, 0.5, 0.0],
    ),
    "logistic": (
        lambda x, r: (lambda t, k, m, b: t / (1 + np.exp(-k * (x - m))) + b)(
            *_uniform(r, (1, 3), (3, 5), (0.7, 1.1), (-0.5, 0.5))
        ),
        [2.0, 4.0, 0.9, 0.0],
    ),
    "power_law": (
        lambda x, r: (lambda a, b: a * x**b)(*_uniform(r, (1, 3), (-1.2, 1.2))),
        [2.0, 0.0],
    ),
    "sine": (
        lambda x, r: (lambda a, f, p, c: a * np.sin(2 * np.pi * f * x + p) + c)(
            *_uniform(r, (1, 2), (0.4, 0.8), (-1, 1), (-0.5, 0.5))
        ),
        [1.5, 0.6, 0.0, 0.0],
    ),
}


def ragged_batch(model: str, K: int, N: int, seed: int) -> tuple[Array, Array, Array]:
    """x ``[N]``, noisy y ``[K, N]`` and valid ``[K, N]``: each curve measured on a prefix
    of the grid (at least half of it) with a few dropouts."""
    rng = np.random.default_rng(seed)
    x = np.linspace(*X_RANGE, N)
    truth, _ = CURVES[model]
    y = np.stack([truth(x, rng) for _ in range(K)]) + rng.normal(0, 0.03, (K, N))
    lengths = rng.integers(N // 2, N + 1, K)
    valid = np.arange(N)[None, :] < lengths[:, None]
    valid &= rng.uniform(size=(K, N)) > 0.1  # dropouts
    return x, y, valid


def padded(x: Array, y: Array, valid: Array, how: str) -> dict[str, Array]:
    """The batch as a user would pad it: NaN in y, NaN in x and y, or a mask over junk."""
    if how == "nan_y":
        return {"x": x, "y": np.where(valid, y, np.nan)}
    if how == "nan_xy":
        return {"x": np.where(valid, x, np.nan), "y": np.where(valid, y, np.nan)}
    junk = np.where(np.arange(y.size).reshape(y.shape) % 2, 1e6, np.nan)  # never to be read
    return {"x": x, "y": np.where(valid, y, junk), "mask": valid}


def assert_row_equals_fit(batch: gf.BatchResult, i: int, single: gf.FitResult) -> None:
    assert batch[i]["n_points"] == single.n_points
    code = int(batch.status[i])
    if single.status != "converged":
        # Out of iterations on a curve its points cannot pin down (a logistic step beyond
        # the prefix): where it stops is rounding, which the PyTorch kernel's masked sums
        # change. Only the verdict must agree.
        assert code not in CONVERGED, (batch.status_names[i], single.status)
        return
    assert code in CONVERGED
    if single.n_iter > 1:  # after the one step that solves a linear model, every stop test
        assert describe(code).endswith(single.message)  # stands at rounding; else the same
    want = np.array(list(single.params.values()))
    # A fit in a wrong, flat minimum (χ²ᵣ far above the noise's 0.03² ≈ 1e-3) is only
    # determined to ~1e-9: there even fit alone moves that much between two calls (MKL's
    # lstsq in the guess differs by an ulp from call to call).
    rtol = RTOL if single.reduced_chi2 < 1e-2 else 1e-6
    np.testing.assert_allclose(batch.params[i].numpy(), want, rtol=rtol, atol=ATOL)


@settings(
    max_examples=20,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    model=st.sampled_from(sorted(CURVES)),
    K=st.integers(1, 5),
    N=st.integers(12, 40),
    seed=st.integers(0, 2**32 - 1),
    how=st.sampled_from(["nan_y", "nan_xy", "mask"]),
    compiled=st.booleans(),
    with_p0=st.booleans(),
)
def test_each_row_equals_fit_on_its_valid_points(
    model: str, K: int, N: int, seed: int, how: str, compiled: bool, with_p0: bool
) -> None:
    x, y, valid = ragged_batch(model, K, N, seed)
    p0 = CURVES[model][1] if with_p0 else None  # None: the built-in's guess, in both
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(lm_compiled, "ENABLED", compiled)  # False: the PyTorch kernel
        batch = gf.fit_batch(model, **padded(x, y, valid, how), p0=p0)
        for i in range(K):
            single = gf.fit(model, x[valid[i]], y[i, valid[i]], p0=p0)
            assert_row_equals_fit(batch, i, single)


@pytest.mark.parametrize("compiled", [True, False])
@pytest.mark.parametrize("model", ["exponential", "gaussian", "sine", "logistic"])
def test_padding_does_not_move_the_builtin_guess(model: str, compiled: bool) -> None:
    """The user's report: one curve alone and as a padded row (shared grid, a prefix and
    dropouts); before the fix the guess saw the padded grid."""
    x, y, valid = ragged_batch(model, K=6, N=40, seed=11)
    valid[0, 25:] = False  # a short curve on the shared grid
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(lm_compiled, "ENABLED", compiled)
        batch = gf.fit_batch(model, x, np.where(valid, y, np.nan))
        for i in range(6):
            assert_row_equals_fit(batch, i, gf.fit(model, x[valid[i]], y[i, valid[i]]))


@pytest.mark.parametrize(("optimizer", "lr"), [("adam", 0.05), ("gd", 0.02)])
def test_first_order_rows_equal_fit_from_the_builtin_guess(optimizer: str, lr: float) -> None:
    x, y, valid = ragged_batch("gaussian", K=4, N=30, seed=5)
    options = {"optimizer": optimizer, "lr": lr, "epochs": 200}
    batch = gf.fit_batch("gaussian", x, np.where(valid, y, np.nan), **options)
    for i in range(4):
        single = gf.fit("gaussian", x[valid[i]], y[i, valid[i]], **options)
        want = np.array(list(single.params.values()))
        np.testing.assert_allclose(batch.params[i].numpy(), want, rtol=1e-9, atol=ATOL)
        assert int(batch.n_iter[i]) == single.n_iter


class Wave(nn.Module):
    """``amplitude * sin(frequency * x)``: from ones LM lands in another minimum."""

    def __init__(self) -> None:
        super().__init__()
        self.amplitude = nn.Parameter(torch.tensor(1.5, dtype=torch.float64))
        self.frequency = nn.Parameter(torch.tensor(4.1, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.amplitude * torch.sin(self.frequency * x)


def test_an_nn_module_starts_from_its_own_parameters() -> None:
    rng = np.random.default_rng(2)
    x = np.linspace(0, 3, 30)
    y = np.stack([a * np.sin(4 * x) for a in (1.0, 2.0, 1.5)]) + rng.normal(0, 0.02, (3, 30))
    y[1, 22:] = np.nan
    module = Wave()
    batch = gf.fit_batch(module, x, y)
    for i in range(3):
        keep = ~np.isnan(y[i])
        single = gf.fit(module, x[keep], y[i, keep])
        assert_row_equals_fit(batch, i, single)
        assert single.params["frequency"] == pytest.approx(4, abs=0.05)  # not the ones' minimum


@pytest.mark.parametrize(
    "options",
    [{"p0": None}, {"p0": [0.0, 0.0, 0.0]}, {"optimizer": "adam", "epochs": 50}],
    ids=["guess", "p0", "adam"],
)
@pytest.mark.parametrize("compiled", [True, False])
def test_too_few_points_rows_are_nan_with_no_iterations(options: dict, compiled: bool) -> None:
    x, y, valid = ragged_batch("quadratic", K=3, N=20, seed=4)
    valid[1] = False
    valid[1, [3, 9]] = True  # 2 points for 3 parameters
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(lm_compiled, "ENABLED", compiled)
        batch = gf.fit_batch("quadratic", x, np.where(valid, y, np.nan), **options)
        row = batch[1]
        assert row["status"] == "too_few_points" and row["n_iter"] == 0
        assert row["n_points"] == 2
        assert all(math.isnan(v) for v in row["params"].values())
        assert all(math.isnan(v) for v in row["stderr"].values())
        with pytest.raises(OptionError, match="cannot determine"):
            gf.fit("quadratic", x[valid[1]], y[1, valid[1]], **options)
        for i in (0, 2):  # the others as fit has them
            single = gf.fit("quadratic", x[valid[i]], y[i, valid[i]], **options)
            want = np.array(list(single.params.values()))
            np.testing.assert_allclose(batch.params[i].numpy(), want, rtol=RTOL, atol=ATOL)
