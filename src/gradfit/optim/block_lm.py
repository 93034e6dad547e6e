"""Levenberg–Marquardt for K groups that share a few parameters: one problem, block normal
equations solved by the Schur complement.

Group i has local parameters θᵢ (``[K, L]``) and all groups share θ_S (``[S]``); the residuals
of group i depend on θᵢ and θ_S alone, so JᵀJ is block-arrowhead: per-group blocks
Aᵢ = J_iLᵀJ_iL (``[K, L, L]``), couplings Bᵢ = J_iLᵀJ_iS (``[K, L, S]``) and one shared block
C = Σ J_iSᵀJ_iS (``[S, S]``). A damped step needs one batched L×L Cholesky (Aᵢ + λDᵢ) and one
S×S solve of the reduced system C + λD_S − Σ BᵢᵀAᵢ⁻¹Bᵢ: the work grows with K as K independent
fits do, and no (K·L)×(K·L) matrix is formed. The blocks come from each chunk's rows
``[k, L + S + 1, N]`` (``evaluate_blocks``), or from an evaluator that forms them without
the rows (``evaluate=``: ``compiled/blocks.py`` for expression models on the CPU, which
brings its own per-group factorisations, ``solve=``).

It is one problem: one damping λ, steps accepted or rejected on the total cost, one status.
The rules are those of ``lm.py`` (MINPACK's Marquardt scale with bounded memory, Nielsen's
damping update, the ftol / xtol / gtol tests, costs below the rounding noise judged by the
model), without geodesic acceleration; "converged" is said only at a stationary point (the
nearly undamped step predicts no real reduction, ``lm.stationary_tolerances``), or where the
fit is exact.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch

from gradfit.optim.lm import (
    DEFAULT_FTOL,
    DEFAULT_GTOL,
    DEFAULT_MAX_ITER,
    DEFAULT_XTOL,
    LMStatus,
    stationary_tolerances,
)

Tensor = torch.Tensor
#: (θ_L ``[K, L]``, θ_S ``[S]``) -> rows ``[K, L + S + 1, N]``: ∂r/∂θ_L, ∂r/∂θ_S, then r;
#: with ``chunk``, (θ_L of the groups in ``part``, θ_S, ``part``: a slice) -> their rows
BlockRows = Callable[..., Tensor]
ChunkMap = Callable[..., Iterable[Any]]  # map(function, chunks), in order
#: (θ_L ``[K, L]``, θ_S ``[S]``) -> (the masked residuals ``[k, N]`` of each chunk, the
#: blocks): one evaluation of the whole problem (``compiled/blocks.py``'s, say)
BlockEvaluate = Callable[[Tensor, Tensor], tuple[list[Tensor], "Blocks"]]
#: (blocks, damping_local, damping_shared, rhs_local, rhs_shared) -> (δ_L, δ_S, solved), as
#: :func:`solve_damped`
DampedSolve = Callable[..., tuple[Tensor, Tensor, bool]]
# Groups per evaluation when the caller does not say. Measured here (10^5 Gaussians, N = 50,
# noisy shared machine): 512 groups per chunk took 5.4 s, 1024 4.4 s, 2048 to 8192 3.4-3.6 s.
DEFAULT_CHUNK = 2048

# The constants of lm.py, for the same reasons (see there).
_LAMBDA0 = 1e-6
_LAMBDA_MIN = 1e-16
_LAMBDA_MAX = 1e32
_ACCEPT = 1e-4
_SCALE_STALE = 1e8
_COST_NOISE = 1024


@dataclass
class Blocks:
    """The normal equations at one point, in blocks."""

    A: Tensor  # [K, L, L] per-group local blocks
    B: Tensor  # [K, L, S] local–shared couplings
    C: Tensor  # [S, S] shared block, summed over groups
    g_local: Tensor  # [K, L] gradient Jᵀr of the local parameters
    g_shared: Tensor  # [S] of the shared ones, summed over groups
    group_cost2: Tensor  # [K] Σ r² of each group
    cost2: float  # Σ r² over every group (twice the cost); NaN if J is not finite

    @classmethod
    def of(cls, rows: Tensor, n_local: int, order: Tensor | None = None) -> Blocks:
        """The blocks of masked rows ``[K, L + S + 1, N]`` (one batched product), the rows
        taken in ``order`` if given."""
        m = torch.bmm(rows, rows.mT)  # [K, L + S + 1, L + S + 1]
        if order is not None:
            m = m[:, order.unsqueeze(-1), order]
        L = n_local
        group_cost2 = m[:, -1, -1]
        # 0 * Σ diag: a non-finite Jacobian makes the cost NaN, which fails every test
        cost2 = float(group_cost2.sum() + 0.0 * m.diagonal(dim1=-2, dim2=-1).sum())
        return cls(
            A=m[:, :L, :L], B=m[:, :L, L:-1], C=m[:, L:-1, L:-1].sum(0), g_local=m[:, :L, -1],
            g_shared=m[:, L:-1, -1].sum(0), group_cost2=group_cost2, cost2=cost2,
        )  # fmt: skip

    @classmethod
    def join(cls, parts: list[Blocks]) -> Blocks:
        """The blocks of all groups from those of consecutive chunks of groups."""
        if len(parts) == 1:
            return parts[0]
        return cls(
            A=torch.cat([p.A for p in parts]), B=torch.cat([p.B for p in parts]),
            C=sum((p.C for p in parts[1:]), parts[0].C),
            g_local=torch.cat([p.g_local for p in parts]),
            g_shared=sum((p.g_shared for p in parts[1:]), parts[0].g_shared),
            group_cost2=torch.cat([p.group_cost2 for p in parts]),
            cost2=sum(p.cost2 for p in parts),
        )  # fmt: skip

    @property
    def column2_local(self) -> Tensor:  # [K, L] |J_j|² of each local column
        return self.A.diagonal(dim1=-2, dim2=-1)

    @property
    def column2_shared(self) -> Tensor:  # [S]
        return self.C.diagonal()


def solve_damped(
    blocks: Blocks, damping_local: Tensor, damping_shared: Tensor, rhs_local: Tensor,
    rhs_shared: Tensor,
) -> tuple[Tensor, Tensor, bool]:  # fmt: skip
    """Solve ``(JᵀJ + diag(d)) δ = -rhs`` by the Schur complement of the shared block.

    ``damping_*`` are the added diagonals (λD²). Returns (δ_L ``[K, L]``, δ_S ``[S]``,
    solved): not solved when a factorisation failed (δ is then NaN).
    """
    A = blocks.A.clone()
    A.diagonal(dim1=-2, dim2=-1).add_(damping_local)
    chol, info = torch.linalg.cholesky_ex(A)  # [K, L, L]
    solved = bool((info == 0).all())
    # the explicit inverse of each small block and one product: faster here than a batched
    # triangular solve of many tiny systems (0.09 s against 0.2 s for 10^5 3x3 blocks); the
    # step only proposes, the cost decides, and the inverse of a damped SPD block is benign
    rhs = torch.cat([rhs_local.unsqueeze(-1), blocks.B], dim=-1)  # [K, L, 1 + S]
    both = torch.bmm(torch.cholesky_inverse(chol), rhs)
    y, X = both[..., 0], both[..., 1:]  # Aᵢ⁻¹ rhsᵢ, Aᵢ⁻¹ Bᵢ
    S = blocks.C.shape[0]
    if S:
        reduced = blocks.C + torch.diag(damping_shared) - torch.einsum("kls,klt->st", blocks.B, X)
        reduced_rhs = rhs_shared - torch.einsum("kls,kl->s", blocks.B, y)
        chol_s, info_s = torch.linalg.cholesky_ex(reduced)
        solved &= int(info_s) == 0
        step_shared = -torch.cholesky_solve(reduced_rhs.unsqueeze(-1), chol_s).squeeze(-1)
        step_local = -y - torch.matmul(X, step_shared)
    else:
        step_shared, step_local = rhs_shared.new_zeros(0), -y
    if not solved:  # garbage from a failed factorisation fails every later test as NaN
        step_local, step_shared = step_local * math.nan, step_shared * math.nan
    return step_local, step_shared, solved


@dataclass
class BlockLMResult:
    """Outcome of :func:`block_levenberg_marquardt`."""

    theta_local: Tensor  # [K, L] best point
    theta_shared: Tensor  # [S]
    cost: float  # 0.5 Σ r² at it
    group_cost: Tensor  # [K] 0.5 Σ r² of each group
    blocks: Blocks  # the normal equations at it
    residual_chunks: list[Tensor]  # masked residuals at it, chunk by chunk
    n_iter: int
    n_eval: int
    status: int  # an LMStatus code
    history: list[float]  # the cost after every iteration

    @property
    def residuals(self) -> Tensor:  # [K, N]
        chunks = self.residual_chunks
        return torch.cat(chunks) if len(chunks) > 1 else chunks[0]


@dataclass
class _State:
    theta_local: Tensor
    theta_shared: Tensor
    residuals: list[Tensor]
    blocks: Blocks
    scale_local: Tensor  # [K, L] Marquardt scale D²
    scale_shared: Tensor  # [S]


def _rescale(scale: Tensor, column2: Tensor) -> Tensor:
    """``lm.py``'s Marquardt scale: non-decreasing, at most ``_SCALE_STALE`` |J_j|², a zero
    column keeps its scale."""
    grown = torch.minimum(torch.maximum(scale, column2), column2 * _SCALE_STALE)
    return torch.where(column2 > 0, grown, scale)


def _dot(a: Tensor, b: Tensor) -> float:
    return float((a * b).sum())


def block_levenberg_marquardt(
    rows_of: BlockRows | None,
    theta_local: Tensor,
    theta_shared: Tensor,
    *,
    mask: Tensor | None = None,
    ftol: float = DEFAULT_FTOL,
    xtol: float = DEFAULT_XTOL,
    gtol: float = DEFAULT_GTOL,
    max_iter: int = DEFAULT_MAX_ITER,
    chunk: int | None = None,
    chunk_map: ChunkMap = map,
    order: Tensor | None = None,
    evaluate: BlockEvaluate | None = None,
    solve: DampedSolve = solve_damped,
) -> BlockLMResult:
    """Minimise ``0.5 Σᵢ |rᵢ(θᵢ, θ_S)|²`` over every group's θᵢ and the shared θ_S.

    Args:
        rows_of: ``(θ_L [K, L], θ_S [S]) -> [K, L + S + 1, N]``: each group's Jacobian rows
            (local parameters, then shared ones) and its residuals (already divided by sigma).
        theta_local, theta_shared: the start.
        mask: ``[K, N]`` bool, False drops a point (its rows may hold NaN).
        ftol, xtol, gtol, max_iter: as ``lm.levenberg_marquardt``, on the whole problem.
        chunk: evaluate this many groups at a time, ``rows_of(θ_L[part], θ_S, part)``; the
            rows of a chunk become its blocks at once, so only a chunk's rows are ever held.
        chunk_map: ``map`` over the chunks (e.g. a thread pool's, for chunks side by side).
        order: the rows come in another order: row ``order[j]`` is the block layout's j-th
            (local, shared, then the residual); permuting the small products is cheaper than
            copying the rows.
        evaluate: computes the blocks itself (a compiled evaluator), in place of
            ``rows_of`` (then None), ``mask``, ``chunk``, ``chunk_map`` and ``order``.
        solve: solves the damped normal equations, as :func:`solve_damped` (the default)
            does (a compiled one for the compiled evaluator's blocks).

    Example:
        >>> x = torch.linspace(0, 4, 30, dtype=torch.float64)
        >>> amp = torch.tensor([[1.0], [3.0]], dtype=torch.float64)
        >>> y = amp * torch.exp(-0.5 * x)  # two decays, a shared rate k = 0.5
        >>> def rows(a, k):  # d/da, d/dk, r
        ...     e = torch.exp(-k * x).expand(2, -1)
        ...     return torch.stack([e, -a * x * e, a * e - y], dim=1)
        >>> fit = block_levenberg_marquardt(rows, torch.ones(2, 1, dtype=torch.float64),
        ...                                 torch.ones(1, dtype=torch.float64))
        >>> fit.theta_local.round(decimals=6).tolist(), round(float(fit.theta_shared), 6)
        ([[1.0], [3.0]], 0.5)
        >>> LMStatus(fit.status).name in ("FTOL", "XTOL", "GTOL")
        True
    """
    eps = torch.finfo(theta_local.dtype).eps
    noise = _COST_NOISE * eps
    f_tol, f_actual, x_tol, g_tol = max(ftol, eps), max(ftol, noise), max(xtol, eps), max(gtol, eps)
    n_eval = 0

    if evaluate is None:
        if rows_of is None:
            raise TypeError("block_levenberg_marquardt needs rows_of or evaluate")
        evaluate = functools.partial(
            evaluate_blocks, rows_of, mask=mask, chunk=chunk, chunk_map=chunk_map, order=order
        )
    blocks_at = evaluate

    def counted(t_local: Tensor, t_shared: Tensor) -> tuple[list[Tensor], Blocks]:
        nonlocal n_eval
        n_eval += 1
        return blocks_at(t_local, t_shared)

    with torch.no_grad():
        residuals, blocks = counted(theta_local, theta_shared)
        col_l, col_s = blocks.column2_local, blocks.column2_shared
        st = _State(
            theta_local.clone(), theta_shared.clone(), residuals, blocks,
            torch.where(col_l == 0, 1.0, col_l), torch.where(col_s == 0, 1.0, col_s),
        )  # fmt: skip
        cost2_start = blocks.cost2
        history: list[float] = []
        status = LMStatus.RUNNING
        if not math.isfinite(cost2_start):
            status = LMStatus.NON_FINITE
        elif _gtol_hit(blocks, g_tol):
            status = LMStatus.GTOL
        lam, nu, n_iter = _LAMBDA0, 2.0, 0
        while status == LMStatus.RUNNING and n_iter < max_iter:
            n_iter += 1
            b = st.blocks
            step_l, step_s, solved = solve(
                b, lam * st.scale_local, lam * st.scale_shared, b.g_local, b.g_shared
            )
            dv2 = _dot(st.scale_local * step_l, step_l) + _dot(st.scale_shared * step_s, step_s)
            dx2 = _dot(st.scale_local * st.theta_local, st.theta_local) + _dot(
                st.scale_shared * st.theta_shared, st.theta_shared
            )
            # twice the predicted reduction: λ|Dδ|² - gᵀδ (from the normal equations)
            pred2 = lam * dv2 - _dot(b.g_local, step_l) - _dot(b.g_shared, step_s)
            tiny = pred2 <= noise * b.cost2
            trial_l, trial_s = st.theta_local + step_l, st.theta_shared + step_s
            new_res, new = counted(trial_l, trial_s) if solved else (st.residuals, None)
            new_cost2 = new.cost2 if new is not None else math.nan
            actred2 = b.cost2 - new_cost2
            rho = actred2 / pred2 if pred2 != 0 else math.nan
            accepted = solved and (rho > _ACCEPT or (tiny and abs(actred2) <= noise * b.cost2))
            shrink = min(max(1 - (2 * rho - 1) ** 3, 1 / 3), 2) if math.isfinite(rho) else 2
            lam = max(lam * (shrink if accepted else nu), _LAMBDA_MIN)
            nu = 2.0 if accepted else nu * 2
            f_hit = pred2 <= f_tol * b.cost2 and abs(actred2) <= f_actual * b.cost2
            x_hit = dv2 <= x_tol**2 * dx2
            if accepted and new is not None:
                st.theta_local, st.theta_shared = trial_l, trial_s
                st.residuals, st.blocks = new_res, new
                st.scale_local = _rescale(st.scale_local, new.column2_local)
                st.scale_shared = _rescale(st.scale_shared, new.column2_shared)
            history.append(0.5 * st.blocks.cost2)
            if f_hit or x_hit:
                if _stationary(st, f_tol, cost2_start, solve):
                    status = LMStatus.FTOL if f_hit else LMStatus.XTOL
            elif _gtol_hit(st.blocks, g_tol):
                status = LMStatus.GTOL
            if not solved and lam > _LAMBDA_MAX:
                status = LMStatus.SINGULAR
        if status == LMStatus.RUNNING:
            status = LMStatus.MAX_ITER
    return BlockLMResult(
        st.theta_local, st.theta_shared, 0.5 * st.blocks.cost2, 0.5 * st.blocks.group_cost2,
        st.blocks, st.residuals, n_iter, n_eval, int(status), history,
    )  # fmt: skip


def evaluate_blocks(
    rows_of: BlockRows,
    theta_local: Tensor,
    theta_shared: Tensor,
    *,
    mask: Tensor | None = None,
    chunk: int | None = None,
    chunk_map: ChunkMap = map,
    order: Tensor | None = None,
) -> tuple[list[Tensor], Blocks]:
    """(masked residuals ``[k, N]`` of each chunk, the normal equations' blocks) at one
    point; see :func:`block_levenberg_marquardt` for the arguments."""
    K, L = theta_local.shape
    parts = [slice(0, K)] if chunk is None else [
        slice(start, min(start + chunk, K)) for start in range(0, K, chunk)
    ]  # fmt: skip

    found: dict[int, tuple[Tensor, Blocks]] = {}

    def one(index: int) -> None:  # keeps its result: chunk_map's are only waited for
        part = parts[index]
        if chunk is None:
            rows = rows_of(theta_local, theta_shared)
        else:
            rows = rows_of(theta_local[part], theta_shared, part)
        if mask is not None and not bool(mask[part].all()):
            rows = torch.where(mask[part].unsqueeze(1), rows, 0.0)  # masked rows may be NaN
        found[index] = rows[:, -1], Blocks.of(rows, L, order)

    for _ in chunk_map(one, range(len(parts))):
        pass
    done = [found[index] for index in range(len(parts))]
    return [r for r, _ in done], Blocks.join([b for _, b in done])


def _gtol_hit(b: Blocks, gtol: float) -> bool:
    """MINPACK's max_j |g_j| / (|J_j| |r|) <= gtol over every parameter (zero columns pass)."""
    bound = gtol**2 * b.cost2
    local = bool((b.g_local**2 <= bound * b.column2_local).all())
    return local and bool((b.g_shared**2 <= bound * b.column2_shared).all())


def _stationary(st: _State, tol_f: float, cost2_start: float, solve: DampedSolve) -> bool:
    """``lm._stationary`` for the whole problem: the nearly undamped step predicts a relative
    reduction gᵀ(JᵀJ + δD²)⁻¹g below tolerance, or the fit is exact."""
    b = st.blocks
    eps = torch.finfo(b.A.dtype).eps
    damping, tol = stationary_tolerances(eps)
    step_l, step_s, solved = solve(
        b, damping * st.scale_local, damping * st.scale_shared, b.g_local, b.g_shared
    )
    predicted = -_dot(b.g_local, step_l) - _dot(b.g_shared, step_s)  # gᵀ(JᵀJ + δD²)⁻¹g
    if solved and predicted <= max(tol_f, tol) * b.cost2:
        return True
    dx2 = _dot(st.scale_local * st.theta_local, st.theta_local) + _dot(
        st.scale_shared * st.theta_shared, st.theta_shared
    )
    return b.cost2 <= eps * cost2_start or b.cost2 <= (_COST_NOISE * eps) ** 2 * dx2


@dataclass
class BlockCovariance:
    """Blocks of (JᵀJ)⁻¹ (unscaled): what the standard errors and the full matrix need.

    ``variance_local`` ``[K, L]``: the diagonal of each group's block,
    Aᵢ⁻¹ + Aᵢ⁻¹Bᵢ S⁻¹ BᵢᵀAᵢ⁻¹; ``shared`` ``[S, S]``: S⁻¹ = (C − Σ BᵢᵀAᵢ⁻¹Bᵢ)⁻¹.
    NaN where a block is singular: a group whose Aᵢ cannot be factored (its local
    parameters are not determined) has NaN variances and is left out of the Schur sum, so
    the shared block counts only the other groups (conservative).
    """

    variance_local: Tensor  # [K, L]
    shared: Tensor  # [S, S]
    a_inverse: Tensor  # [K, L, L]
    x: Tensor  # [K, L, S] Aᵢ⁻¹Bᵢ
    normal_local: Tensor  # [K, L] diag(Aᵢ), for the estimability test
    normal_shared: Tensor  # [S] diag(C)

    def covariance(self) -> Tensor:
        """The full ``[K·L + S, K·L + S]`` matrix (group 0's locals, group 1's, ..., shared):
        for a moderate K only (``fit_global``'s ``FitResult``)."""
        K, L, S = self.x.shape
        xs = torch.nan_to_num(self.x.reshape(K * L, S), nan=0.0)
        shared = torch.nan_to_num(self.shared, nan=0.0)
        top = xs @ shared @ xs.T  # Xᵢ S⁻¹ Xⱼᵀ for every pair of groups
        top += torch.block_diag(*self.a_inverse) if K * L else top.new_zeros(0, 0)
        corner = -xs @ shared
        full = torch.cat([torch.cat([top, corner], 1), torch.cat([corner.T, shared], 1)], 0)
        bad = torch.cat([self.variance_local.reshape(-1), self.shared.diagonal()]).isnan()
        full[bad] = math.nan
        full[:, bad] = math.nan
        return full


def block_covariance(b: Blocks) -> BlockCovariance:
    """(JᵀJ)⁻¹ in blocks from the normal equations' blocks.

    A variance is NaN where it inflates the parameter beyond what the normal equations can
    resolve (``stats.estimable_variance``, as ``fit_batch``).
    """
    from gradfit.results.stats import estimable_variance

    _, L, S = b.B.shape
    chol, info = torch.linalg.cholesky_ex(b.A)
    ok = info == 0  # [K]
    eye = torch.eye(L, dtype=b.A.dtype, device=b.A.device)
    chol = torch.where(ok[:, None, None], chol, eye)
    a_inverse = torch.cholesky_inverse(chol)
    x = torch.cholesky_solve(b.B, chol)  # [K, L, S]
    x = torch.where(ok[:, None, None], x, 0.0)  # a singular group leaves the Schur sum
    shared = torch.full_like(b.C, math.nan)
    if S:
        reduced = b.C - torch.einsum("kls,klt->st", b.B, x)
        chol_s, info_s = torch.linalg.cholesky_ex(reduced)
        if int(info_s) == 0:
            shared = torch.cholesky_inverse(chol_s)
    variance_shared = estimable_variance(shared.diagonal(), b.column2_shared)
    shared = torch.where(
        variance_shared.isnan()[:, None] | variance_shared.isnan(), math.nan, shared
    )
    through = torch.einsum("kls,st,klt->kl", x, torch.nan_to_num(shared, nan=0.0), x)
    variance_local = a_inverse.diagonal(dim1=-2, dim2=-1) + through
    if S and bool(variance_shared.isnan().any()):
        variance_local = torch.full_like(variance_local, math.nan)  # the coupling is unknown
    variance_local = torch.where(ok[:, None], variance_local, math.nan)
    variance_local = estimable_variance(variance_local, b.column2_local)
    a_inverse = torch.where(ok[:, None, None], a_inverse, math.nan)
    return BlockCovariance(variance_local, shared, a_inverse, x, b.column2_local, b.column2_shared)
