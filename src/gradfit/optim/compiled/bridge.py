"""The Levenberg–Marquardt kernel of ``lm.py``, compiled with Numba, one curve at a time.

The PyTorch kernel runs ~35 passes over ``[K, N]`` tensors per iteration and ~130 small
operations at a few microseconds each: memory traffic bounds it for batches, per-operation
overhead for single fits. This kernel (``kernel``) runs the same algorithm (same damping,
geodesic acceleration, acceptance and stopping rules, same constants) for one curve after
another, with the curve's points, Jacobian rows and registers in cache. It serves expression
models (their program is data it can interpret, see ``interpreter``) with plain least
squares or a named robust loss, in float64 on the CPU; everything else takes the PyTorch
kernel. Both give each curve the same answer to rounding (tests compare them curve by curve).

Two things differ from the PyTorch kernel, neither changing the arithmetic of a curve:
masked points are dropped before the fit instead of zeroed in every pass, and a step whose
damped system cannot be factorised is rejected without evaluating its (NaN) trial point.
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass, fields

import numpy as np
import torch

from gradfit.model.losses import LOSSES
from gradfit.model.models import Model
from gradfit.model.parameters import ParameterSpace
from gradfit.optim import lm
from gradfit.optim.compiled import kernel
from gradfit.optim.compiled.interpreter import Code, encode
from gradfit.optim.compiled.kernel import BOTH, LOWER, NO_BOUND, PLAIN, UPPER
from gradfit.optim.problem import Problem
from gradfit.results import stats

#: losses.py's robust losses the kernel computes, by their ``rho`` (what ``supports`` is
#: given) -> the kernel's code: built once, from ``LOSSES``, by name
_ROBUST = {
    loss.rho: kernel.ROBUST_LOSSES[name]
    for name, loss in LOSSES.items()
    if name in kernel.ROBUST_LOSSES
}
#: robust losses of losses.py left to the PyTorch kernel on purpose: a test checks that each
#: robust loss is in ``kernel.ROBUST_LOSSES`` or named here
NOT_COMPILED_LOSSES: frozenset[str] = frozenset()
# GRADFIT_COMPILED=0 sends every fit to the PyTorch kernel (to compare, or to rule this out)
ENABLED = os.environ.get("GRADFIT_COMPILED", "1") != "0"


def _codes(model: Model) -> tuple[Code, Code] | None:
    """Value and value-with-derivatives programs of an expression model, as arrays."""
    programs = model.programs
    if programs is None or len(model.independent) != 1:
        return None
    (name,) = model.independent
    value, full = (encode(p, name, model.param_names) for p in programs)
    return None if value is None or full is None else (value, full)


def supports(problem: Problem, robust: object, theta: torch.Tensor) -> bool:
    """Whether this kernel can fit ``problem`` with ``robust`` (None: plain least squares;
    else a loss's ``rho``); else use ``lm.levenberg_marquardt``."""
    return (
        ENABLED
        and (robust is None or robust in _ROBUST)
        and theta.dtype == torch.float64
        and theta.device.type == "cpu"
        and isinstance(problem.x, torch.Tensor)
        and problem.y.device.type == "cpu"
        and _codes(problem.model) is not None
    )


@dataclass
class CompiledFit:
    """Per-curve outcome of :func:`fit_curves` (NumPy arrays), with statistics at the solution."""

    theta: np.ndarray  # (K, F) as lm.LMResult
    cost: np.ndarray  # (K,)
    n_iter: np.ndarray  # (K,)
    status: np.ndarray  # (K,) LMStatus codes
    n_eval: int
    variance: np.ndarray  # (K, F) diagonal of (JᵀJ)⁻¹ in the model's parameters; NaN: singular
    chi2: np.ndarray  # (K,) Σ r² of the weighted residuals
    r2: np.ndarray  # (K,) 1 - SS_res / SS_tot (NaN for a constant curve)
    n_points: np.ndarray  # (K,) valid points
    # (K, F + 1, N) if asked for: [J; r] at theta, divided by sigma, J with respect to the
    # model's own free parameters (with bounds, not the kernel's transformed ones)
    rows: np.ndarray | None
    history: np.ndarray | None  # (K, max_iter) cost after each iteration, if asked for
    columns: Columns  # the arrays above (theta ... n_points) belong to these


@dataclass
class Columns:
    """The per-curve arrays that :func:`fit_curves` and :func:`batch_outputs` fill, made once
    for a whole batch (:meth:`empty`): each chunk fills its rows in place (:meth:`rows`), so
    that the batch's result needs no concatenation at the end (~5% of a straight line's
    fit, with every core idle)."""

    theta: np.ndarray  # (K, F); the same array as params where the space is the identity
    params: np.ndarray  # (K, P)
    cost: np.ndarray
    n_iter: np.ndarray
    status: np.ndarray
    variance: np.ndarray  # (K, F)
    chi2: np.ndarray
    r2: np.ndarray
    n_points: np.ndarray
    reduced_chi2: np.ndarray
    stderr: np.ndarray  # (K, P)
    loss: np.ndarray

    @classmethod
    def empty(cls, K: int, space: ParameterSpace) -> Columns:
        F, P = len(space.free), len(space.names)
        params = np.empty((K, P))
        theta = params if space.is_identity else np.empty((K, F))
        floats = [np.empty(K) for _ in range(5)]  # cost, chi2, r2, reduced χ², loss
        ints = [np.empty(K, dtype=np.int64) for _ in range(3)]  # n_iter, status, n_points
        return cls(
            theta, params, floats[0], ints[0], ints[1], np.empty((K, F)), floats[1], floats[2],
            ints[2], floats[3], np.empty((K, P)), floats[4],
        )  # fmt: skip

    def rows(self, start: int, stop: int) -> Columns:
        """Views of rows ``start:stop`` (contiguous: the kernel takes them as they are)."""
        return Columns(*(getattr(self, f.name)[start:stop] for f in fields(self)))


def fit_curves(
    problem: Problem,
    theta0: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    ftol: float = lm.DEFAULT_FTOL,
    xtol: float = lm.DEFAULT_XTOL,
    gtol: float = lm.DEFAULT_GTOL,
    max_iter: int = lm.DEFAULT_MAX_ITER,
    geodesic: bool = True,
    linear: bool = False,
    rows: bool = False,
    history: bool = False,
    out: Columns | None = None,
) -> CompiledFit:
    """``lm.levenberg_marquardt`` for ``problem``'s K curves (see :func:`supports`).

    ``mask`` (K, N) marks valid points. With ``history``, the cost after each iteration
    (NaN once a curve stopped). ``linear`` as in ``lm.levenberg_marquardt``. ``out``: the
    K rows of :class:`Columns` to fill (else new arrays).
    """
    codes = _codes(problem.model)
    assert codes is not None and isinstance(problem.x, torch.Tensor), "check supports() first"
    value, full = codes
    N = problem.y.shape[-1]
    y = _array(problem.y).reshape(-1, N)
    K = y.shape[0]
    x = _array(problem.x).reshape(-1, N)
    sigma = problem.loss.sigma
    sigma_a = _array(sigma).reshape(-1, N) if sigma is not None else np.ones((0, N))
    mask_a = np.ones((0, N), dtype=bool)  # (0, N): every point valid
    if mask is not None:  # contiguous: a strided array would compile another specialisation
        mask_a = np.ascontiguousarray(mask.numpy()).reshape(-1, N)
    space = _space_arrays(problem.space)
    tols = _tolerances(ftol, xtol, gtol, linear)
    F = len(space[1])
    # the start copied into C-ordered rows: one in another layout (some torch operations
    # leave one transposed) would compile the kernel a second time, ~20 s
    columns = out if out is not None else Columns.empty(K, problem.space)
    theta = columns.theta
    theta[:] = theta0.detach().reshape(K, F).numpy()
    cost, chi2, r2, variance = columns.cost, columns.chi2, columns.r2, columns.variance
    n_iter, status, n_points = columns.n_iter, columns.status, columns.n_points
    rows_a = np.zeros((K if rows else 0, F + 1, N))
    costs = np.full((K, max_iter) if history else (0, 0), math.nan)
    loss = problem.loss
    robust = (_ROBUST.get(loss.rho, PLAIN), float(loss.f_scale))
    n_eval = kernel.fit_curves(
        value.arrays, full.arrays, (x, y, sigma_a, mask_a), space, robust, tols, max_iter,
        geodesic and not linear,
        (theta, cost, n_iter, status, variance, chi2, r2, n_points), rows_a, costs,
    )  # fmt: skip
    return CompiledFit(
        theta, cost, n_iter, status, n_eval, variance, chi2, r2, n_points,
        rows_a if rows else None, costs if history else None, columns,
    )  # fmt: skip


def batch_outputs(
    fitted: CompiledFit, free: list[int], absolute_sigma: bool, per_point: bool, out: Columns
) -> None:
    """χ²ᵣ, stderr and the loss of a chunk's compiled fit into ``out`` (see
    ``kernel.batch_outputs``)."""
    kernel.batch_outputs(
        fitted.n_points, fitted.chi2, fitted.variance, fitted.cost,
        np.asarray(free, dtype=np.int64), absolute_sigma, per_point,
        (out.reduced_chi2, out.stderr, out.loss),
    )  # fmt: skip


def _space_arrays(space: ParameterSpace) -> tuple[np.ndarray, ...]:
    return _bound_arrays(space.fixed, space.lower, space.upper)


@functools.lru_cache(maxsize=64)
def _bound_arrays(
    fixed_values: tuple[float | None, ...],
    lower: tuple[float | None, ...],
    upper: tuple[float | None, ...],
) -> tuple[np.ndarray, ...]:
    """Fixed values (NaN: free), free indices, transform kinds and bounds, for the kernel."""
    fixed = np.array([math.nan if v is None else v for v in fixed_values], dtype=np.float64)
    free = np.array([i for i, v in enumerate(fixed_values) if v is None], dtype=np.int64)
    kind = np.array([_kind(lower[i], upper[i]) for i in free], dtype=np.int64)
    lo = np.array([lower[i] or 0.0 for i in free], dtype=np.float64)
    hi = np.array([upper[i] or 0.0 for i in free], dtype=np.float64)
    return fixed, free, kind, lo, hi


@functools.lru_cache(maxsize=64)
def _tolerances(ftol: float, xtol: float, gtol: float, linear: bool = False) -> np.ndarray:
    """As ``lm.levenberg_marquardt``: raised to eps; the actual reduction not below noise;
    then ``lm.py``'s constants (``kernel.SETTINGS`` names them), the starting damping at its
    floor for a ``linear`` model.

    The constants travel as data: Numba's disk cache is keyed on ``kernel.py``'s text alone,
    so constants read from ``lm.py`` at compile time would go stale when only ``lm.py`` changes.
    """
    eps = float(np.finfo(np.float64).eps)
    noise = lm._COST_NOISE * eps
    tols = [max(ftol, eps), max(ftol, noise), noise, max(xtol, eps), max(gtol, eps)]
    settings = [lm_constant(name) for name in kernel.SETTINGS[5:]]
    if linear:
        settings[0] = lm_constant("lambda_min")  # SETTINGS[5] is lambda0
    return np.array(tols + settings)


def lm_constant(name: str) -> float:
    """One of ``lm.py``'s constants by the name ``kernel.SETTINGS`` gives it."""
    if name == "max_variance_inflation":
        return stats.max_variance_inflation(torch.float64)
    if name in ("lambda_stationary", "stationary"):
        damping, tol = lm.stationary_tolerances(float(np.finfo(np.float64).eps))
        return damping if name == "lambda_stationary" else tol
    return float(getattr(lm, "_" + name.upper()))


def _array(t: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(t.detach().numpy(), dtype=np.float64)


def _kind(lower: float | None, upper: float | None) -> int:
    if lower is not None and upper is not None:
        return BOTH
    if lower is not None:
        return LOWER
    return UPPER if upper is not None else NO_BOUND
