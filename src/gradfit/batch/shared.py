"""Many groups, some parameters shared by all: one global least-squares fit in blocks.

``fit_shared`` takes a NaN-padded batch like ``fit_batch`` (``y`` ``[K, N]``), but the
``shared`` parameters take one value for every group while the others stay per group. It is
one problem (one Levenberg–Marquardt run over the stacked residuals, one status), solved by
``optim/block_lm.py``: each iteration costs about what an iteration of K independent fits
costs, because the normal equations are solved group by group plus one small shared system
(the Schur complement). ``fit_global`` uses the same solver (``solve_shared``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from gradfit.batch.fit_batch import (
    _as_array,
    _balanced,
    _batch_tensors,
    _check_shapes,
    _chunk_map,
    _lm_loss,
    _start,
    batch_optimizer,
)
from gradfit.batch.malloc import reuse_freed_memory
from gradfit.errors import DataError, OptionError, unknown_name
from gradfit.model.models import Model, as_model, check_uses_independent
from gradfit.model.parameters import Bound, ParameterSpace
from gradfit.optim.block_lm import DEFAULT_CHUNK
from gradfit.optim.shared_lm import PLAIN_LOSSES, SharedSolution, solve_shared
from gradfit.options import FitOptions, options_from
from gradfit.results.batch_result import NO_DATA, TOO_FEW_POINTS, BatchResult

Tensor = torch.Tensor


@dataclass
class SharedParams:
    """The shared parameters of a ``fit_shared`` run and the statistics of the whole problem.

    ``values``/``stderr``: name -> value for every shared parameter (stderr None where fixed
    or not estimable); ``covariance``: ``[S, S]`` over the free shared ones (``free``), scaled
    as the groups' errors are (by the stacked χ²ᵣ unless ``absolute_sigma``). ``status``
    and ``message`` are the global fit's (every group's row carries the same status).
    """

    names: tuple[str, ...]
    values: dict[str, float]
    stderr: dict[str, float | None]
    free: tuple[str, ...]
    covariance: Tensor
    status: str
    message: str
    n_iter: int
    n_eval: int
    n_groups: int  # groups in the fit (those with enough valid points)
    n_points: int
    dof: int
    chi2: float
    reduced_chi2: float

    @property
    def converged(self) -> bool:
        return self.status == "converged"

    def summary(self) -> str:
        """One line per shared parameter, then the global fit's status and χ²ᵣ."""
        lines = []
        for name in self.names:
            sd = self.stderr[name]
            error = "fixed" if name not in self.free else ("n/a" if sd is None else f"{sd:.6g}")
            lines.append(f"shared {name} = {self.values[name]:.10g} ± {error}")
        lines.append(
            f"global fit: {self.status} ({self.message}); {self.n_groups} groups, "
            f"{self.n_points} points, {self.n_iter} iterations, reduced chi2 "
            f"{self.reduced_chi2:.6g}"
        )
        return "\n".join(lines)


def check_shared(shared: str | Sequence[str], names: Sequence[str]) -> frozenset[str]:
    """The shared names as a set; an unknown one is an ``OptionError`` naming the choices."""
    listed = [shared] if isinstance(shared, str) else list(shared)
    for name in listed:
        if name not in names:
            raise unknown_name("shared parameter", str(name), tuple(names))
    return frozenset(listed)


def check_block_options(options: FitOptions, who: str) -> None:
    """The block solver runs LM on plain least squares: refuse the rest clearly."""
    optimizer = batch_optimizer(options)
    if optimizer != "lm":
        raise OptionError(
            f"{who} runs Levenberg–Marquardt (optimizer lm or auto), not {optimizer!r}"
        )
    loss = options.loss_fn
    if loss.name not in PLAIN_LOSSES:
        raise OptionError(
            f"{who} minimises plain least squares (loss mse, sse or chi2), not {loss.name!r}"
        )
    if options.ties:
        raise OptionError(f"{who} does not take ties; share the parameter instead")


