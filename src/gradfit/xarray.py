"""xarray's way in: ``import gradfit.xarray`` registers ``DataArray.gradfit``.

``cube.gradfit.fit(model, dim="t")`` fits every 1-D slice of ``cube`` along ``dim`` and returns
an ``xarray.Dataset`` over the other dimensions (their coordinates kept): one variable per
parameter, ``<param>_stderr``, ``loss``, ``reduced_chi2``, ``r2``, ``n_points``, ``n_iter``,
``status`` (names, as ``BatchResult.status_names``) and ``warnings`` (sentences, "" when fine).

NumPy- and Dask-backed cubes go through the same code: ``apply_ufunc(dask="parallelized")``
hands whole blocks (all of a NumPy cube) to one function, which runs ``fit_batch`` on the
block's curves at once (no ``vectorize``). A Dask-backed cube gives a lazy Dataset, fitted on
the active Dask scheduler when computed: compute it once (``ds.compute()``), not variable by
variable, or each variable fits the cube again. ``dim`` need not be in one chunk (it is
joined); blocks of 10^4-10^5 curves make good tasks.

Example:
    >>> import numpy as np, xarray as xr, gradfit.xarray
    >>> t = np.linspace(0, 4, 30)
    >>> k = xr.DataArray([0.5, 1.0, 2.0], dims="pixel", coords={"pixel": [10, 20, 30]})
    >>> cube = 3 * np.exp(-k * xr.DataArray(t, dims="t", coords={"t": t}))
    >>> ds = cube.gradfit.fit("a*exp(-k*t)", dim="t")
    >>> ds["k"].values.round(6).tolist(), ds["status"].values.tolist()
    ([0.5, 1.0, 2.0], ['converged', 'converged', 'converged'])
    >>> ds["k"].dims, ds["pixel"].values.tolist()
    (('pixel',), [10, 20, 30])
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Hashable, Mapping
from typing import Any, cast

import numpy as np
import xarray as xr

from gradfit.batch import dask_arrays
from gradfit.errors import DataError, OptionError, unknown_name
from gradfit.model.models import Model, as_model
from gradfit.options import FitOptions, options_from

_COLUMN = "gradfit_column"  # the stacked table's column axis, split into variables at the end
_BLOCK_OPTIONS = ("chunk_size", "memory_budget")  # fit_batch keywords that are not FitOptions


_register: Any = xr.register_dataarray_accessor  # untyped in xarray


@_register("gradfit")
class GradfitAccessor:
    """``DataArray.gradfit``: fits along a dimension (see the module)."""

    def __init__(self, data: xr.DataArray) -> None:
        self._data = data

    def fit(
        self,
        model: Model | str | Callable[..., Any],
        dim: Hashable | None = None,
        p0: Mapping[str, Any] | Any = None,
        x: Any = None,
        **fit_options: Any,
    ) -> xr.Dataset:
        """``gradfit.xarray.fit(this DataArray, model, dim, ...)``."""
        return fit(self._data, model, dim, p0=p0, x=x, **fit_options)


def fit(
    data: xr.DataArray,
    model: Model | str | Callable[..., Any],
    dim: Hashable | None = None,
    *,
    p0: Mapping[str, Any] | Any = None,
    x: Any = None,
    sigma: Any = None,
    options: FitOptions | None = None,
    **fit_options: Any,
) -> xr.Dataset:
    """Fit ``model`` to every 1-D slice of ``data`` along ``dim``.

    Args:
        data: a NumPy- or Dask-backed ``DataArray``; NaN marks a missing point.
        model: a ``Model``, expression, built-in name or function, as ``fit_batch`` takes it;
            an expression may be written in ``dim``'s name (``"a*exp(-k*t)"`` along ``t``).
        dim: the dimension to fit along (default: the only one of a 1-D array).
        p0: ``{name: value}`` (a value may be a DataArray over the other dimensions: a start
            per slice, then every parameter needs one), a vector ``[P]``, or None (the
            built-in's guess per slice, else ones).
        x: the independent variable: default ``dim``'s coordinate; else ``[N]`` values or a
            DataArray along ``dim`` (and maybe other dimensions: x per slice).
        sigma: per-point standard deviations: a number, ``[N]`` or a DataArray along ``dim``.
        options, fit_options: ``fit_batch``'s options (``loss``, ``optimizer``, ``bounds``,
            ``fixed``, ``ties``, ``epochs``, ``tol``, ``chunk_size`` ...).

    Returns:
        A Dataset over ``data``'s other dimensions (see the module); ``attrs`` name the
        model, optimizer, loss and fixed parameters. Lazy when ``data`` is Dask-backed.
    """
    if not isinstance(data, xr.DataArray):
        raise DataError(f"gradfit.xarray.fit needs an xarray.DataArray, got {type(data).__name__}")
    dim = _fit_dim(data, dim)
    if not np.issubdtype(data.dtype, np.number) or np.issubdtype(data.dtype, np.complexfloating):
        raise DataError(f"the values to fit must be real numbers, got dtype {data.dtype}")
    model = _model(model, dim)
    per_slice, p0 = _split_p0(p0, model, data, dim)
    opts = _options(options, p0, fit_options)
    block = {k: fit_options[k] for k in _BLOCK_OPTIONS if k in fit_options}
    names = model.param_names  # tied parameters come back as columns too
    from gradfit.batch.fit_batch import batch_optimizer

    optimizer = batch_optimizer(opts)
    inputs: list[xr.DataArray] = [data]
    core: list[list[Hashable]] = [[dim]]
    labels: list[str] = []
    shared: dict[str, Any] = {}
    for name, value in (("x", _x_values(data, dim, x)), ("sigma", sigma)):
        if isinstance(value, xr.DataArray) and set(value.dims) != {dim}:
            if dim not in value.dims:  # one value per slice: the same at every point
                value = value.expand_dims({dim: data.sizes[dim]}, axis=-1)
            inputs.append(value)
            core.append([dim])
            labels.append(name)
        else:
            shared[name] = _along(value, data, dim, name)
    for name, value in per_slice.items():
        inputs.append(value)
        core.append([])
        labels.append(f"p0:{name}")
    lazy = any(dask_arrays.is_lazy(v.data) for v in inputs)
    if lazy:  # a slice is fitted whole, in one task
        inputs = [v.chunk({dim: -1}) if dim in v.dims and v.chunks else v for v in inputs]
    table = xr.apply_ufunc(
        _fit_cube, *inputs, input_core_dims=core, output_core_dims=[[_COLUMN]],
        dask="parallelized", output_dtypes=[np.float64],
        dask_gufunc_kwargs={"output_sizes": {_COLUMN: dask_arrays.width(len(names))}},
        kwargs={"labels": tuple(labels), "shared": shared, "model": model, "options": opts,
                "names": names, "one_thread": lazy, **block},
    )  # fmt: skip
    attrs = {"model": model.formula, "optimizer": optimizer, "loss": opts.loss_fn.name,
             "fixed": " ".join(n for n in names if n in (opts.fixed or {}))}  # fmt: skip
    return _dataset(table, names, attrs)


def _fit_dim(data: xr.DataArray, dim: Hashable | None) -> Hashable:
    if dim is None:
        if data.ndim != 1:
            raise OptionError(f"give dim=, the dimension to fit along: one of {list(data.dims)}")
        return data.dims[0]
    if dim not in data.dims:
        raise unknown_name("dimension", str(dim), [str(d) for d in data.dims])
    return dim


def _model(model: Model | str | Callable[..., Any], dim: Hashable) -> Model:
    """The model; an expression that reads ``dim``'s name (not x) takes it as its variable."""
    built = as_model(model)
    if isinstance(model, str) and dim != "x" and str(dim) in built.param_names:
        return Model(model, independent=str(dim))
    return built


