"""The shared-parameter solver's normal equations (``optim/block_lm.py``'s ``Blocks``),
computed by the compiled interpreter one curve at a time.

The PyTorch path evaluates a chunk's rows ``[k, F + 1, N]`` (Jacobian and residuals) as
tensors and multiplies them (``Blocks.of``): a dozen passes over memory per evaluation.
Here each group's valid points are gathered, its expression program runs on them
(``interpreter.run``), its rows are formed in a small buffer that stays in cache, and their
products go straight into the blocks: Aᵢ = J_LᵀJ_L, Bᵢ = J_LᵀJ_S, the group's share of
C = J_SᵀJ_S, g_L, g_S and Σ r². Same rows as the PyTorch path (derivatives through the same
bound transforms, divided by sigma, masked points left out), so the same blocks to rounding.

Expression models of one variable, plain least squares, float64 on the CPU: where
``dispatch.lm_kernel`` gives the compiled kernel (``shared_lm`` asks it).
"""

from __future__ import annotations

import math
from typing import Any

import numba
import numpy as np
import torch

from gradfit.optim.block_lm import BlockEvaluate, Blocks, ChunkMap
from gradfit.optim.compiled.bridge import _space_arrays
from gradfit.optim.compiled.interpreter import (
    JIT,
    NO_REFCOUNT,
    PER_CURVE,
    PER_POINT,
    SCALAR,
    encode,
    run,
)
from gradfit.optim.compiled.kernel import (
    _cholesky,
    _cholesky_solve,
    _divide,
    _output_row,
    _residual_row,
    _to_params,
)
from gradfit.optim.masks import all_valid
from gradfit.optim.problem import Problem

Tensor = torch.Tensor
Arrays = tuple[np.ndarray, ...]
# bound transforms, this file's own codes (Numba's cache is keyed on this file's text)
# the interpreter's evaluation rates, passed as data for the same reason
_RATES = (SCALAR, PER_CURVE, PER_POINT)


def block_evaluator(
    problem: Problem,
    mask: Tensor,
    local_pos: list[int],
    shared_pos: list[int],
    *,
    chunk: int,
    chunk_map: ChunkMap = map,
) -> BlockEvaluate:
    """The blocks of ``problem`` (``[K, N]`` data, an expression model) at a point.

    ``local_pos``/``shared_pos``: positions in the space's free parameters of the local and
    the shared ones (the block order); ``mask`` ``[K, N]`` marks the points that count (a
    group without any contributes zeros). Chunks of ``chunk`` groups go through
    ``chunk_map`` (a thread pool's map runs them side by side: the loop holds no GIL).
    """
    model = problem.model
    programs = model.programs
    assert programs is not None and isinstance(problem.x, Tensor), "check lm_kernel() first"
    (name,) = model.independent
    code = encode(programs[1], name, model.param_names)
    assert code is not None, "check lm_kernel() first"
    y = _array(problem.y)
    K, N = y.shape
    x = _array(problem.x).reshape(-1, N)
    sigma = problem.loss.sigma
    sigma_a = _array(sigma).reshape(-1, N) if sigma is not None else np.ones((0, N))
    data = (x, y, sigma_a, _mask_array(mask))
    space = _space_arrays(problem.space)  # the LM kernel's encoding of the bounds
    order = np.array([*local_pos, *shared_pos], dtype=np.int64)
    L, S = len(local_pos), len(shared_pos)
    parts = [(start, min(start + chunk, K)) for start in range(0, K, chunk)]

    def evaluate(theta_local: Tensor, theta_shared: Tensor) -> tuple[list[Tensor], Blocks]:
        local = np.ascontiguousarray(theta_local.detach().numpy(), dtype=np.float64)
        common = np.ascontiguousarray(theta_shared.detach().numpy(), dtype=np.float64)
        out = np.empty((K, L, L)), np.empty((K, L, S)), np.empty((K, L)), np.empty(K)
        # one [K, N] array (measured: as fast as a block per chunk, which would need a
        # concatenation of 40 MB at the end for 10^5 groups)
        residuals = np.empty((K, N))
        sums = np.empty((len(parts), S + 1, S + 2))  # per chunk: [C, g_S; cost², 0·Σ diag]

        def one(index: int) -> None:
            first, stop = parts[index]
            chunk_blocks(
                code.arrays, data, space, order, local, common, first, stop, out, residuals,
                sums[index], _RATES,
            )  # fmt: skip

        for _ in chunk_map(one, range(len(parts))):
            pass
        total = sums.sum(0)
        A, B, g_local, group_cost2 = (torch.from_numpy(a) for a in out)
        blocks = Blocks(
            A=A, B=B, C=torch.from_numpy(total[:S, :S].copy()), g_local=g_local,
            g_shared=torch.from_numpy(total[:S, S].copy()), group_cost2=group_cost2,
            cost2=float(total[S, 0] + total[S, 1]),
        )  # fmt: skip
        return [torch.from_numpy(residuals)], blocks

    return evaluate