def fit_shared(
    model: Model | str | Callable[..., Tensor] | nn.Module,
    x: Any,
    y: Any,
    *,
    shared: str | Sequence[str],
    sigma: Any = None,
    mask: Any = None,
    p0: Any = None,
    bounds: Mapping[str, Bound] | None = None,
    fixed: Mapping[str, float] | None = None,
    loss: str = "mse",
    optimizer: str = "auto",
    epochs: int | None = None,
    tol: float | None = None,
    absolute_sigma: bool = False,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    options: FitOptions | None = None,
) -> tuple[BatchResult, SharedParams]:
    """Fit ``model`` to every row of ``y`` ``[K, N]`` at once, the ``shared`` parameters one
    value for all rows, the others one per row: one least-squares problem.

    Inputs as ``fit_batch`` (``x`` ``[N]`` or ``[K, N]``, NaN or ``mask=False`` marks missing
    points, ``sigma``, ``p0`` ``[P]``, ``[K, P]`` or a mapping, ``bounds`` and ``fixed`` by
    name for every group). The loss is plain least squares (mse, sse or chi2) and the solver
    LM (``optim/block_lm.py``). The errors come from the stacked problem: (JᵀJ)⁻¹ scaled by
    its χ²ᵣ = χ² / (points − free parameters) unless ``absolute_sigma``, as ``curve_fit``
    on the stacked residuals.

    Returns:
        A ``BatchResult`` (one row per group; the shared columns repeat the shared values and
        errors; ``loss``, ``reduced_chi2`` and ``r2`` are each group's own, its χ²ᵣ over its
        points less its local parameters; every row has the global fit's status and
        iterations; a group with too few points is not fitted) and the ``SharedParams``.

    Example:
        >>> import gradfit as gf
        >>> x = torch.linspace(0, 4, 30, dtype=torch.float64)
        >>> Y = torch.stack([a * torch.exp(-0.7 * x) for a in (1.0, 2.0, 5.0)])
        >>> rows, common = gf.fit_shared("a*exp(-k*x)", x, Y, shared="k", p0={"a": 1, "k": 1})
        >>> rows.params[:, 0].round(decimals=6).tolist(), round(common.values["k"], 6)
        ([1.0, 2.0, 5.0], 0.7)
    """
    opts = options_from(
        options, loss=loss, optimizer=optimizer, epochs=epochs, tol=tol, p0=p0, bounds=bounds,
        fixed=fixed, absolute_sigma=absolute_sigma, dtype=dtype, device=device,
    )  # fmt: skip
    model = as_model(model)
    check_uses_independent(model)
    shared_set = check_shared(shared, model.param_names)
    check_block_options(opts, "fit_shared")
    if opts.loss_fn.name == "chi2" and sigma is None:
        raise OptionError("loss 'chi2' needs sigma (per-point standard deviations)")
    dtype, device = opts.dtype or torch.float64, opts.device
    x, y, sigma, mask = (_as_array(v) for v in (x, y, sigma, mask))
    K, _ = _check_shapes(x, y, sigma, mask)
    if K == 0:
        raise DataError("y has no rows: nothing to fit")
    if device is None and isinstance(y, Tensor):
        device = y.device
    data = _batch_tensors(x, y, sigma, mask, dtype, device)
    space = ParameterSpace.build(model.param_names, opts.bounds, opts.fixed)
    start_p0 = opts.p0
    if start_p0 is not None and not isinstance(start_p0, Mapping):
        start_p0 = _as_array(start_p0)
    assert data["x"] is not None and data["y"] is not None and data["mask"] is not None
    device_type = data["y"].device
    chunk = _balanced(DEFAULT_CHUNK, K, device_type)  # a multiple of the threads, as fit_batch
    n_chunks = -(-K // chunk)
    with reuse_freed_memory(), _chunk_map(device_type, n_chunks) as chunk_map:
        # chunks of groups side by side on a multi-core CPU, as fit_batch runs its chunks;
        # the per-group work around them inside too, where torch runs on one thread (as in
        # fit_batch's chunks): elementwise [K] operations lose more to thread hand-offs
        # than they gain (measured: the results 9 ms on one thread, 150 ms on two, 10^5)
        start = _start(model, start_p0, data["x"], data["y"], data["mask"], 0, K)
        start = _common_shared_start(start, data["mask"], model.param_names, shared_set)
        space.check_start(start)
        solution = solve_shared(
            model, data, start, shared_set, space, max_iter=opts.epochs, tol=opts.tol,
            chunk=chunk, chunk_map=chunk_map,
        )  # fmt: skip
        return _batch_result(solution, data, space, opts), _shared_params(
            solution, space, shared_set, opts
        )


def _common_shared_start(
    start: Tensor, mask: Tensor, names: Sequence[str], shared: frozenset[str]
) -> Tensor:
    """Every group starts the shared parameters at the mean of their own starts (groups with
    valid points; ``p0`` given for them is the same in every row anyway)."""
    start = start.clone()
    some = mask.any(-1)
    for j, name in enumerate(names):
        if name in shared:
            values = start[some, j] if bool(some.any()) else start[:, j]
            start[:, j] = values[values.isfinite()].mean() if bool(values.isfinite().any()) else 1.0
    return start


def _scale(solution: SharedSolution, absolute_sigma: bool) -> float:
    return 1.0 if absolute_sigma else solution.reduced_chi2


def _batch_result(
    solution: SharedSolution,
    data: Mapping[str, Tensor | None],
    space: ParameterSpace,
    opts: FitOptions,
) -> BatchResult:
    y, mask, sigma = data["y"], data["mask"], data["sigma"]
    assert y is not None and mask is not None
    params, fitted, cov = solution.params, solution.fitted, solution.covariance
    K = params.shape[0]
    scale = _scale(solution, opts.absolute_sigma)
    stderr = torch.full_like(params, math.nan)
    stderr[:, solution.local] = torch.sqrt(cov.variance_local * scale)
    if solution.shared:
        stderr[:, solution.shared] = torch.sqrt(cov.shared.diagonal() * scale)
    stderr = torch.where(fitted.unsqueeze(-1), stderr, math.nan)
    n_valid = solution.n_valid
    reduced_chi2, r2 = _group_goodness(solution, y, mask, sigma, n_valid)
    loss = _lm_loss(solution.solver.group_cost, n_valid, opts.loss_fn)
    status = torch.full((K,), solution.solver.status, dtype=torch.int64, device=y.device)
    status = torch.where(fitted, status, torch.where(n_valid == 0, NO_DATA, TOO_FEW_POINTS))
    n_iter = torch.where(fitted, solution.solver.n_iter, 0)

    def blank(values: Tensor) -> Tensor:
        return torch.where(fitted, values, math.nan)

    fixed = tuple(n for n, v in zip(space.names, space.fixed, strict=True) if v is not None)
    return BatchResult(
        params=params, stderr=stderr, loss=blank(loss), n_iter=n_iter, status=status,
        param_names=space.names, reduced_chi2=blank(reduced_chi2), r2=blank(r2),
        n_points=n_valid, optimizer="lm",
        loss_name=opts.loss_fn.name, fixed=fixed,
    )  # fmt: skip


def _group_goodness(
    solution: SharedSolution, y: Tensor, mask: Tensor, sigma: Tensor | None, n: Tensor
) -> tuple[Tensor, Tensor]:
    """Each group's χ²ᵣ (its χ² over its ``n`` points less its local parameters) and R², as
    ``stats.goodness`` defines them (the χ² is known; groups left out are blanked later)."""
    chi2 = 2 * solution.solver.group_cost
    dof = n - len(solution.local)
    reduced_chi2 = torch.where(dof > 0, chi2 / dof.clamp_min(1), math.nan)
    ss_tot, ss_res = solution.sums_of_squares(y, mask, sigma)
    r2 = torch.where(ss_tot > 0, 1 - ss_res / ss_tot.clamp_min(1e-300), math.nan)
    return reduced_chi2, r2


def _shared_params(
    solution: SharedSolution, space: ParameterSpace, shared: frozenset[str], opts: FitOptions
) -> SharedParams:
    names = tuple(n for n in space.names if n in shared)
    first = int(solution.fitted.nonzero()[0, 0])
    values = {n: float(solution.params[first, space.names.index(n)]) for n in names}
    scale = _scale(solution, opts.absolute_sigma)
    covariance = solution.covariance.shared * scale
    free = tuple(space.names[i] for i in solution.shared)
    sd = covariance.diagonal().sqrt().tolist()
    stderr: dict[str, float | None] = {n: None for n in names}
    stderr.update({n: (s if math.isfinite(s) else None) for n, s in zip(free, sd, strict=True)})
    return SharedParams(
        names=names, values=values, stderr=stderr, free=free, covariance=covariance,
        status=solution.status, message=solution.message(opts.tol),
        n_iter=solution.solver.n_iter, n_eval=solution.solver.n_eval,
        n_groups=int(solution.fitted.sum()), n_points=solution.n_points, dof=solution.dof,
        chi2=solution.chi2, reduced_chi2=solution.reduced_chi2,
    )  # fmt: skip
