"""``fit_batch`` on Dask arrays: one task per block of whole curves, a lazy result.

``y`` ``[K, N]`` chunked along the curves (the points of a curve in one chunk; several are
joined) becomes one ``blockwise`` task per block, which runs ``fit_batch`` on its curves and
returns them as one stacked float64 table ``[k, 2P + 6]`` (``stack``). ``meta=`` is always
given, so nothing is fitted in the client until ``compute()``. Blocks of 10^4-10^5 curves make
good tasks (a task's overhead is ~1 ms; a block is fitted in chunks sized as in ``fit_batch``).

In a task torch runs one intra-op thread (``one_torch_thread``): Dask already runs one task
per worker thread, and the client's setting is back as it was once the tasks are done.
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from gradfit.errors import DataError, OptionError, unknown_name
from gradfit.model.models import Model, as_model, check_uses_independent
from gradfit.options import FitOptions
from gradfit.results.batch_result import BatchResult

#: the table's columns after the P parameters and their P standard errors
COLUMNS = ("loss", "reduced_chi2", "r2", "n_points", "n_iter", "status")
_INTEGER = ("n_points", "n_iter", "status")
_threads_lock = threading.Lock()
_running = 0  # tasks inside one_torch_thread now, in any thread of this process
_saved_threads = 0  # torch's thread count before the first of them


def is_lazy(value: Any) -> bool:
    """A Dask collection (duck-typed: dask is not imported for the question)."""
    return hasattr(value, "__dask_graph__")


def width(n_params: int) -> int:
    """Columns of the stacked table of a model with ``n_params`` parameters."""
    return 2 * n_params + len(COLUMNS)


def stack(result: BatchResult) -> np.ndarray:
    """``[K, 2P + 6]`` float64: params, stderr, then ``COLUMNS`` (integers are exact)."""
    parts = [result.params, result.stderr] + [getattr(result, n)[:, None] for n in COLUMNS]
    return np.concatenate([p.detach().cpu().to(torch.float64).numpy() for p in parts], axis=1)


def unstack(
    table: np.ndarray,
    param_names: tuple[str, ...],
    *,
    optimizer: str = "lm",
    loss_name: str = "mse",
    fixed: tuple[str, ...] = (),
    dtype: torch.dtype = torch.float64,
) -> BatchResult:
    """The ``BatchResult`` a stacked table was made from (floats back in ``dtype``)."""
    P = len(param_names)
    values = torch.from_numpy(writable(np.ascontiguousarray(table, dtype=np.float64)))
    column = {name: values[:, 2 * P + j] for j, name in enumerate(COLUMNS)}
    n_points, n_iter, status = (column[name].to(torch.int64) for name in _INTEGER)
    return BatchResult(
        params=values[:, :P].to(dtype), stderr=values[:, P : 2 * P].to(dtype),
        loss=column["loss"].to(dtype), reduced_chi2=column["reduced_chi2"].to(dtype),
        r2=column["r2"].to(dtype), param_names=param_names, optimizer=optimizer,
        loss_name=loss_name, fixed=fixed, n_points=n_points, n_iter=n_iter, status=status,
    )  # fmt: skip


@contextmanager
def one_torch_thread() -> Iterator[None]:
    """One torch intra-op thread in this thread while inside (a Dask task), and torch's
    setting back as it was once the last task leaves: ``torch.set_num_threads`` also sets the
    count new threads start with, so a task's 1 must not outlive the tasks."""
    global _running, _saved_threads
    with _threads_lock:
        if _running == 0:
            _saved_threads = torch.get_num_threads()
        _running += 1
        saved = _saved_threads
    torch.set_num_threads(1)
    try:
        yield
    finally:
        with _threads_lock:
            _running -= 1
            torch.set_num_threads(saved)  # other tasks keep their own thread's 1


def fit_block(
    y: np.ndarray,
    x: Any,
    sigma: Any = None,
    mask: Any = None,
    p0: Any = None,
    *,
    model: Model,
    options: FitOptions,
    chunk_size: int | None = None,
    memory_budget: int | None = None,
) -> np.ndarray:
    """One task: ``fit_batch`` on a block of curves with one torch thread, stacked."""
    from gradfit.batch.fit_batch import fit_batch

    y, x, sigma, mask, p0 = (writable(v) for v in (y, x, sigma, mask, p0))
    if p0 is not None:
        options = options.replace(p0=p0)
    with one_torch_thread():
        result = fit_batch(model, x, y, sigma=sigma, mask=mask, options=options,
                           chunk_size=chunk_size, memory_budget=memory_budget)  # fmt: skip
    assert isinstance(result, BatchResult)  # NumPy blocks in, an eager result out
    return stack(result)