def _mask_array(mask: Tensor) -> np.ndarray:
    """``[K, N]`` bool as the compiled loops take it: (0, N) where every point is valid
    (nothing to read), else a contiguous copy."""
    N = mask.shape[-1]
    if all_valid(mask):
        return np.ones((0, N), dtype=bool)
    return np.ascontiguousarray(mask.numpy()).reshape(-1, N)


def _array(t: Tensor) -> np.ndarray:
    return np.ascontiguousarray(t.detach().numpy(), dtype=np.float64)


@numba.njit(**JIT)
def chunk_blocks(
    code: Arrays, data: Arrays, space: Arrays, order: np.ndarray, theta_local: np.ndarray,
    theta_shared: np.ndarray, first: int, stop: int, out: Arrays, residuals: np.ndarray,
    sums: np.ndarray, rates: tuple[int, int, int],
) -> None:  # fmt: skip
    """Groups ``first``..``stop - 1``: their rows of ``out = (A, B, g_local, group_cost2)``,
    their masked residuals (rows of ``residuals`` ``[K, N]``), and, into ``sums``
    ``[S + 1, S + 2]``, their share of C (``[:S, :S]``),
    of g_S (``[:S, S]``), of Σ r² (``[S, 0]``) and 0·Σ diag(JᵀJ) (``[S, 1]``: NaN where a
    Jacobian is not finite).

    ``order`` lists the free parameters in block order (local, then shared); theta is in the
    space's transformed coordinates (``space = (fixed, free, kind, lo, hi)``).
    """
    N, F = data[1].shape[1], order.shape[0]
    n_steps = code[0].shape[0]
    # the working arrays, allocated here: the loop runs without reference counting
    regs = (np.empty(n_steps), np.empty((n_steps, N)))
    points = np.empty((3, N))  # xs, ys, sigma of one group
    where = np.empty(N, dtype=np.int64)
    vectors = np.empty((2, F))  # theta, chain
    params = np.empty(space[0].shape[0])
    rows = np.empty((F + 1, N))  # one group's [J; r] in block order
    # the chunk's sums, added up here and copied to ``sums`` once: the rows of ``sums`` of
    # chunks on other threads share its cache lines, and adding to them group by group made
    # two threads slower than one
    local_sums = np.zeros(sums.shape)
    work = (regs, points, where, vectors, params, rows)
    _blocks_of(code, data, space, order, theta_local, theta_shared, first, stop, out,
               residuals, local_sums, rates, work)  # fmt: skip
    sums[:] = local_sums


