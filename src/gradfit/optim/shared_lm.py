"""One least-squares problem over K groups with some parameters shared: the block solver
(``block_lm.py``) driven from a model, padded data and a ``ParameterSpace``.

``fit_shared`` (``batch/shared.py``) and ``fit_global`` (``fitting/global_fit.py``) both fit
through ``solve_shared``; it lives here, below both, so that neither imports the other.

Where the compiled LM kernel would fit the model (``dispatch.lm_kernel``: an expression of
one variable, float64, CPU), the blocks come from ``compiled/blocks.py`` (each group's rows
formed and multiplied in cache, its damped blocks factored in the same loop); otherwise from
PyTorch's rows ``[k, F + 1, N]`` of each chunk. Both give the same answer to rounding.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch

from gradfit.errors import DataError, OptionError
from gradfit.model.losses import Loss
from gradfit.model.models import Model
from gradfit.model.parameters import ParameterSpace
from gradfit.optim.block_lm import (
    DEFAULT_CHUNK,
    BlockCovariance,
    BlockEvaluate,
    BlockLMResult,
    ChunkMap,
    block_covariance,
    block_levenberg_marquardt,
    evaluate_blocks,
)
from gradfit.optim.dispatch import lm_kernel
from gradfit.optim.least_squares import residual_functions
from gradfit.optim.lm import DEFAULT_FTOL, LMStatus, autodiff_jacobian, describe, stack_jacobian
from gradfit.optim.masks import count_valid
from gradfit.optim.problem import Problem

Tensor = torch.Tensor
#: the losses the block solver minimises (plain least squares)
PLAIN_LOSSES = ("mse", "sse", "chi2")


@dataclass
class SharedSolution:
    """What ``solve_shared`` found, in the model's own parameters."""

    params: Tensor  # [K, P]: each group's parameters (shared columns equal); NaN if not fitted
    fitted: Tensor  # [K] bool: the group took part (enough valid points)
    solver: BlockLMResult
    covariance: BlockCovariance  # unscaled (JᵀJ)⁻¹ blocks, in the model's own parameters
    local: list[int]  # model-parameter indices of the free local parameters (block order)
    shared: list[int]  # of the free shared ones
    n_points: int  # valid points of the fitted groups
    residuals: Tensor  # [K, N] masked residuals (divided by sigma) at the solution
    n_valid: Tensor  # [K] valid points of each group (fitted or not)
    compiled: bool = False  # the compiled evaluator computed the blocks

    @functools.cached_property  # asked by every statistic: one pass over fitted
    def n_free(self) -> int:
        return int(self.fitted.sum()) * len(self.local) + len(self.shared)

    @property
    def chi2(self) -> float:
        return 2 * self.solver.cost

    @property
    def dof(self) -> int:
        return self.n_points - self.n_free

    @property
    def reduced_chi2(self) -> float:
        return self.chi2 / self.dof if self.dof > 0 else math.nan

    def sums_of_squares(
        self, y: Tensor, mask: Tensor, sigma: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        """Each group's Σ (y - ȳ)² and Σ (y - f)² over its valid points (``mask``), for R²
        (a group that took no part gets numbers to blank)."""
        if self.compiled:
            from gradfit.optim.compiled.blocks import sums_of_squares

            return sums_of_squares(y, mask, self.residuals, sigma)
        n = mask.sum(-1)
        mean = torch.where(mask, y, 0.0).sum(-1) / n.clamp_min(1)
        ss_tot = torch.where(mask, y - mean.unsqueeze(-1), 0.0).square().sum(-1)
        r = self.residuals  # zero at masked points, divided by sigma
        ss_res = 2 * self.solver.group_cost if sigma is None else (r * sigma).square().sum(-1)
        return ss_tot, ss_res

    @property
    def status(self) -> str:
        words = {LMStatus.MAX_ITER: "max_iter", LMStatus.NON_FINITE: "non_finite"}
        words[LMStatus.SINGULAR] = "singular"  # else FTOL, XTOL or GTOL: status.STATUSES' word
        return words.get(LMStatus(self.solver.status), "converged")

    def message(self, tol: float | None) -> str:
        if self.solver.status == LMStatus.MAX_ITER:
            return f"stopped after the maximum of {self.solver.n_iter} iterations"
        text = describe(self.solver.status, ftol=DEFAULT_FTOL if tol is None else tol)
        return text.split(": ", 1)[-1]


def solve_shared(
    model: Model,
    data: Mapping[str, Tensor | None],
    start: Tensor,
    shared: frozenset[str],
    space: ParameterSpace,
    *,
    max_iter: int | None = None,
    tol: float | None = None,
    chunk: int | None = None,
    chunk_map: ChunkMap = map,
) -> SharedSolution:
    """The block LM on padded ``data`` (``x``, ``y``, ``sigma``, ``mask``, ``[K, N]``) from
    ``start`` ``[K, P]`` (the shared columns are taken from the first fitted group).

    A group with fewer valid points than free local parameters (or none) takes no part: its
    local parameters would be undetermined, and the whole problem singular.
    """
    x, y, sigma, mask = data["x"], data["y"], data["sigma"], data["mask"]
    assert x is not None and y is not None and mask is not None
    names, free = space.names, space.free
    local_pos = [j for j, i in enumerate(free) if names[i] not in shared]
    shared_pos = [j for j, i in enumerate(free) if names[i] in shared]
    n_valid = count_valid(mask)
    fitted = (n_valid >= len(local_pos)) & (n_valid > 0)
    fit_mask = mask if bool(fitted.all()) else mask & fitted.unsqueeze(-1)
    n_points = int(torch.where(fitted, n_valid, 0).sum())
    n_free = int(fitted.sum()) * len(local_pos) + len(shared_pos)
    if not bool(fitted.any()):
        raise DataError(f"no group has at least {max(len(local_pos), 1)} valid points to fit")
    if n_points < n_free:
        raise OptionError(
            f"{n_points} data points cannot determine {n_free} free parameters; fix some or "
            "give more points"
        )
    theta0 = space.to_theta(start)
    # a group left out still needs finite values: theta 0 is inside every bound's transform
    theta0 = torch.where(fitted.unsqueeze(-1), theta0, 0.0)
    first = int(fitted.nonzero()[0, 0])
    problem = Problem(model, x, y, Loss("mse", None, sigma=sigma), space)
    order = torch.tensor([*local_pos, *shared_pos, len(free)], device=y.device)
    chunk = chunk or DEFAULT_CHUNK
    options: dict[str, Any] = {} if tol is None else {"ftol": tol}
    if max_iter is not None:
        options["max_iter"] = max_iter
    # the compiled evaluator where the compiled kernel would fit this model, else torch's rows
    compiled = _compiled_evaluator(
        problem, theta0, fit_mask, local_pos, shared_pos, chunk, chunk_map
    )
    if compiled is not None:
        from gradfit.optim.compiled.blocks import solve_damped

        # its per-group factorisations compiled too, chunks side by side as the evaluations
        options["solve"] = functools.partial(solve_damped, chunk=chunk, chunk_map=chunk_map)
    rows_of = _rows_function(problem, chunk, local_pos, shared_pos) if compiled is None else None
    solved = block_levenberg_marquardt(
        rows_of, theta0[:, local_pos], theta0[first, shared_pos], mask=fit_mask, chunk=chunk,
        chunk_map=chunk_map, order=order, evaluate=compiled, **options,
    )  # fmt: skip
    theta = theta0.clone()
    theta[:, local_pos] = solved.theta_local
    theta[:, shared_pos] = solved.theta_shared
    params = space.to_params(theta).detach()
    blocks = solved.blocks
    if not space.is_identity:  # the covariance is in the model's parameters, not theta's
        none = (None,) * len(names)
        unbounded = ParameterSpace(names, none, none, space.fixed)
        plain = Problem(model, x, y, problem.loss, unbounded)
        free_params = params[:, free]
        at = (free_params[:, local_pos], free_params[first, shared_pos])
        plain_compiled = _compiled_evaluator(
            plain, theta0, fit_mask, local_pos, shared_pos, chunk, chunk_map
        )
        with torch.no_grad():
            if plain_compiled is not None:
                _, blocks = plain_compiled(*at)
            else:
                _, blocks = evaluate_blocks(
                    _rows_function(plain, chunk, local_pos, shared_pos), *at, mask=fit_mask,
                    chunk=chunk, chunk_map=chunk_map, order=order,
                )  # fmt: skip
    params = torch.where(fitted.unsqueeze(-1), params, math.nan)
    local = [free[j] for j in local_pos]
    shared_idx = [free[j] for j in shared_pos]
    return SharedSolution(
        params, fitted, solved, block_covariance(blocks), local, shared_idx, n_points,
        solved.residuals, n_valid, compiled=compiled is not None,
    )  # fmt: skip


def _compiled_evaluator(
    problem: Problem,
    theta: Tensor,
    mask: Tensor,
    local_pos: list[int],
    shared_pos: list[int],
    chunk: int,
    chunk_map: ChunkMap,
) -> BlockEvaluate | None:
    """The blocks computed by the compiled interpreter (``compiled/blocks.py``) where the
    compiled LM kernel would fit ``problem`` (``dispatch.lm_kernel``: an expression model,
    float64, CPU, ``GRADFIT_COMPILED`` not 0), else None: the PyTorch rows."""
    if lm_kernel(problem, None, theta, per_iteration=False) is None:
        return None
    from gradfit.optim.compiled.blocks import block_evaluator  # imports Numba

    return block_evaluator(problem, mask, local_pos, shared_pos, chunk=chunk, chunk_map=chunk_map)


def _rows_function(
    problem: Problem, chunk: int, local_pos: list[int], shared_pos: list[int]
) -> Callable[[Tensor, Tensor, slice], Tensor]:
    """The rows of a chunk of groups, ``[k, F + 1, N]`` in the space's free order (the
    solver permutes its small products into the block layout), from the batched residual
    functions of that chunk alone (made once per chunk)."""
    K, F = problem.y.shape[0], len(local_pos) + len(shared_pos)
    functions = {}
    for start in range(0, K, chunk):
        part = slice(start, min(start + chunk, K))
        functions[start] = _chunk_rows(_chunk_of(problem, part))

    def rows_of(theta_local: Tensor, theta_shared: Tensor, part: slice) -> Tensor:
        theta = theta_local.new_empty(theta_local.shape[0], F)
        theta[:, local_pos] = theta_local
        theta[:, shared_pos] = theta_shared
        return functions[part.start](theta)

    return rows_of


def _chunk_rows(problem: Problem) -> Callable[[Tensor], Tensor]:
    """``theta [k, F] -> rows [k, F + 1, N]`` of one chunk, batched in PyTorch (symbolic
    derivatives for expression models, else autodiff): where ``compiled/blocks.py`` does
    not apply (another device or dtype, a model that is not an expression, GRADFIT_COMPILED=0)."""
    residuals, stacked = residual_functions(problem)
    return stacked or stack_jacobian(autodiff_jacobian(residuals))


def _chunk_of(problem: Problem, part: slice) -> Problem:
    """The groups ``part`` of a batched problem (a shared ``[N]`` x or sigma as it is)."""

    def rows(value: Tensor | None) -> Tensor | None:
        return value[part] if value is not None and value.dim() == 2 else value

    assert isinstance(problem.x, Tensor), "batches have one independent variable"
    x = rows(problem.x)
    assert x is not None
    loss = replace(problem.loss, sigma=rows(problem.loss.sigma))
    return replace(problem, x=x, y=problem.y[part], loss=loss)