def _options(options: FitOptions | None, p0: Any, fit_options: Mapping[str, Any]) -> FitOptions:
    valid = [f.name for f in dataclasses.fields(FitOptions)] + list(_BLOCK_OPTIONS)
    for key in fit_options:
        if key not in valid or key == "p0":
            raise unknown_name("fit option", key, [v for v in valid if v != "p0"])
    given = {k: v for k, v in fit_options.items() if k not in _BLOCK_OPTIONS}
    if options is not None and p0 is not None:
        return options_from(options, **given).replace(p0=p0)
    return options_from(options, p0=p0, **given)


def _split_p0(
    p0: Any, model: Model, data: xr.DataArray, dim: Hashable
) -> tuple[dict[str, xr.DataArray], Any]:
    """(per-slice starts as DataArrays by name, the rest as ``fit_batch`` takes it)."""
    if not isinstance(p0, Mapping) or not any(isinstance(v, xr.DataArray) for v in p0.values()):
        return {}, p0
    names = model.param_names
    for name in p0:
        if name not in names:
            raise unknown_name("parameter in p0", str(name), names)
    missing = [n for n in names if n not in p0]
    if missing:
        raise OptionError(
            f"p0 per slice (a DataArray) needs a start for every parameter; missing: "
            f"{', '.join(missing)}"
        )
    other = set(data.dims) - {dim}
    per_slice: dict[str, xr.DataArray] = {}
    for name in names:
        value = p0[name]
        value = value if isinstance(value, xr.DataArray) else xr.DataArray(float(value))
        if not set(value.dims) <= other:
            raise DataError(
                f"p0[{name!r}] has dimensions {list(value.dims)}; it may use only "
                f"{sorted(map(str, other))} (not the fitted {dim!r})"
            )
        per_slice[name] = value
    return per_slice, None