@numba.njit(**NO_REFCOUNT)
def _blocks_of(
    code: Arrays, data: Arrays, space: Arrays, order: np.ndarray, theta_local: np.ndarray,
    theta_shared: np.ndarray, first: int, stop: int, out: Arrays, residuals: np.ndarray,
    sums: np.ndarray, rates: tuple[int, int, int], work: tuple[Any, ...],
) -> None:  # fmt: skip
    """``chunk_blocks``' loop over groups, in the working arrays ``work``."""
    _, curve_rate, point_rate = rates  # (scalar, per curve, per point)
    x, y, sigma, mask = data
    fixed, free, kind, lo, hi = space
    A, B, g_local, group_cost2 = out
    regs, points, where, vectors, params, rows = work
    xs, ys, ss = points[0], points[1], points[2]
    theta, chain = vectors[0], vectors[1]
    N = y.shape[1]
    L = theta_local.shape[1]
    F = order.shape[0]
    S = F - L
    outputs = code[5]
    has_sigma = sigma.shape[0] > 0
    cost2 = diagonal = 0.0
    for k in range(first, stop):
        # the group's valid points, in order
        xk = x[k if x.shape[0] > 1 else 0]
        n = 0
        for i in range(N):
            if mask.shape[0] == 0 or mask[k, i]:
                xs[n], ys[n], where[n] = xk[i], y[k, i], i
                ss[n] = sigma[k if sigma.shape[0] > 1 else 0, i] if has_sigma else 1.0
                n += 1
        for j in range(L):
            theta[order[j]] = theta_local[k, j]
        for j in range(S):
            theta[order[L + j]] = theta_shared[j]
        _to_params(theta, (fixed, free, kind, lo, hi), params, chain)
        run(code, curve_rate, xs, n, params, regs)
        run(code, point_rate, xs, n, params, regs)
        # rows: ∂f/∂p times the transform's derivative, then f - y; all divided by sigma
        for j in range(F):
            f = order[j]
            _output_row(code, regs, outputs[1 + free[f]], chain[f], n, rows[j])
            if has_sigma:
                _divide(rows[j], ss, n)
        _residual_row(code, regs, (xs, ys, ss, n, has_sigma), rows[F])
        # the products, straight into the blocks
        r = rows[F]
        for a in range(F):
            for b in range(a, F):
                m = _dot(rows[a], rows[b], n)
                if b < L:
                    A[k, a, b] = A[k, b, a] = m
                elif a < L:
                    B[k, a, b - L] = m
                else:
                    sums[a - L, b - L] += m
                    if a != b:
                        sums[b - L, a - L] += m
                if a == b:
                    diagonal += m
            g = _dot(rows[a], r, n)
            if a < L:
                g_local[k, a] = g
            else:
                sums[a - L, S] += g
        c2 = _dot(r, r, n)
        group_cost2[k] = c2
        cost2 += c2
        for i in range(N):
            residuals[k, i] = 0.0
        for i in range(n):
            residuals[k, where[i]] = r[i]
    sums[S, 0] = cost2
    sums[S, 1] = 0.0 * (diagonal + cost2)  # inf * 0 and NaN * 0 are NaN


@numba.njit(**NO_REFCOUNT)
def _dot(u: np.ndarray, w: np.ndarray, n: int) -> float:
    s = 0.0
    for i in range(n):
        s += u[i] * w[i]
    return s


def solve_damped(
    blocks: Blocks, damping_local: Tensor, damping_shared: Tensor, rhs_local: Tensor,
    rhs_shared: Tensor, *, chunk: int | None = None, chunk_map: ChunkMap = map,
) -> tuple[Tensor, Tensor, bool]:  # fmt: skip
    """``block_lm.solve_damped`` with its per-group part compiled: each group's damped
    L×L block factored and solved in one loop (PyTorch's batched factorisations of 10⁵
    tiny matrices cost ~1 µs each), ``chunk`` groups at a time through ``chunk_map``;
    then the S×S reduced system in PyTorch."""
    A, B = _c(blocks.A), _c(blocks.B)
    K, L, S = B.shape
    damping, rhs = _c(damping_local), _c(rhs_local)
    y, X = np.empty((K, L)), np.empty((K, L, S))
    step = chunk or max(K, 1)
    parts = [(start, min(start + step, K)) for start in range(0, K, step)]
    sums = np.zeros((len(parts), S, S + 1))  # per chunk: Σ BᵢᵀAᵢ⁻¹Bᵢ, Σ BᵢᵀAᵢ⁻¹rhsᵢ
    factored = np.zeros(len(parts), dtype=bool)

    def one(index: int) -> None:  # writes its results (only waited for, not collected)
        first, stop = parts[index]
        factored[index] = damped_groups(A, B, damping, rhs, first, stop, y, X, sums[index])

    for _ in chunk_map(one, range(len(parts))):
        pass
    solved = bool(factored.all())
    step_local = -torch.from_numpy(y)
    if S:
        Xt, sums_t = torch.from_numpy(X), torch.from_numpy(sums.sum(0))
        reduced = blocks.C + torch.diag(damping_shared) - sums_t[:, :S]
        chol_s, info_s = torch.linalg.cholesky_ex(reduced)
        solved &= int(info_s) == 0
        reduced_rhs = rhs_shared - sums_t[:, S]
        step_shared = -torch.cholesky_solve(reduced_rhs.unsqueeze(-1), chol_s).squeeze(-1)
        step_local -= torch.matmul(Xt, step_shared)
    else:
        step_shared = rhs_shared.new_zeros(0)
    if not solved:  # as block_lm.solve_damped: NaN fails every later test
        step_local, step_shared = step_local * math.nan, step_shared * math.nan
    return step_local, step_shared, solved


