"""Mini-batch training on Parquet data streamed by row groups, never loaded whole.

Every epoch (with ``shuffle``) draws, from the fit's generator (``minibatch.py``), a seed
for this epoch's shuffle buffers and an order of the row groups; rank r of a torchrun group
reads the row groups at positions r, r + world, ... of that order. Rows pass through a
shuffle buffer of at most ``buffer_rows`` rows (default ``DEFAULT_BUFFER_ROWS`` = 2²⁰, 16 MiB
per float64 column) plus one row group: the buffer is filled by whole row groups, its rows
permuted, and batches taken from it; what is left joins the next fill. Memory: the buffer,
one row group and the model's work on one batch.

An epoch has ``ceil(n / batch_size)`` steps (n: the training rows, every rank's); each rank
splits its own rows into that many nearly equal parts, so a step takes about
``batch_size`` rows in all. ``validation=f`` holds out whole row groups: the first
``max(1, round(f * groups))`` of a permutation drawn from the seed (so at least two row
groups are needed).

The result's statistics come from one more pass: JᵀJ, χ², and the sums for R² accumulated
row group by row group (P×P and a few numbers); ``fit.png`` shows the first row group.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gradfit.errors import DataError, OptionError
from gradfit.fitting import checkpoint as checkpoints
from gradfit.fitting import distributed, minibatch
from gradfit.fitting.minibatch import Batch, EpochPosition, Rows
from gradfit.fitting.training import train
from gradfit.io.streamed import ParquetRows, Unit, check_finite
from gradfit.model.models import Model, numpy_gradient_message
from gradfit.model.parameters import ParameterSpace
from gradfit.optim import FIRST_ORDER
from gradfit.optim.problem import Hook, LoopOutcome, Problem
from gradfit.options import FitOptions
from gradfit.results import stats
from gradfit.results.fit_result import FitResult

Tensor = torch.Tensor
#: rows a shuffle buffer holds (plus one row group while it is filled)
DEFAULT_BUFFER_ROWS = 1 << 20


@dataclass
class Columns:
    """Which columns of the table are x (named or one positional), y and sigma."""

    x: list[str]
    y: str
    sigma: str | None
    named: bool  # x as {column: values} (an expression in named columns)

    @property
    def all(self) -> list[str]:
        return [*self.x, self.y, *([self.sigma] if self.sigma else [])]


@dataclass
class StreamedBatches:
    """``minibatch.Batches`` from a ``ParquetRows`` source (see the module's text)."""

    source: ParquetRows
    columns: Columns
    units: list[Unit]  # the training row groups
    batch_size: int
    shuffle: bool
    omit: bool  # --nan-policy omit
    dtype: torch.dtype
    device: torch.device
    where: distributed.Group | None = None
    buffer_rows: int = DEFAULT_BUFFER_ROWS
    omitted: int = field(default=0, init=False)

    @property
    def rank(self) -> int:
        return 0 if self.where is None else self.where.rank

    @property
    def world(self) -> int:
        return 1 if self.where is None else self.where.world

    def rows_of(self, block: dict[str, np.ndarray]) -> Rows:
        """Arrays of the table's columns as a ``Rows`` of tensors."""

        def tensor(name: str) -> Tensor:
            return torch.as_tensor(block[name], dtype=self.dtype, device=self.device)

        cols = self.columns
        x: Tensor | dict[str, Tensor] = (
            {c: tensor(c) for c in cols.x} if cols.named else tensor(cols.x[0])
        )
        return Rows(x, tensor(cols.y), tensor(cols.sigma) if cols.sigma else None)

    def read(self, unit: Unit) -> dict[str, np.ndarray]:
        """One row group, checked (non-finite values, sigma > 0)."""
        block, dropped = check_finite(self.source.read(unit), unit, self.omit)
        self.omitted += dropped
        sigma = self.columns.sigma
        if sigma is not None and (block[sigma] <= 0).any():
            row = int(np.argmax(block[sigma] <= 0))
            raise DataError(
                f"{unit.path}: column {sigma!r} must be > 0, got {block[sigma][row]} "
                f"(row group {unit.group})"
            )
        return block

    def epoch(self, position: EpochPosition, generator: torch.Generator) -> Iterator[Batch]:
        n_units = len(self.units)
        seed = int(torch.randint(0, 2**62, (1,), generator=generator))  # this epoch's buffers
        order = torch.randperm(n_units, generator=generator) if self.shuffle else range(n_units)
        mine = [self.units[int(i)] for i in list(order)[self.rank :: self.world]]
        local = torch.Generator().manual_seed((seed + self.rank) % 2**62)
        n_steps = math.ceil(sum(u.rows for u in self.units) / self.batch_size)
        sizes = torch.arange(sum(u.rows for u in mine)).tensor_split(n_steps)
        buffered: dict[str, np.ndarray] = {}
        pending = iter(mine)
        for step, size in enumerate(len(s) for s in sizes):
            buffered = self._fill(buffered, size, pending, local)
            take = {k: v[:size] for k, v in buffered.items()}
            buffered = {k: v[size:] for k, v in buffered.items()}
            if step >= position.step:  # a resumed epoch redraws and skips the batches done
                yield Batch(self.rows_of(take) if take else self._empty())

    def _fill(
        self,
        buffered: dict[str, np.ndarray],
        size: int,
        pending: Iterator[Unit],
        generator: torch.Generator,
    ) -> dict[str, np.ndarray]:
        """``buffered`` with at least ``size`` rows (while row groups are left): whole row
        groups read until it holds ``buffer_rows`` rows, then every row permuted."""
        held = len(next(iter(buffered.values()))) if buffered else 0
        if held >= size:
            return buffered
        blocks = [buffered] if held else []
        for unit in pending:
            block = self.read(unit)
            blocks.append(block)
            held += len(block[self.columns.y])
            if held >= max(size, self.buffer_rows):
                break
        if not blocks:
            return {}
        joined = {k: np.concatenate([b[k] for b in blocks]) for k in blocks[0]}
        if self.shuffle and held > 1:
            perm = torch.randperm(held, generator=generator).numpy()
            joined = {k: v[perm] for k, v in joined.items()}
        return joined

    def _empty(self) -> Rows:
        return self.rows_of({c: np.zeros(0) for c in self.columns.all})

    def score(self, problem: Problem, theta: Tensor) -> float:
        return score_units(self, self.units, problem, theta)


def my_units(units: list[Unit], where: distributed.Group | None) -> list[Unit]:
    """This rank's row groups when every rank reads the whole list once."""
    return units if where is None else units[where.rank :: where.world]


def score_units(
    batches: StreamedBatches, units: list[Unit], problem: Problem, theta: Tensor
) -> float:
    """``problem``'s loss over ``units`` at ``theta`` (every rank's share summed)."""
    mean = problem.loss.reduction != "sum"
    total = torch.zeros(2, dtype=torch.float64)
    with torch.no_grad():
        for unit in my_units(units, batches.where):
            rows = batches.rows_of(batches.read(unit))
            if rows.n:
                value = float(rows.problem(problem).objective(theta))
                part = [value * rows.n if mean else value, rows.n]
                total += torch.tensor(part, dtype=torch.float64)
    if batches.where is not None:
        batches.where.all_sum(total)
    value, n = float(total[0]), float(total[1])
    return (value / n if n else math.nan) if mean else value


@dataclass
class Sums:
    """What the statistics of a streamed fit need, accumulated row group by row group."""

    jtj: Tensor  # [F, F] over the free parameters, rows divided by sigma
    chi2: float = 0.0
    n: int = 0
    y_mean: float = 0.0  # running mean and sum of squared deviations of y (Chan et al.)
    y_m2: float = 0.0
    ss_res: float = 0.0

    def add(self, y: Tensor, y_pred: Tensor, r: Tensor, J: Tensor) -> None:
        self.jtj += J.T @ J
        self.chi2 += float(r @ r)
        self.ss_res += float(((y - y_pred) ** 2).sum())
        m = int(y.numel())
        mean, m2 = float(y.mean()), float(((y - y.mean()) ** 2).sum())
        delta, total = mean - self.y_mean, self.n + m
        self.y_m2 += m2 + delta * delta * self.n * m / total
        self.y_mean += delta * m / total
        self.n = total

    def packed(self) -> Tensor:
        """JᵀJ, χ², n, Σy, Σy², Σ(y - ŷ)²: sums that add up across ranks."""
        y_sum = self.y_mean * self.n
        y_sq = self.y_m2 + self.n * self.y_mean**2
        numbers = [self.chi2, float(self.n), y_sum, y_sq, self.ss_res]
        return torch.cat(
            [self.jtj.reshape(-1).double(), torch.tensor(numbers, dtype=torch.float64)]
        )


def statistics(
    batches: StreamedBatches, model: Model, problem: Problem, params: Tensor
) -> tuple[dict[str, float], Tensor]:
    """χ², dof, R², AIC, BIC (as ``stats.goodness``) and JᵀJ over the training rows."""
    free = problem.space.free
    sums = Sums(torch.zeros(len(free), len(free), dtype=torch.float64))
    from gradfit.results.jacobian import prediction_and_jacobian

    for unit in my_units(batches.units, batches.where):
        rows = batches.rows_of(batches.read(unit))
        if not rows.n:
            continue
        y_pred, J = prediction_and_jacobian(model, rows.x, params)
        J = J[:, free].double()
        r = (y_pred - rows.y).double()
        if rows.sigma is not None:
            r, J = r / rows.sigma, J / rows.sigma[:, None]
        sums.add(rows.y.double(), y_pred.double(), r, J)
    packed = sums.packed()
    if batches.where is not None:
        batches.where.all_sum(packed)
    F = len(free)
    jtj = packed[: F * F].reshape(F, F)
    chi2, n, y_sum, y_sq, ss_res = packed[F * F :].tolist()
    # one process: the running spread (no cancellation); ranks: Σy² - (Σy)²/n
    ss_tot = sums.y_m2 if batches.where is None else y_sq - y_sum**2 / max(n, 1)
    dof = n - F
    log_term = n * math.log(max(chi2, 1e-300) / max(n, 1))
    found = {
        "n_points": n,
        "dof": dof,
        "chi2": chi2,
        "reduced_chi2": chi2 / dof if dof > 0 else math.nan,
        "r2": 1 - ss_res / ss_tot if ss_tot > 0 else math.nan,
        "aic": log_term + 2 * F,
        "bic": log_term + math.log(max(n, 1)) * F,
    }
    return found, jtj


def square_root(jtj: Tensor) -> Tensor:
    """R with RᵀR = JᵀJ (from its eigendecomposition): the same singular values and right
    singular vectors as J, which is all ``stats.estimability`` uses of it."""
    values, vectors = torch.linalg.eigh(jtj)
    root: Tensor = values.clamp_min(0).sqrt()[:, None] * vectors.T
    return root


def identity_of(source: ParquetRows, columns: Columns) -> dict[str, Any]:
    """The streamed data's part of a checkpoint's identity: files, row groups, rows, and a
    hash of the first row group's columns."""
    first = source.read(source.units[0])
    return {
        "source": str(source.path.resolve()),
        "rows": source.n_rows,
        "row_groups": len(source.units),
        "first": checkpoints.data_hashes({c: first[c] for c in columns.all}),
    }


def check_streamable(optimizer: str, batch_size: int | None) -> None:
    """Streamed data: mini-batch gd, sgd, adam (``batch_size``), or full-batch lm."""
    if batch_size is None and optimizer != "lm":
        raise OptionError(
            "streamed data are fitted by lm, or by gd, sgd or adam in mini-batches: give "
            f"--batch-size for {optimizer!r}"
        )


def fit_streamed(
    model: Model,
    source: ParquetRows,
    columns: Columns,
    options: FitOptions,
    *,
    hook: Hook | None = None,
    progress: bool = False,
    checkpoint: str | Path | None = None,
    checkpoint_every: int | None = None,
    resume: str | Path | None = None,
    buffer_rows: int = DEFAULT_BUFFER_ROWS,
) -> FitResult:
    """``gradfit.fit`` with ``batch_size`` over ``source``'s rows, streamed (module text).

    ``checkpoint_every`` counts batches (default 1000); a checkpoint holds the position in
    the epoch, and a resumed run rereads the epoch's row groups up to it (bit for bit).
    """
    from gradfit.fitting.fit import _check_model_output, _starting_params

    opts = options
    optimizer = opts.resolve(batched=False)
    check_streamable(optimizer, opts.batch_size)
    if optimizer == "lm" and (checkpoint or resume):
        raise OptionError("lm over streamed data takes no --checkpoint or --resume yet")
    if opts.ties:
        raise OptionError("ties are not taken with streamed data yet; fit a Parquet file "
                          "small enough for memory without --batch-size")  # fmt: skip
    if isinstance(opts.validation, tuple | list):
        raise OptionError("streamed data hold out a fraction of their row groups: give "
                          "validation as a fraction")  # fmt: skip
    device = torch.device(opts.device or "cpu")
    where = distributed.group(device)
    dtype = opts.dtype or torch.float64
    seed = opts.seed
    if seed is None and where is not None:
        seed = where.broadcast_int(secrets.randbits(62))
    generator = minibatch.new_generator(seed)
    units, held = list(source.units), None
    if opts.validation is not None:
        if len(units) < 2:
            raise OptionError(
                f"{source.path}: validation holds out row groups, and it has one; write it "
                "with several row groups (pyarrow: row_group_size)"
            )
        count = min(len(units) - 1, max(1, round(float(opts.validation) * len(units))))
        perm = torch.randperm(len(units), generator=generator).tolist()
        held = [units[i] for i in sorted(perm[:count])]
        units = [units[i] for i in sorted(perm[count:])]
    batches = StreamedBatches(
        source, columns, units, opts.batch_size or 1, opts.shuffle, opts.nan_policy == "omit",
        dtype, device, where, buffer_rows,
    )  # fmt: skip
    sample = batches.rows_of(batches.read(units[0]))  # the start, the checks, the figure
    if sample.n == 0:
        raise DataError(f"{units[0].path}: its first row group has no valid rows")
    loss_fn = opts.loss_fn.with_options(sigma=sample.sigma)
    if loss_fn.name == "chi2" and sample.sigma is None:
        raise OptionError("loss 'chi2' needs sigma (per-point standard deviations)")
    space = ParameterSpace.build(model.param_names, opts.bounds, opts.fixed)
    p_start = _starting_params(model, opts.p0, sample.x, sample.y, dtype, device)
    space.check_start(p_start)
    _check_model_output(model, sample.x, sample.y, p_start)
    if model.numerical:
        raise OptionError(f"optimizer {optimizer!r}: {numpy_gradient_message(model.name)}")
    problem = Problem(model, sample.x, sample.y, loss_fn, space)
    theta = space.to_theta(p_start.unsqueeze(0))[0]
    if optimizer == "lm":
        outcome = run_lm_streamed(batches, problem, theta, max_iter=opts.epochs, tol=opts.tol)
        return _finish(batches, problem, outcome, optimizer, opts, p_start, where, [])
    step = FIRST_ORDER[optimizer](lr=opts.learning_rate(optimizer))
    identity: dict[str, Any] = {}
    if checkpoint or resume:
        identity = checkpoints.identify(
            problem, optimizer, step.lr, tol=opts.tol, p0=p_start, batch_size=opts.batch_size,
            shuffle=opts.shuffle, seed=opts.seed, validation=opts.validation,
            buffer_rows=buffer_rows, nan_policy=opts.nan_policy,
        )  # fmt: skip
        identity["data"] = identity_of(source, columns)
    validation = None
    if held is not None:
        held_units = held

        def held_score(like: Problem, at: Tensor) -> float:
            return score_units(batches, held_units, like, at)

        validation = minibatch.Validation(held_score, opts.patience)
    outcome, position = train(
        problem, theta, step, optimizer, opts, batches, generator, validation,
        identity=identity, where=where, hook=hook, progress=progress, checkpoint=checkpoint,
        checkpoint_every=checkpoint_every, resume=resume,
    )  # fmt: skip
    return _finish(
        batches, problem, outcome, optimizer, opts, p_start, where, position.validation_history
    )


def _finish(
    batches: StreamedBatches,
    problem: Problem,
    outcome: LoopOutcome,
    optimizer: str,
    opts: FitOptions,
    p_start: Tensor,
    where: distributed.Group | None,
    validation_history: list[float],
) -> FitResult:
    """The result: the statistics from one more pass over the training rows."""
    model = problem.model
    params = problem.space.to_params(outcome.theta.detach().unsqueeze(0))[0]
    batches.omitted = 0  # counted in the statistics' pass, which reads every row once
    found, jtj = statistics(batches, model, problem, params)
    omitted = torch.tensor([float(batches.omitted)], dtype=torch.float64)
    if where is not None:
        where.all_sum(omitted)
    result = _streamed_result(problem, outcome, optimizer, found, jtj, params, opts, p_start)
    result.validation_history = list(validation_history)
    result.n_omitted = int(omitted[0])
    return result


def _streamed_result(
    problem: Problem,
    outcome: LoopOutcome,
    optimizer: str,
    found: dict[str, float],
    jtj: Tensor,
    params: Tensor,
    opts: FitOptions,
    start: Tensor,
) -> FitResult:
    """As ``fit``'s ``_result``, from the accumulated sums instead of the rows."""
    space = problem.space
    free, P = space.free, len(space.names)
    scale = 1.0 if opts.absolute_sigma else found["reduced_chi2"]
    if not math.isfinite(float(scale)):
        scale = math.inf
    estimability = stats.estimability(square_root(jtj).numpy())
    cov = torch.as_tensor(stats.scaled(estimability.covariance, scale), dtype=params.dtype)
    if len(free) < P:
        full = torch.zeros(P, P, dtype=params.dtype)
        full[[[i] for i in free], free] = cov
        cov = full
    result = FitResult.build(
        model=problem.model, problem=problem, params=params.cpu(), covariance=cov,
        outcome=outcome, optimizer=optimizer, n_omitted=0,
        statistics={k: np.asarray(v) for k, v in found.items()},
        absolute_sigma=opts.absolute_sigma, start=start, estimability=estimability,
    )  # fmt: skip
    return result


def normal_rows(batches: StreamedBatches, like: Problem, counted: list[int]) -> Any:
    """For the LM kernel's ``stacked``: theta ``[1, F]`` -> ``[1, F + 1, F + 1]``, a square
    root R of the Gram matrix M = [J r]ᵀ[J r] summed row group by row group (every rank's
    too), so that the kernel's ``R Rᵀ`` is M: its JᵀJ, Jᵀr and rᵀr, with memory for one row
    group. R = [[L, 0], [wᵀ, s]] with L Lᵀ = JᵀJ, L w = Jᵀr and s² = rᵀr - wᵀw keeps the
    cost rᵀr to rounding (a plain eigen-square-root would blur it by eps |JᵀJ|). The kernel
    runs without geodesic acceleration, which needs the residuals point by point.
    ``counted[0]`` receives the rows of the last pass (every rank's)."""
    from gradfit.optim.least_squares import residual_functions
    from gradfit.optim.lm import autodiff_jacobian, stack_jacobian

    def stacked(theta: Tensor) -> Tensor:
        with torch.inference_mode(False):
            t = theta.clone()
            gram: Tensor | None = None
            n = 0
            for unit in my_units(batches.units, batches.where):
                rows = batches.rows_of(batches.read(unit))
                n += rows.n
                if not rows.n:
                    continue
                residuals, symbolic = residual_functions(rows.problem(like))
                block = (symbolic or stack_jacobian(autodiff_jacobian(residuals)))(t)[0]
                block = block.detach().double()
                part = block @ block.T
                gram = part if gram is None else gram + part
            F1 = t.shape[-1] + 1
            gram = t.new_zeros(F1, F1, dtype=torch.float64) if gram is None else gram
            if batches.where is not None:
                batches.where.all_sum(gram)
                total = torch.tensor([float(n)], dtype=torch.float64)
                n = int(batches.where.all_sum(total)[0])
            counted[0] = n
            return _gram_root(gram).to(theta.dtype).unsqueeze(0)

    return stacked


def _gram_root(gram: Tensor) -> Tensor:
    """R with R Rᵀ = gram, r's row last (see ``normal_rows``)."""
    F = gram.shape[0] - 1
    A, b, c = gram[:F, :F], gram[:F, F], gram[F, F]
    L, info = torch.linalg.cholesky_ex(A)
    if int(info) != 0:  # JᵀJ singular: an eigen square root of it (LM's damping copes)
        values, vectors = torch.linalg.eigh(A)
        L = vectors * values.clamp_min(0).sqrt()
        w = torch.linalg.lstsq(L, b.unsqueeze(-1)).solution.squeeze(-1)
    else:
        w = torch.linalg.solve_triangular(L, b.unsqueeze(-1), upper=False).squeeze(-1)
    s = (c - w @ w).clamp_min(0).sqrt()
    root = gram.new_zeros(F + 1, F + 1)
    root[:F, :F], root[F, :F], root[F, F] = L, w, s
    return root


def run_lm_streamed(
    batches: StreamedBatches,
    like: Problem,
    start: Tensor,
    *,
    max_iter: int | None,
    tol: float | None,
) -> LoopOutcome:
    """Levenberg–Marquardt (``optim/lm.py``) over every row group, one pass per iteration."""
    from gradfit.optim.least_squares import _message, _status
    from gradfit.optim.lm import DEFAULT_MAX_ITER, levenberg_marquardt

    loss = like.loss
    if loss.name not in ("mse", "sse", "chi2"):
        raise OptionError(
            f"lm over streamed data takes a plain least-squares loss (mse, sse, chi2), not "
            f"{loss.name!r}"
        )
    counted = [0]  # rows in the last pass (--nan-policy omit drops some)
    history: list[float] = []

    def to_loss() -> float:
        return 2.0 if loss.reduction == "sum" else 2.0 / max(counted[0], 1)

    def callback(iteration: int, cost: Tensor) -> bool:
        history.append(float(cost[0]) * to_loss())
        return False

    def no_residuals(theta: Tensor) -> Tensor:
        raise AssertionError("streamed LM runs without geodesic acceleration")

    options: dict[str, Any] = {} if tol is None else {"ftol": tol}
    result = levenberg_marquardt(
        no_residuals, start.detach().unsqueeze(0), stacked=normal_rows(batches, like, counted),
        geodesic=False, callback=callback, max_iter=max_iter or DEFAULT_MAX_ITER, **options,
    )  # fmt: skip
    code = int(result.status[0])
    theta = result.theta[0].detach().clone()
    return LoopOutcome(
        theta, float(result.cost[0]) * to_loss(), history, _status(code),
        _message(code, tol, len(history)), n_eval=int(result.n_eval),
    )  # fmt: skip
