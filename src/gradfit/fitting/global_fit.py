"""``gradfit.fit_global``: one model fitted to several datasets, some parameters shared.

The datasets are stacked into one least-squares problem whose model evaluates the user's
model on each dataset's slice with that dataset's parameters, and ``gradfit.fit`` solves it:
one Levenberg–Marquardt fit (or any other optimizer) over the stacked residuals, and one
``FitResult`` whose statistics are those of the stacked problem.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from gradfit.errors import DataError, OptionError, unknown_name
from gradfit.fitting.fit import check_model_name, fit
from gradfit.io.tables import FitData, prepare_data
from gradfit.model.models import Model, Variables, as_model, check_uses_independent
from gradfit.options import FitOptions, options_from
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
    ``absolute_sigma``, as ``curve_fit``). The block structure of the Jacobian (each dataset
    depends only on its own and the shared parameters) is not exploited: the solver sees one
    dense problem with ``len(shared) + K * (P - len(shared))`` parameters.

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
    x, y, sigma = _stack(data, dtype)
    bounds = layout.expand("bounds", opts.bounds)
    fixed = layout.expand("fixed", opts.fixed)
    start = layout.start(p0, [_own_start(base, d, dtype) for d in data], dtype)
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