def _c(t: Tensor) -> np.ndarray:
    return np.ascontiguousarray(t.detach().numpy(), dtype=np.float64)


@numba.njit(**JIT)
def damped_groups(
    A: np.ndarray, B: np.ndarray, damping: np.ndarray, rhs: np.ndarray, first: int, stop: int,
    y: np.ndarray, X: np.ndarray, sums: np.ndarray,
) -> bool:  # fmt: skip
    """For groups ``first``..``stop - 1``: yᵢ = (Aᵢ + diag dᵢ)⁻¹ rhsᵢ and
    Xᵢ = (Aᵢ + diag dᵢ)⁻¹ Bᵢ, added up into ``sums[:, :S]`` (Σ BᵢᵀXᵢ) and ``sums[:, S]``
    (Σ Bᵢᵀyᵢ). False if a block is not positive definite (the step is then void)."""
    L = B.shape[1]
    matrices, vectors = np.empty((2, L, L)), np.empty((2, L))
    local_sums = np.zeros(sums.shape)  # added up here, as in chunk_blocks (cache lines)
    solved = _damped(A, B, damping, rhs, first, stop, y, X, local_sums, matrices, vectors)
    sums += local_sums
    return solved


@numba.njit(**NO_REFCOUNT)
def _damped(
    A: np.ndarray, B: np.ndarray, damping: np.ndarray, rhs: np.ndarray, first: int, stop: int,
    y: np.ndarray, X: np.ndarray, sums: np.ndarray, matrices: np.ndarray, vectors: np.ndarray,
) -> bool:  # fmt: skip
    """``damped_groups``' loop, in the working arrays ``matrices`` and ``vectors``."""
    L, S = B.shape[1], B.shape[2]
    M, factor = matrices[0], matrices[1]
    column, solution = vectors[0], vectors[1]
    solved = True
    for k in range(first, stop):
        for a in range(L):
            for b in range(L):
                M[a, b] = A[k, a, b]
            M[a, a] += damping[k, a]
        if not _cholesky(M, factor):
            solved = False
            continue
        _cholesky_solve(factor, rhs[k], y[k])
        for s in range(S):
            for a in range(L):
                column[a] = B[k, a, s]
            _cholesky_solve(factor, column, solution)
            for a in range(L):
                X[k, a, s] = solution[a]
        for s in range(S):
            for t in range(S):
                acc = 0.0
                for a in range(L):
                    acc += B[k, a, s] * X[k, a, t]
                sums[s, t] += acc
            acc = 0.0
            for a in range(L):
                acc += B[k, a, s] * y[k, a]
            sums[s, S] += acc
    return solved


def sums_of_squares(
    y: Tensor, mask: Tensor, residuals: Tensor, sigma: Tensor | None
) -> tuple[Tensor, Tensor]:
    """Each group's Σ (y - ȳ)² and Σ (y - f)² over its valid points (``[K, N]`` data, the
    residuals divided by sigma): R²'s sums in one pass instead of a dozen."""
    K, N = y.shape
    ss_tot, ss_res = np.empty(K), np.empty(K)
    sigma_a = np.ones((0, N)) if sigma is None else _c(sigma).reshape(-1, N)
    group_sums(_c(y), _mask_array(mask), _c(residuals), sigma_a, ss_tot, ss_res)
    return torch.from_numpy(ss_tot), torch.from_numpy(ss_res)


@numba.njit(**NO_REFCOUNT)
def group_sums(
    y: np.ndarray, mask: np.ndarray, residuals: np.ndarray, sigma: np.ndarray,
    ss_tot: np.ndarray, ss_res: np.ndarray,
) -> None:  # fmt: skip
    """``sums_of_squares``' loop (``mask`` (0, N): every point valid; ``sigma`` (0, N): none)."""
    K, N = y.shape
    for k in range(K):
        n, total = 0, 0.0
        for i in range(N):
            if mask.shape[0] == 0 or mask[k, i]:
                total += y[k, i]
                n += 1
        mean = total / max(n, 1)
        dev2 = res2 = 0.0
        for i in range(N):
            if mask.shape[0] == 0 or mask[k, i]:
                d = y[k, i] - mean
                e = residuals[k, i]
                if sigma.shape[0] > 0:
                    e *= sigma[k if sigma.shape[0] > 1 else 0, i]
                dev2 += d * d
                res2 += e * e
        ss_tot[k], ss_res[k] = dev2, res2