def _x_values(data: xr.DataArray, dim: Hashable, x: Any) -> Any:
    if x is not None:
        return x
    if dim not in data.coords:
        raise DataError(f"dimension {dim!r} has no coordinate to use as x: give x=")
    return data[dim]


def _along(value: Any, data: xr.DataArray, dim: Hashable, name: str) -> Any:
    """A shared ``x`` or ``sigma``: None, a number or ``[N]`` floats."""
    if value is None:
        return None
    array = np.asarray(value.values if isinstance(value, xr.DataArray) else value)
    if not (np.issubdtype(array.dtype, np.number) or array.dtype == bool):
        raise DataError(
            f"{name} must be numbers, got dtype {array.dtype}"
            + (" (give x= as numbers, e.g. seconds)" if name == "x" else "")
        )
    if array.ndim == 0 and name == "sigma":
        return float(array)
    if array.shape != (data.sizes[dim],):
        raise DataError(
            f"{name} must have one value per point along {dim!r} ({data.sizes[dim]}), "
            f"got shape {array.shape}"
        )
    return array.astype(np.float64)


def _fit_cube(
    y: np.ndarray,
    *extra: np.ndarray,
    labels: tuple[str, ...],
    shared: Mapping[str, Any],
    model: Model,
    options: FitOptions,
    names: tuple[str, ...],
    one_thread: bool,
    **block: Any,
) -> np.ndarray:
    """One block (a whole NumPy cube): ``[..., N]`` in, ``[..., 2P + 6]`` stacked results out."""
    shape, N = y.shape[:-1], y.shape[-1]

    def flat(values: np.ndarray, core: tuple[int, ...]) -> np.ndarray:
        if values.shape != shape + core:
            values = np.broadcast_to(values, shape + core)
        return cast(np.ndarray, dask_arrays.writable(values.reshape((-1, *core))))

    inputs = dict(shared)
    named = dict(zip(labels, extra, strict=True))
    for name in ("x", "sigma"):
        if name in named:
            inputs[name] = flat(named[name], (N,))
    if any(label.startswith("p0:") for label in labels):
        options = options.replace(p0=np.stack([flat(named[f"p0:{n}"], ()) for n in names], axis=-1))
    if one_thread:  # a Dask task: one torch thread per worker thread
        table = dask_arrays.fit_block(flat(y, (N,)), model=model, options=options, **inputs,
                                      **block)  # fmt: skip
    else:  # the whole NumPy cube: fit_batch's chunks side by side on every core
        from gradfit.batch.fit_batch import fit_batch

        result = fit_batch(model, y=flat(y, (N,)), options=options, **inputs, **block)
        assert not isinstance(result, dask_arrays.LazyBatchResult)
        table = dask_arrays.stack(result)
    return table.reshape(*shape, table.shape[-1])


def _dataset(table: xr.DataArray, names: tuple[str, ...], attrs: dict[str, str]) -> xr.Dataset:
    """The stacked table as variables: parameters, stderr, statistics, status, warnings."""
    P = len(names)
    variables: dict[str, xr.DataArray] = {}
    for j, name in enumerate(names):
        variables[name] = table.isel({_COLUMN: j})
    for j, name in enumerate(names):
        variables[f"{name}_stderr"] = table.isel({_COLUMN: P + j})
    for j, column in enumerate(dask_arrays.COLUMNS):
        values = table.isel({_COLUMN: 2 * P + j})
        if column in ("n_points", "n_iter"):
            values = values.astype(np.int64)
        if column != "status":
            variables[column] = values
    fixed = tuple(attrs["fixed"].split())
    for text in ("status", "warnings"):
        variables[text] = xr.apply_ufunc(
            _texts, table, input_core_dims=[[_COLUMN]], dask="parallelized",
            output_dtypes=[object],
            kwargs={"names": names, "fixed": fixed, "optimizer": attrs["optimizer"], "which": text},
        )  # fmt: skip
    return xr.Dataset(variables, attrs=attrs)


def _texts(
    table: np.ndarray,
    *,
    names: tuple[str, ...],
    fixed: tuple[str, ...],
    optimizer: str,
    which: str,
) -> np.ndarray:
    """Status names or warning sentences of a block of the stacked table."""
    shape = table.shape[:-1]
    result = dask_arrays.unstack(table.reshape(-1, table.shape[-1]), names, fixed=fixed,
                                 optimizer=optimizer)  # fmt: skip
    texts = result.status_names if which == "status" else result.warning_texts()
    return np.asarray(texts, dtype=object).reshape(shape)
