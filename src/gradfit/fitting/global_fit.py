"""``gradfit.fit_global``: one model fitted to several datasets, some parameters shared.

The datasets form one least-squares problem over the stacked residuals, and one
``FitResult`` whose statistics are those of the stacked problem. For LM on plain least
squares with an expression model, the block solver (``optim/block_lm.py`` through
``optim/shared_lm.py``) fits it: dataset i's residuals depend only on its own and the shared
parameters, so each iteration factors K small blocks and one shared one. Otherwise (another
optimizer or loss, a function model, per-dataset fixed values or bounds, a hook or
checkpoint) a stacked model evaluates the user's model on each dataset's slice and
``gradfit.fit`` solves the dense problem.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from gradfit.errors import DataError, OptionError, unknown_name
from gradfit.fitting.fit import check_model_name, fit
from gradfit.io.tables import FitData, prepare_data
from gradfit.model.models import Model, Variables, as_model, check_uses_independent
from gradfit.model.parameters import ParameterSpace
from gradfit.optim.problem import LoopOutcome, Problem
from gradfit.optim.shared_lm import PLAIN_LOSSES, SharedSolution, solve_shared
from gradfit.options import FitOptions, options_from
from gradfit.results import stats
from gradfit.results.fit_result import FitResult

Tensor = torch.Tensor

#: the keyword options of ``fit`` that ``FitOptions`` holds (the rest pass through as they are)
_OPTION_FIELDS = tuple(field.name for field in dataclasses.fields(FitOptions))


def fit_global(
    model: Model | str | Callable[..., Tensor] | nn.Module,
    datasets: Sequence[Sequence[Any]],
    *,
    shared: Sequence[str],
    p0: Mapping[str, float] | Sequence[float] | None = None,
    **fit_options: Any,
) -> FitResult:
    """Fit ``model`` to several datasets at once, with the ``shared`` parameters common to all.

    Every parameter not in ``shared`` takes one value per dataset, named ``<name>_<i>``
    (``i`` from 0, in the order of ``datasets``); the result's parameters are, in the model's
    order, each shared name or its copies ``name_0, name_1, ...``. The datasets are stacked
    into one problem and fitted by ``gradfit.fit``: one fit over all residuals, with the
    statistics of the stacked problem (the covariance scaled by the stacked χ²ᵣ unless
    ``absolute_sigma``, as ``curve_fit``). LM on mse/sse/chi2 with an expression model of one
    variable runs the block solver (each dataset depends only on its own and the shared
    parameters; the covariance is assembled from the blocks of (JᵀJ)⁻¹); anything else (see
    the module's docstring) one dense problem with ``len(shared) + K * (P - len(shared))``
    parameters through ``gradfit.fit``.

    Args:
        model: as for ``gradfit.fit`` (an expression, built-in name, ``Model``, function or
            ``nn.Module``); it is evaluated on each dataset separately.
        datasets: ``[(x, y), (x, y, sigma), ...]``, of any lengths. A dataset without sigma
            has unit weights when others have one (sigma = 1 for its points).
        shared: names of the model's parameters that take one value for every dataset
            (``[]``: the fits are independent, in one problem).
        p0: a mapping of base names (applied to every dataset's copy) and/or global names
            (``a_1``: one dataset's; these win), or a sequence in the global order. Default:
            each dataset's own start as in ``gradfit.fit`` (a module's or function's values,
            the built-in's guess, else ones), a shared parameter starting at their mean.
        fit_options: the options of ``gradfit.fit`` (``loss``, ``optimizer``, ``bounds``,
            ``fixed``, ``absolute_sigma``, ``nan_policy``, ``options=FitOptions(...)``, ...).
            ``bounds`` and ``fixed`` take base names (every copy) or global names (one copy;
            these win). ``nan_policy='omit'`` drops rows per dataset, before stacking.

    Example:
        >>> import torch, gradfit as gf
        >>> t = torch.linspace(0, 5, 30)
        >>> data = [(t, a * torch.exp(-0.7 * t)) for a in (1.0, 2.0)]
        >>> r = gf.fit_global("a*exp(-k*x)", data, shared=["k"], p0={"a": 1, "k": 1})
        >>> {name: round(value, 6) for name, value in r.params.items()}
        {'a_0': 1.0, 'a_1': 2.0, 'k': 0.7}
    """
    if isinstance(model, str):
        check_model_name(model)
    base = as_model(model)
    check_uses_independent(base)
    base_names = base.param_names
    shared_set = _check_shared(shared, base_names)
    opts = options_from(
        fit_options.pop("options", None),
        **{name: fit_options.pop(name) for name in _OPTION_FIELDS if name in fit_options},
    )
    if opts.p0 is not None and p0 is not None:
        raise OptionError("give p0 either to fit_global or in options=FitOptions(...), not both")
    p0 = opts.p0 if p0 is None else p0
    for name in ("x", "y", "sigma"):
        if name in fit_options:
            raise OptionError(f"fit_global takes its data in datasets, not as {name}=")
    dtype = opts.dtype or torch.float64
    data = [
        _prepare(i, item, base, opts.nan_policy, dtype, opts.device)
        for i, item in enumerate(datasets)
    ]
    if not data:
        raise OptionError("datasets is empty; give at least one (x, y) or (x, y, sigma)")

    layout = _Layout(base_names, shared_set, len(data))
    start = layout.start(p0, [_own_start(base, d, dtype) for d in data], dtype)
    if _blocks_apply(base, opts, fit_options, data, shared_set):
        result = _fit_in_blocks(base, layout, data, start, opts)
        result.n_omitted = sum(d.n_omitted for d in data)
        return result
    x, y, sigma = _stack(data, dtype)
    bounds = layout.expand("bounds", opts.bounds)
    fixed = layout.expand("fixed", opts.fixed)
    options = dataclasses.replace(
        opts, p0=start, bounds=bounds, fixed=fixed, nan_policy="raise", dtype=dtype
    )
    stacked = _stacked_model(base, layout, [d.n_points for d in data])
    result = fit(stacked, x, y, sigma=sigma, options=options, **fit_options)
    result.n_omitted = sum(d.n_omitted for d in data)  # dropped per dataset, before stacking
    return result


def _check_shared(shared: Sequence[str], names: tuple[str, ...]) -> frozenset[str]:
    listed = [shared] if isinstance(shared, str) else list(shared)
    for name in listed:
        if name not in names:
            raise unknown_name("shared parameter", str(name), names)
    return frozenset(listed)


def _prepare(
    i: int,
    item: Sequence[Any],
    base: Model,
    nan_policy: str,
    dtype: torch.dtype,
    device: torch.device | str | None,
) -> FitData:
    """One dataset validated as ``gradfit.fit`` validates its data, errors naming it."""
    if isinstance(item, Mapping) or not isinstance(item, Sequence) or len(item) not in (2, 3):
        raise OptionError(f"dataset {i} must be (x, y) or (x, y, sigma)")
    x, y, sigma = (*item, None) if len(item) == 2 else item
    n_y = _length(y)
    columns = dict(x) if isinstance(x, Mapping) else {"x": x}
    columns.update({} if sigma is None or _length(sigma) == 1 else {"sigma": sigma})
    for name, values in columns.items():
        n = _length(values)
        if n != n_y:
            raise OptionError(
                f"dataset {i}: {name} has {n} points and y has {n_y}; they must match"
            )
    try:
        data = prepare_data(
            x, y, sigma, independent=base.independent, nan_policy=nan_policy, dtype=dtype,
            device=device,
        )  # fmt: skip
    except DataError as error:
        raise DataError(f"dataset {i}: {error}") from None
    if data.y.dim() != 1 or data.n_points == 0:
        raise DataError(f"dataset {i}: y must be one non-empty curve, got shape {data.y.shape}")
    return data


def _length(values: Any) -> int:
    shape = getattr(values, "shape", None)
    if shape is not None:
        return int(shape[0]) if len(shape) else 1
    return len(values) if isinstance(values, Sequence) else 1


def _stack(data: list[FitData], dtype: torch.dtype) -> tuple[Variables, Tensor, Tensor | None]:
    first = data[0].x
    x: Variables
    if isinstance(first, Mapping):
        x = {k: torch.cat([d.x[k] for d in data if isinstance(d.x, Mapping)]) for k in first}
    else:
        x = torch.cat([d.x for d in data if isinstance(d.x, Tensor)])
    y = torch.cat([d.y for d in data])
    sigma = None
    if any(d.sigma is not None for d in data):
        sigma = torch.cat([torch.ones_like(d.y) if d.sigma is None else d.sigma for d in data])
    return x, y.to(dtype), sigma


def _own_start(base: Model, data: FitData, dtype: torch.dtype) -> Tensor:
    """The start ``gradfit.fit`` would take for this dataset alone (without p0)."""
    start = base.initial_params(dtype)
    if start is None:
        start = base.guess(data.x, data.y)
    if start is None:
        start = torch.ones(len(base.param_names), dtype=dtype)
    return start.detach().to(dtype=dtype, device=data.y.device).reshape(-1)


class _Layout:
    """The global parameter vector: base names, shared ones once, the others per dataset."""

    def __init__(self, base: tuple[str, ...], shared: frozenset[str], k: int) -> None:
        self.base, self.shared, self.k = base, shared, k
        self.names: list[str] = []
        #: per dataset, the global position of each base parameter
        self.index = [[0] * len(base) for _ in range(k)]
        for j, name in enumerate(base):
            copies = [name] if name in shared else [f"{name}_{i}" for i in range(k)]
            for i in range(k):
                self.index[i][j] = len(self.names) + (0 if name in shared else i)
            self.names.extend(copies)
        clash = sorted({n for n in self.names if self.names.count(n) > 1})
        if clash:
            raise OptionError(
                f"the global parameter name(s) {', '.join(clash)} would mean two parameters; "
                "rename the model's parameters"
            )

    def targets(self, kind: str, name: str) -> list[int]:
        """Global positions a key of p0/bounds/fixed refers to (base: every copy)."""
        if name in self.names:
            return [self.names.index(name)]
        if name in self.base:
            j = self.base.index(name)
            return sorted({self.index[i][j] for i in range(self.k)})
        raise unknown_name(f"parameter in {kind}", name, {*self.base, *self.names})

    def expand(self, kind: str, given: Mapping[str, Any] | None) -> dict[str, Any] | None:
        if given is None:
            return None
        out: dict[str, Any] = {}
        for name, value in given.items():  # base names first: every copy
            if name not in self.names:
                out.update({self.names[g]: value for g in self.targets(kind, name)})
        for name, value in given.items():  # then global names, which win
            if name in self.names:
                out[name] = value
        return out

    def start(self, p0: Any, own: list[Tensor], dtype: torch.dtype) -> Tensor:
        if p0 is not None and not isinstance(p0, Mapping):
            vector = torch.as_tensor(p0, dtype=dtype, device=own[0].device).reshape(-1)
            if vector.numel() != len(self.names):
                raise OptionError(
                    f"p0 has {vector.numel()} values; the global parameters are "
                    f"{len(self.names)}: {self.names}"
                )
            return vector.clone()
        sums = torch.zeros(len(self.names), dtype=dtype, device=own[0].device)
        counts = torch.zeros_like(sums)
        for i, values in enumerate(own):
            index = torch.tensor(self.index[i], device=sums.device)
            sums.index_add_(0, index, values)
            counts.index_add_(0, index, torch.ones_like(values))
        vector = sums / counts
        for name, value in (self.expand("p0", p0) or {}).items():
            vector[self.names.index(name)] = float(value)
        return vector


def _stacked_model(base: Model, layout: _Layout, lengths: list[int]) -> Model:
    """One model over the stacked data: ``base`` on each dataset's slice, its own params."""
    index = [torch.tensor(row) for row in layout.index]
    bounds: list[tuple[int, int]] = []
    for n in lengths:
        start = bounds[-1][1] if bounds else 0
        bounds.append((start, start + n))

    def stacked(x: Variables, params: Tensor) -> Tensor:
        parts = []
        for (lo, hi), rows in zip(bounds, index, strict=True):
            x_i = {k: v[lo:hi] for k, v in x.items()} if isinstance(x, Mapping) else x[lo:hi]
            parts.append(base(x_i, params[..., rows.to(params.device)]))
        return torch.cat(parts, dim=-1)

    model = Model(stacked, params=layout.names, independent=base.independent)
    shown = ", ".join(sorted(layout.shared)) or "none"
    model.formula = f"{base.formula} on {layout.k} datasets (shared: {shown})"
    model.name = model.formula
    return model


def _blocks_apply(
    base: Model,
    opts: FitOptions,
    extra: Mapping[str, Any],
    data: list[FitData],
    shared: frozenset[str],
) -> bool:
    """Whether the block solver (``optim/block_lm.py``) fits this problem: LM on plain least
    squares, an expression model of one variable (evaluated batched over the datasets), fixed
    values and bounds the same for every dataset (base names), nothing that needs the dense
    loop (a hook, a checkpoint, a progress bar, ties)."""
    if extra or opts.ties or base.expression is None or len(base.independent) != 1:
        return False
    try:
        optimizer = opts.resolve(batched=False)
    except OptionError:
        return False  # the dense path says why
    if optimizer != "lm" or opts.loss_fn.name not in PLAIN_LOSSES:
        return False
    if opts.loss_fn.name == "chi2" and all(d.sigma is None for d in data):
        return False  # the dense path refuses it with its own message
    names = set(base.param_names)
    if not all(set(given or ()) <= names for given in (opts.fixed, opts.bounds)):
        return False
    # a dataset too short for its own parameters makes the problem singular: the dense path
    # fits it as it always has (and warns)
    n_local = len(names - set(opts.fixed or ()) - shared)
    return all(d.n_points >= max(n_local, 1) for d in data)


def _fit_in_blocks(
    base: Model, layout: _Layout, data: list[FitData], start: Tensor, opts: FitOptions
) -> FitResult:
    """``fit_global`` by the block solver: the datasets padded into one ``[K, N_max]`` batch,
    the statistics assembled from the blocks of (JᵀJ)⁻¹ into the usual ``FitResult``."""
    K, dtype = layout.k, start.dtype
    index = torch.tensor(layout.index, device=start.device)  # [K, P] global positions
    padded = _padded(data, dtype)
    space = ParameterSpace.build(base.param_names, opts.bounds, opts.fixed)
    per_group = start[index]  # [K, P]
    space.check_start(per_group)
    solution = solve_shared(
        base, padded, per_group, layout.shared, space, max_iter=opts.epochs, tol=opts.tol
    )
    mask = padded["mask"]
    assert mask is not None and bool(solution.fitted.all())  # every dataset has enough points
    global_space = ParameterSpace.build(
        layout.names, layout.expand("bounds", opts.bounds), layout.expand("fixed", opts.fixed)
    )
    params = start.new_empty(len(layout.names))
    params[index.reshape(-1)] = solution.params.reshape(-1)
    # the global positions of the block covariance's rows: locals group by group, then shared
    order = [layout.index[i][j] for i in range(K) for j in solution.local]
    order += [layout.index[0][j] for j in solution.shared]
    scale = 1.0 if opts.absolute_sigma else solution.reduced_chi2
    P = len(layout.names)
    cov = params.new_zeros(P, P)
    cov[[[i] for i in order], order] = solution.covariance.covariance() * scale
    x, y, sigma = _stack(data, dtype)
    r = solution.residuals[mask]
    y_pred = y + (r if sigma is None else r * sigma)
    fit_stats = stats.goodness(y, y_pred, r, len(order))
    loss_fn = opts.loss_fn.with_options(sigma=sigma)
    to_loss = 2.0 if loss_fn.reduction == "sum" else 2.0 / y.shape[0]
    solver = solution.solver
    outcome = LoopOutcome(
        params, solver.cost * to_loss, [c * to_loss for c in solver.history],
        solution.status, solution.message(opts.tol), n_eval=solver.n_eval,
    )  # fmt: skip
    model = _stacked_model(base, layout, [d.n_points for d in data])
    assert isinstance(x, Tensor)  # the block path takes one independent variable
    problem = Problem(model, x, y, loss_fn, global_space)
    return FitResult.build(
        model=model, problem=problem, params=params, covariance=cov, outcome=outcome,
        optimizer="lm", statistics=fit_stats, n_omitted=0, absolute_sigma=opts.absolute_sigma,
        start=start, estimability=_estimability(cov, order, global_space, solution),
    )  # fmt: skip


def _padded(data: list[FitData], dtype: torch.dtype) -> dict[str, Tensor | None]:
    """The datasets as one NaN-free ``[K, N_max]`` batch and its mask (padding repeats a
    dataset's first x, so the model stays finite there)."""
    K, N = len(data), max(d.n_points for d in data)
    device = data[0].y.device
    x = torch.zeros(K, N, dtype=dtype, device=device)
    y = torch.zeros_like(x)
    sigma = torch.ones_like(x) if any(d.sigma is not None for d in data) else None
    mask = torch.zeros(K, N, dtype=torch.bool, device=device)
    for i, d in enumerate(data):
        assert isinstance(d.x, Tensor)
        n = d.n_points
        x[i] = d.x[0]
        x[i, :n], y[i, :n], mask[i, :n] = d.x, d.y, True
        if sigma is not None and d.sigma is not None:
            sigma[i, :n] = d.sigma
    return {"x": x, "y": y, "sigma": sigma, "mask": mask}


def _estimability(
    cov: Tensor, order: list[int], space: ParameterSpace, solution: SharedSolution
) -> stats.Estimability:
    """What ``diagnose`` reads, from the blocks: a free parameter is estimable where its
    variance is finite, without effect where its Jacobian column is zero. No SVD of the
    stacked Jacobian is taken, so parameters that cannot be told apart are named one by one
    (no singular directions are given to group them)."""
    blocks = solution.covariance
    column2 = torch.cat([blocks.normal_local.reshape(-1), blocks.normal_shared])
    position = {g: k for k, g in enumerate(order)}
    free = [position[g] for g in space.free]  # the global free order
    variance = cov.diagonal()[space.free]
    no_effect = ~(column2[free].isfinite() & (column2[free] > 0))
    estimable = variance.isfinite() & ~no_effect
    covariance = cov[space.free][:, space.free].numpy(force=True)
    return stats.Estimability(
        covariance=covariance, estimable=estimable.numpy(force=True),
        no_effect=no_effect.numpy(force=True), singular_values=np.ones(0),
        vh=np.zeros((0, len(free))),
    )  # fmt: skip