@dataclass
class LazyBatchResult:
    """What ``fit_batch`` returns for Dask input: ``BatchResult``'s arrays as Dask arrays.

    Nothing is fitted until ``compute()`` (a ``BatchResult``) or ``persist()``; reading
    ``params``, ``status`` ... gives lazy slices of one table, so compute them together
    (``dask.compute(r.params, r.status)``) or ``compute()`` once, not one by one.

    Example:
        >>> import dask.array as da, gradfit as gf
        >>> x = np.linspace(0, 1, 20)
        >>> Y = da.from_array(np.stack([2 * x + 1, -x + 3] * 3), chunks=(2, 20))
        >>> lazy = gf.fit_batch("a*x + b", x, Y)
        >>> lazy.params.shape, lazy.table.numblocks
        ((6, 2), (3, 1))
        >>> lazy.compute().params.numpy().round(6).tolist()[:2]
        [[2.0, 1.0], [-1.0, 3.0]]
    """

    table: Any  # dask array [K, 2P + 6] (see ``stack``)
    param_names: tuple[str, ...]
    optimizer: str = "lm"
    loss_name: str = "mse"
    fixed: tuple[str, ...] = ()
    dtype: torch.dtype = torch.float64

    def __len__(self) -> int:
        return int(self.table.shape[0])

    def _column(self, name: str) -> Any:
        column = self.table[:, 2 * len(self.param_names) + COLUMNS.index(name)]
        return column.astype(np.int64) if name in _INTEGER else column

    @property
    def params(self) -> Any:
        return self.table[:, : len(self.param_names)]

    @property
    def stderr(self) -> Any:
        P = len(self.param_names)
        return self.table[:, P : 2 * P]

    @property
    def loss(self) -> Any:
        return self._column("loss")

    @property
    def reduced_chi2(self) -> Any:
        return self._column("reduced_chi2")

    @property
    def r2(self) -> Any:
        return self._column("r2")

    @property
    def n_points(self) -> Any:
        return self._column("n_points")

    @property
    def n_iter(self) -> Any:
        return self._column("n_iter")

    @property
    def status(self) -> Any:
        return self._column("status")

    @property
    def converged(self) -> Any:
        """``[K]`` bool (lazy): the curve stopped on ftol, xtol or gtol."""
        status = self.status
        return (status >= 1) & (status <= 3)

    def compute(self, **kwargs: Any) -> BatchResult:
        """Run the fits (``kwargs`` go to ``dask.compute``: ``scheduler=`` ...)."""
        (table,) = _dask().compute(self.table, **kwargs)
        return self._result(table)

    def persist(self, **kwargs: Any) -> LazyBatchResult:
        """The same result with its table fitted and kept in (distributed) memory."""
        (table,) = _dask().persist(self.table, **kwargs)
        return LazyBatchResult(table, self.param_names, self.optimizer, self.loss_name,
                               self.fixed, self.dtype)  # fmt: skip

    def _result(self, table: np.ndarray) -> BatchResult:
        return unstack(table, self.param_names, optimizer=self.optimizer,
                       loss_name=self.loss_name, fixed=self.fixed, dtype=self.dtype)  # fmt: skip


def fit_lazy(
    model: Model | Any,
    x: Any,
    y: Any,
    *,
    sigma: Any,
    mask: Any,
    options: FitOptions,
    chunk_size: int | None,
    memory_budget: int | None,
    refused: Mapping[str, bool],
) -> LazyBatchResult:
    """``fit_batch`` for Dask inputs (see the module): checks what can be checked without
    the data, then builds the graph."""
    from gradfit.batch.fit_batch import _check_shapes, batch_optimizer
    from gradfit.model.parameters import ParameterSpace
    from gradfit.model.ties import apply_ties

    da = _dask("dask.array")
    given = [name for name, used in refused.items() if used]
    if given:
        raise OptionError(
            f"{', '.join(given)}: not available for Dask arrays (a lazy result); "
            "compute() it, then write or watch it"
        )
    model = as_model(model)
    check_uses_independent(model)
    optimizer = batch_optimizer(options)
    if options.loss_fn.name == "chi2" and sigma is None:
        raise OptionError("loss 'chi2' needs sigma (per-point standard deviations)")
    names, fitted = model.param_names, model
    if options.ties:
        fitted = apply_ties(model, options.ties, options.fixed, options.bounds).model
    ParameterSpace.build(fitted.param_names, options.bounds, options.fixed)
    y = da.asarray(y)
    if y.ndim != 2:
        raise DataError(f"y must be [K, N] (one row per curve), got shape {tuple(y.shape)}")
    if any(np.isnan(c) for c in y.chunks[0]):
        raise DataError(
            "y has blocks of unknown length (from a DataFrame?): call "
            "y.compute_chunk_sizes() or to_dask_array(lengths=True) first"
        )
    K, N = y.shape
    y = y.rechunk({1: -1})  # a curve is fitted whole, in one task
    x, sigma, mask = (v if v is None or is_lazy(v) else np.asarray(v) for v in (x, sigma, mask))
    _check_shapes(x, y, sigma, mask)
    p0 = options.p0
    if p0 is not None and not isinstance(p0, Mapping):
        p0 = p0 if is_lazy(p0) else np.asarray(p0, dtype=np.float64)
        if p0.shape not in ((len(names),), (K, len(names))):
            raise OptionError(
                f"p0 must be [P] or [K, P] with P = {len(names)}, K = {K}, got {tuple(p0.shape)}"
            )
    elif isinstance(p0, Mapping):
        for name in p0:
            if name not in names:
                raise unknown_name("parameter in p0", name, names)
    blocked: list[Any] = [y, "kn"]
    kwargs: dict[str, Any] = {}
    names_blocked: list[str] = []
    for name, value in (("x", x), ("sigma", sigma), ("mask", mask)):
        if value is None or not (is_lazy(value) or (value.shape[:1] == (K,) and value.ndim == 2)):
            kwargs[name] = value  # None, a number or shared by every curve: one copy
        elif value.ndim == 1:  # a lazy [N]
            blocked += [value.rechunk(-1), "n"]
            names_blocked.append(name)
        else:  # per curve: blocked like y
            blocked += [da.broadcast_to(value, (K, N)).rechunk(y.chunks), "kn"]
            names_blocked.append(name)
    if p0 is not None and not isinstance(p0, Mapping) and (is_lazy(p0) or len(p0.shape) == 2):
        if len(p0.shape) == 2:  # per curve: blocked like y
            blocked += [da.asarray(p0).rechunk((y.chunks[0], -1)), "kp"]
        else:  # a lazy [P]: one block, as shared as a NumPy one
            blocked += [p0.rechunk(-1), "p"]
        names_blocked.append("p0")
        options = options.replace(p0=None)
    table = da.blockwise(
        _fit_blocked, "kw", *blocked, new_axes={"w": width(len(names))}, concatenate=True,
        dtype=np.float64, meta=np.empty((0, 0), dtype=np.float64), model=model,
        options=options, chunk_size=chunk_size, memory_budget=memory_budget,
        blocked=tuple(names_blocked), **kwargs,
    )  # fmt: skip
    fixed = tuple(n for n in names if n in (options.fixed or {}))
    return LazyBatchResult(table, names, optimizer, options.loss_fn.name, fixed,
                           options.dtype or torch.float64)  # fmt: skip


def _fit_blocked(
    y: np.ndarray, *blocks: np.ndarray, blocked: tuple[str, ...], **kwargs: Any
) -> np.ndarray:
    """``fit_block`` with the blocked inputs (after ``y``) passed under their names."""
    named: dict[str, Any] = dict(zip(blocked, blocks, strict=True))
    return fit_block(y, **kwargs, **named)


def writable(value: Any) -> Any:
    """A read-only NumPy array (a broadcast, a memory map, an index) copied, as torch warns
    on those; anything else as it is."""
    if isinstance(value, np.ndarray) and not value.flags.writeable:
        return value.copy()
    return value


def _dask(module: str = "dask") -> Any:
    """Dask (an optional extra), imported when a lazy fit is made or computed; untyped."""
    return importlib.import_module(module)
