"""Many independent fits at once: the same model, loss and solver with a leading batch axis.

Curves are processed in chunks sized to a memory budget; each chunk is one call of the
batched Levenberg–Marquardt kernel (the one ``gradfit.fit`` runs with K = 1), or of the
post's first-order loop with a curve axis (``batch_first_order``), so curve i of a batch gets
the answer ``fit`` gives for curve i alone. Inputs are converted chunk by chunk; on a
multi-core CPU chunks run side by side.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch
from torch import nn

from gradfit.batch.first_order import fit_first_order
from gradfit.batch.linalg import MAX_P, cholesky, cholesky_inverse
from gradfit.batch.malloc import release_freed_memory, reuse_freed_memory
from gradfit.batch.stream import ResultStream
from gradfit.errors import DataError, OptionError, unknown_name
from gradfit.model.losses import Loss
from gradfit.model.models import Model, as_model, check_uses_independent
from gradfit.model.parameters import Bound, ParameterSpace
from gradfit.model.ties import Tied, apply_ties, reduce_p0, tied_values
from gradfit.optim import FIRST_ORDER
from gradfit.optim.dispatch import lm_kernel
from gradfit.optim.least_squares import linear_in_params, residual_functions, residual_subset
from gradfit.optim.lm import autodiff_jacobian, levenberg_marquardt, stack_jacobian
from gradfit.optim.masks import all_valid, count_valid
from gradfit.optim.problem import Problem
from gradfit.options import FitOptions, options_from
from gradfit.results.batch_result import NO_DATA, TOO_FEW_POINTS, BatchResult, concat

if TYPE_CHECKING:
    from gradfit.batch.dask_arrays import LazyBatchResult
    from gradfit.optim.compiled.bridge import Columns, CompiledFit

Tensor = torch.Tensor
# Bytes of working memory per chunk on the CPU: measured here, chunks of a few thousand curves
# run fastest (larger ones fall out of cache: 30,000 Gaussian curves per chunk ran 1.5x slower).
CPU_MEMORY = 64 * 2**20
# Every TRIM_EVERY chunks the heap's free pages go back to the system: trimming after every
# chunk cost up to 25% in page faults; never trimming let fragments of differently sized
# blocks pile up (~6 MB a chunk, so 10^7 curves would have kept gigabytes).
TRIM_EVERY = 8
COMPILED_CHUNK = 1 << 17  # the most curves in one chunk for the compiled kernel
GPU_MEMORY_FRACTION = 0.125  # of the device's free memory: one chunk fills the GPU
ChunkHook = Callable[[int, int], None]  # (curves done, curves total)
_threads_lock = threading.Lock()
_side_by_side_runs = 0  # fit_batch calls running chunks side by side now (in any thread)
_saved_threads = 0  # torch's intra-op thread count before the first of them
_pools: dict[int, ThreadPoolExecutor] = {}  # chunk threads by their number (``_pool``)
_pools_pid = os.getpid()


def fit_batch(
    model: Model | str | Callable[..., Tensor] | nn.Module,
    x: Any,
    y: Any,
    *,
    sigma: Any = None,
    mask: Any = None,
    p0: Any = None,
    bounds: Mapping[str, Bound] | None = None,
    fixed: Mapping[str, float] | None = None,
    ties: Mapping[str, str] | None = None,
    loss: str | Loss = "mse",
    f_scale: float = 1.0,
    optimizer: str = "auto",
    lr: float | None = None,
    epochs: int | None = None,
    tol: float | None = None,
    absolute_sigma: bool = False,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    chunk_size: int | None = None,
    memory_budget: int | None = None,
    progress: bool = False,
    on_chunk: Callable[[int, BatchResult], None] | None = None,
    skip_chunk: Callable[[int, int], bool] | None = None,
    out: str | Path | None = None,
    options: FitOptions | None = None,
) -> BatchResult | LazyBatchResult:
    """Fit ``model`` to each row of ``y`` ``[K, N]`` independently.

    Args:
        x: ``[N]`` shared by all curves or ``[K, N]``.
        y: ``[K, N]``; NaN marks a missing point (as does ``mask=False``), so curves of
            unequal length share one padded batch.
        sigma: ``[K, N]``, ``[N]`` or a number.
        mask: ``[K, N]`` bool, True where a point is valid.
        p0: one vector ``[P]``, per-curve ``[K, P]``, a mapping name -> value, or None (the
            built-in's vectorised guess, else ones).
        optimizer: ``auto`` (default: ``lm`` for least-squares losses, else ``adam``; see
            ``FitOptions.resolve``), ``lm``, or the first-order ``gd``, ``sgd``, ``adam`` (any
            named loss, ``lr`` as in ``fit``, 15,000 epochs unless ``epochs``). ``lbfgs`` is
            not batched.
        lr: learning rate of a first-order optimizer (default as in ``fit``).
        ties: ``{name: expression}`` as in ``fit``: the tied parameters are substituted away
            and come back as columns (values and delta-method stderr per curve).
        options: a ready ``FitOptions`` instead of the keyword options (not both).
        chunk_size: curves per chunk; default from ``memory_budget`` bytes (default: a few
            thousand curves on the CPU; on the compiled kernel ~20,000 of 100 points, or up
            to 131,072 where it reads the inputs in place; an eighth of the free memory of a
            GPU).
        on_chunk: called with (first curve index, chunk result) as each chunk finishes.
        skip_chunk: called with (start, stop); True skips that chunk (resuming a run). It is
            asked just before the chunk runs (maybe on a worker thread) and again before its
            result is kept, so that a stop request drops chunks still in flight.
        out: a ``.parquet`` or ``.csv`` file that receives each chunk's rows as it finishes
            (with a ``curve`` index column); it appears only once every chunk is in (not if
            a chunk was skipped), and an existing file is replaced only then.

    Returns:
        A ``BatchResult``; for a Dask array ``y`` (or x, sigma, mask, p0) a
        ``LazyBatchResult`` (``batch/dask_arrays.py``): one task per block of curves (the
        points of a curve in one chunk), nothing fitted until its ``compute()``.

    Example:
        >>> import gradfit as gf
        >>> x = torch.linspace(0, 1, 20, dtype=torch.float64)
        >>> Y = torch.stack([2 * x + 1, -x + 3])
        >>> result = gf.fit_batch("a*x + b", x, Y)
        >>> result.params.round(decimals=6).tolist(), result.converged.tolist()
        ([[2.0, 1.0], [-1.0, 3.0]], [True, True])
    """
    opts = options_from(
        options, loss=loss, f_scale=f_scale, optimizer=optimizer, lr=lr, epochs=epochs,
        tol=tol, p0=p0, bounds=bounds, fixed=fixed, ties=ties, absolute_sigma=absolute_sigma,
        dtype=dtype, device=device,
    )  # fmt: skip
    if any(hasattr(v, "__dask_graph__") for v in (x, y, sigma, mask, opts.p0)):
        from gradfit.batch.dask_arrays import fit_lazy  # Dask arrays: one task per block

        refused = {"progress": progress, "on_chunk": on_chunk is not None,
                   "skip_chunk": skip_chunk is not None, "out": out is not None}  # fmt: skip
        return fit_lazy(model, x, y, sigma=sigma, mask=mask, options=opts, chunk_size=chunk_size,
                        memory_budget=memory_budget, refused=refused)  # fmt: skip
    model = as_model(model)
    tied = None
    if opts.ties:  # the tied parameters substituted away: a smaller expression model
        tied = apply_ties(model, opts.ties, opts.fixed, opts.bounds)
        model, opts = tied.model, opts.replace(p0=reduce_p0(tied, opts.p0))
    dtype, device, p0 = opts.dtype or torch.float64, opts.device, opts.p0
    loss_fn = opts.loss_fn
    optimizer = batch_optimizer(opts)
    lr, tol, absolute_sigma = opts.learning_rate(optimizer), opts.tol, opts.absolute_sigma
    epochs, f_scale = opts.epoch_limit(optimizer), opts.f_scale
    if loss_fn.name == "chi2" and sigma is None:
        raise OptionError("loss 'chi2' needs sigma (per-point standard deviations)")
    # The inputs stay as given (views, no copies): each chunk is converted when it is fitted,
    # so the working memory is a chunk's, however many curves there are.
    x, y, sigma, mask = (_as_array(v) for v in (x, y, sigma, mask))
    K, N = _check_shapes(x, y, sigma, mask)
    check_uses_independent(model)
    if device is None and isinstance(y, Tensor):
        device = y.device  # tensors given on a device are fitted there
    if p0 is not None and not isinstance(p0, Mapping):
        p0 = _as_array(p0)
        if len(p0.shape) == 2 and p0.shape[0] != K:
            raise OptionError(f"p0 has {p0.shape[0]} rows for {K} curves; give [P] or [K, P]")
    space = ParameterSpace.build(model.param_names, opts.bounds, opts.fixed)

    def tensors(start: int, stop: int, check_y: bool = True) -> dict[str, Tensor | None]:
        x_k, y_k, sigma_k, mask_k = (_rows(v, start, stop, K) for v in (x, y, sigma, mask))
        return _batch_tensors(x_k, y_k, sigma_k, mask_k, dtype, device, start, check_y)

    compiled = (
        optimizer == "lm"
        and K > 0
        and _compiled_kernel_fits(
            model, tensors(0, 1), space, loss_fn.with_options(f_scale=f_scale), dtype
        )
    )
    # a start that does not read the data (given, or no guess) and no ties (whose
    # statistics use the mask) leave finding the missing y to the kernel's own pass over y
    check_y = not compiled or tied is not None or (_guessed(p0) and model.guess_fn is not None)
    # the compiled kernel reads the inputs as they are, unless a mask, sigma, a per-curve x,
    # another dtype or a y to check needs converted copies
    in_place = compiled and not check_y and mask is None and sigma is None and len(x.shape) == 1
    in_place &= str(y.dtype) in ("float64", "torch.float64")
    chunk = chunk_size or _balanced(
        default_chunk_size(N, len(model.param_names), device, memory_budget, compiled, in_place),
        K, device,
    )  # fmt: skip
    chunks = [(start, min(start + chunk, K)) for start in range(0, K, chunk)]
    # the compiled kernel fills the batch's own arrays, chunk by chunk (see _joined)
    columns = _columns(K, space) if compiled and tied is None else None

    if sigma is not None:  # a bad sigma fails before any curve is fitted
        for start, stop in chunks:
            tensors(start, stop)

    def skipped(bounds: tuple[int, int]) -> bool:
        return skip_chunk is not None and skip_chunk(*bounds)

    def fit_chunk(bounds: tuple[int, int]) -> BatchResult | None:
        if skipped(bounds):  # asked as late as possible: a stop request skips what is left
            return None
        start, stop = bounds
        rows = columns.rows(start, stop) if columns is not None else None
        return _fit_chunk(model, tensors(start, stop, check_y), p0, start, stop, space, loss_fn,
                          f_scale, optimizer, lr, epochs, tol, absolute_sigma, tied,
                          rows)  # fmt: skip

    results = []
    stream = ResultStream(out) if out is not None else None
    with (
        stream or contextlib.nullcontext(),
        _progress(progress, K) as advance,
        reuse_freed_memory(),
        _chunk_map(torch.device(device or "cpu"), len(chunks)) as chunk_map,
    ):
        for (start, stop), result in zip(chunks, chunk_map(fit_chunk, chunks), strict=True):
            # a chunk that finished alongside one after which a stop was asked is dropped, as
            # if it had not run
            if result is not None and not skipped((start, stop)):
                if on_chunk is not None:
                    on_chunk(start, result)
                if stream is not None:
                    result.keys, result.key_name = np.arange(start, stop), "curve"
                    stream.write(result.to_arrow())
                results.append(result)
            if (start // chunk) % TRIM_EVERY == TRIM_EVERY - 1:
                release_freed_memory()
            advance(stop - start)
        joined = (
            _joined(results, chunks, columns) if results else _empty(model, space, loss_fn, tied)
        )
        if stream is not None:
            if not chunks:
                stream.write(joined.to_arrow())
            stream.finish(complete=len(results) == len(chunks))
    return joined


def batch_optimizer(options: FitOptions) -> str:
    """The optimizer ``fit_batch`` runs for ``options``, or a clear refusal."""
    optimizer = options.resolve(batched=True)
    loss = options.loss_fn
    if loss.custom is not None:
        raise OptionError(
            f"fit_batch needs a named loss (mse, sse, chi2, mae, huber, soft_l1, cauchy, arctan), "
            f"not the callable {loss.name!r}; gradfit.fit takes it curve by curve"
        )
    return optimizer


@contextmanager
def _chunk_map(device: torch.device, n_chunks: int) -> Iterator[Callable[..., Iterator[Any]]]:
    """``map`` over chunks, in order: on a multi-core CPU, one chunk per core at a time.

    Within a chunk most operations are small (per-curve vectors, 4x4 factorisations) and run
    on one core whatever torch's thread count; chunks side by side keep every core busy
    (measured: 1.1-1.4x the throughput of one chunk at a time on all cores).
    """
    global _side_by_side_runs, _saved_threads
    with _threads_lock:
        workers = _cpu_workers()
        side_by_side = device.type == "cpu" and workers >= 2 and n_chunks >= 2
        if side_by_side:
            if _side_by_side_runs == 0:  # the first of concurrent runs saves torch's setting
                _saved_threads = workers
                torch.set_num_threads(1)  # new threads read it on their first parallel op
            _side_by_side_runs += 1
    if not side_by_side:
        yield map
        return
    with _threads_lock:
        pool = _pool(workers)
    submitted: list[Future[Any]] = []

    def ordered_map(fn: Callable[[Any], Any], items: list[Any]) -> Iterator[Any]:
        futures = [pool.submit(fn, item) for item in items]
        submitted.extend(futures)  # all of this run's, to cancel or wait for at the end
        return (future.result() for future in futures)  # this call's results alone

    try:
        yield ordered_map
    finally:  # an early stop: chunks not started are dropped, running ones finish first
        for future in submitted:
            future.cancel()
        wait(submitted)
        with _threads_lock:
            _side_by_side_runs -= 1
            if _side_by_side_runs == 0:  # the last one restores it
                torch.set_num_threads(_saved_threads)


def _pool(workers: int) -> ThreadPoolExecutor:
    """Chunk threads kept from call to call (hold ``_threads_lock``): starting two threads
    cost 3-7 ms on this busy machine, a quarter of a 10,000-curve linear batch's time."""
    global _pools_pid
    if _pools_pid != os.getpid():  # a forked child inherits the pools but not their threads
        _pools.clear()
        _pools_pid = os.getpid()
    pool = _pools.get(workers)
    if pool is None:
        pool = _pools[workers] = ThreadPoolExecutor(workers, thread_name_prefix="gradfit-chunk")
    return pool


def _cpu_workers() -> int:
    """Threads for chunks side by side: torch's thread count, as it was before any run that
    is now running side by side set it to 1."""
    return _saved_threads if _side_by_side_runs else torch.get_num_threads()


def _as_array(value: Any) -> Any:
    """Tensors and NumPy arrays as they are (no copy); anything else as a NumPy array."""
    if value is None or isinstance(value, Tensor | np.ndarray):
        return value
    return np.asarray(value)


_BOOL = ("bool", "torch.bool")  # a mask's dtype, as NumPy and torch name it


def _check_shapes(x: Any, y: Any, sigma: Any, mask: Any) -> tuple[int, int]:
    """(K, N) from ``y``, after checking every input's shape against it."""
    if len(y.shape) != 2:
        raise DataError(f"y must be [K, N] (one row per curve), got shape {tuple(y.shape)}")
    K, N = y.shape
    if tuple(x.shape) not in ((N,), (K, N)):
        raise DataError(f"x must be [N] or [K, N] like y {(K, N)}, got {tuple(x.shape)}")
    if mask is not None and (tuple(mask.shape) != (K, N) or str(mask.dtype) not in _BOOL):
        raise DataError(
            f"mask must be a bool array of shape {(K, N)}, got {mask.dtype} {tuple(mask.shape)}"
        )
    if sigma is not None:
        try:
            fits = np.broadcast_shapes(tuple(sigma.shape), (K, N)) == (K, N)
        except ValueError:
            fits = False
        if not fits:
            raise DataError(f"sigma must be [K, N], [N] or a number, got {tuple(sigma.shape)}")
    return K, N


def _rows(value: Any, start: int, stop: int, K: int) -> Any:
    """Curves ``start:stop`` of a per-curve ``[K, ...]`` input; a shared one as it is."""
    if value is None or len(value.shape) < 2 or value.shape[0] != K:
        return value
    return value[start:stop]


def _batch_tensors(
    x: Any,
    y: Any,
    sigma: Any,
    mask: Any,
    dtype: torch.dtype,
    device: Any,
    first: int = 0,
    check_y: bool = True,
) -> dict[str, Tensor | None]:
    """One chunk's tensors (shapes checked already): NaN/inf folded into the mask, masked
    points filled with harmless values. ``first`` is the chunk's first curve, for messages.

    Without ``check_y`` (the compiled kernel fits the chunk, its start does not read y), y is
    taken as it is: the kernel leaves out non-finite values itself, in the pass over y it
    makes anyway, and fit_batch then marks curves left with too few points. This check was a
    second pass over y from memory, a tenth of a straight line's fit."""
    y_t = _tensor(y, dtype, device)
    K, N = y_t.shape
    x_t = _tensor(x, dtype, device)
    if mask is None and sigma is None and x_t.dim() == 1 and _finite(y_t if check_y else None, x_t):
        # the common case, every point valid (or y left to the kernel): checked by one sum,
        # no copy, no [K, N] mask
        every = torch.ones((), dtype=torch.bool, device=y_t.device).expand(K, N)
        return {"x": x_t, "y": y_t, "sigma": None, "mask": every}
    valid = torch.isfinite(y_t) & torch.isfinite(x_t)
    if mask is not None:
        valid &= torch.as_tensor(mask, device=device)
    s_t = None
    if sigma is not None:
        s_t = _tensor(sigma, dtype, device).expand(K, N)
        valid &= torch.isfinite(s_t)
        if bool((valid & (s_t <= 0)).any()):
            k, n = (valid & (s_t <= 0)).nonzero()[0].tolist()
            raise DataError(
                f"sigma must be > 0, got {float(s_t[k, n])} at curve {first + k}, point {n}"
            )
        s_t = torch.where(valid, s_t, 1.0)
    y_t = torch.where(valid, y_t, 0.0)
    if x_t.dim() == 2 or not bool(valid.all()):
        # a masked x takes its curve's first valid x, so the model stays finite there
        x_full = x_t.expand(K, N)
        first_valid = valid.to(torch.int8).argmax(-1, keepdim=True)
        x_t = torch.where(valid, x_full, x_full.gather(-1, first_valid))
    return {"x": x_t, "y": y_t, "sigma": s_t, "mask": valid}


def _finite(y: Tensor | None, x: Tensor) -> bool:
    """Whether every value of ``y`` (if given) and ``x`` is finite: a sum of finite values
    can be infinite (overflow), but one with a NaN or an infinity never is finite."""
    return (y is None or bool(torch.isfinite(y.sum(-1)).all())) and bool(torch.isfinite(x).all())


def _tensor(value: Any, dtype: torch.dtype, device: Any) -> Tensor:
    if isinstance(value, Tensor):
        return value.detach().to(dtype=dtype, device=device)
    array = np.asarray(value, dtype=np.float64)
    if not array.flags.writeable:  # e.g. an xarray index's values: torch warns on those
        array = array.copy()
    return torch.as_tensor(array, dtype=dtype, device=device)


def default_chunk_size(
    n_points: int,
    n_params: int,
    device: Any = None,
    memory_budget: int | None = None,
    compiled: bool = False,
    in_place: bool = False,
) -> int:
    """Curves per chunk so that one chunk's working set fits ``memory_budget`` bytes;
    ``compiled``: the compiled LM kernel fits them, one curve at a time in a small buffer,
    reading the inputs as they are if ``in_place`` (else from converted copies)."""
    if memory_budget is None:
        memory_budget = CPU_MEMORY
        device = torch.device(device) if device is not None else None
        if device is not None and device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            memory_budget = int(free * GPU_MEMORY_FRACTION)
    # the Jacobian rows and a dozen residual-sized temporaries dominate the working set;
    # the compiled kernel needs only the chunk's inputs (x, y, sigma, mask when copied) and
    # its outputs: larger chunks, whose fixed cost (a few dozen small tensor operations,
    # serialised between threads by the GIL) was a third of a straight line's fit
    if in_place:  # only its outputs; at most COMPILED_CHUNK curves (progress, stop requests)
        per_curve = 8 * (4 * n_params + 8)
    else:
        per_curve = 8 * n_points * (4 if compiled else 3 * n_params + 12)
    largest = COMPILED_CHUNK if compiled else 1 << 22
    return int(max(256, min(largest, memory_budget // max(per_curve, 1))))


def _compiled_kernel_fits(
    model: Model, first: dict[str, Tensor | None], space: ParameterSpace, loss_fn: Loss,
    dtype: torch.dtype,
) -> bool:  # fmt: skip
    """Whether ``_lm_chunk`` will give every chunk to the compiled kernel: asked of the
    first curve (``first``, its tensors), as the model, loss, dtype and device are the same
    for all."""
    x, y = first["x"], first["y"]
    assert x is not None and y is not None
    problem = Problem(model, x, y, loss_fn.with_options(sigma=first["sigma"]), space)
    theta0 = torch.empty(1, len(space.free), dtype=dtype, device=y.device)
    return lm_kernel(problem, _robust(loss_fn), theta0, per_iteration=False) is not None


def _columns(K: int, space: ParameterSpace) -> Columns:
    from gradfit.optim.compiled.bridge import Columns  # loaded already: the kernel fits

    return Columns.empty(K, space)


def _robust(loss_fn: Loss) -> Any:
    """The LM kernels' ``robust``: None for plain least squares, else the loss's rho."""
    return None if loss_fn.name in ("mse", "sse", "chi2") else loss_fn.rho


def _balanced(chunk: int, K: int, device: Any) -> int:
    """Chunks of at most ``chunk`` curves, as many as a multiple of the CPU threads that run
    them side by side: 10,000 curves in chunks of 4,000 would leave one core idle for a
    third of the time."""
    workers = _cpu_workers()
    if (device is not None and torch.device(device).type != "cpu") or workers < 2 or K < 512:
        return chunk
    rounds = -(-K // (chunk * workers))  # ceil
    return -(-K // (rounds * workers))


def _guessed(p0: Any) -> bool:
    """Whether ``_start`` asks the model for (some) starting values: no p0, or a mapping."""
    return p0 is None or isinstance(p0, Mapping)


def _start(
    model: Model, p0: Any, x: Tensor, y: Tensor, mask: Tensor, start: int, stop: int
) -> Tensor:
    """``[k, P]`` starting values of curves ``start:stop``, chosen as ``fit`` chooses them."""
    k, names = y.shape[0], model.param_names
    dtype, device = y.dtype, y.device
    if _guessed(p0):
        base = _default_start(model, x, y, mask).to(dtype).expand(k, len(names)).clone()
        for name, value in (p0 or {}).items():
            if name not in names:
                raise unknown_name("parameter in p0", name, names)
            base[:, names.index(name)] = float(value)
        return base
    start_t = torch.as_tensor(np.asarray(p0, dtype=np.float64), dtype=dtype, device=device)
    if start_t.shape == (len(names),):
        return start_t.expand(k, -1).clone()
    if start_t.dim() == 2 and start_t.shape[1] == len(names):
        return start_t[start:stop].clone()
    raise OptionError(f"p0 must be [P] or [K, P] with P = {len(names)}, got {tuple(start_t.shape)}")


def _default_start(model: Model, x: Tensor, y: Tensor, mask: Tensor) -> Tensor:
    """As ``fit`` without p0: a module's own parameters, else the built-in's guess from each
    curve's valid points alone (masked, so padding never moves it), else ones."""
    initial = model.initial_params(y.dtype)
    if initial is not None:
        return initial.to(y.device)
    if model.guess_fn is not None:
        return model.guess_fn(x, y, mask=None if all_valid(mask) else mask)
    return torch.ones(len(model.param_names), dtype=y.dtype, device=y.device)


def _fit_chunk(
    model: Model,
    part: dict[str, Tensor | None],
    p0: Any,
    start: int,
    stop: int,
    space: ParameterSpace,
    loss_fn: Loss,
    f_scale: float,
    optimizer: str,
    lr: float | None,
    epochs: int | None,
    tol: float | None,
    absolute_sigma: bool,
    tied: Tied | None = None,
    columns: Columns | None = None,
) -> BatchResult:
    """One chunk's fit; ``columns``: its rows of the batch's arrays, for the compiled kernel."""
    x, y, sigma, mask = part["x"], part["y"], part["sigma"], part["mask"]
    assert y is not None and mask is not None and x is not None
    p_start = _start(model, p0, x, y, mask, start, stop)
    # fit refuses a curve with fewer points than free parameters: no start to check, and a
    # NaN start makes both kernels and the first-order loop drop it at once (no iterations)
    # a curve with no valid point is not fitted even when every parameter is fixed
    few: Tensor | None = None  # every point valid and enough of them: no curve to mark
    if not (all_valid(mask) and y.shape[-1] >= max(len(space.free), 1)):
        n_valid = count_valid(mask)
        few = _too_few(n_valid, len(space.free))
        p_start = torch.where(few.unsqueeze(-1), torch.nan, p_start)
    space.check_start(p_start)
    problem = Problem(model, x, y, loss_fn.with_options(f_scale=f_scale, sigma=sigma), space)
    if optimizer in FIRST_ORDER:
        assert lr is not None
        result = _first_order_chunk(problem, p_start, mask, optimizer, lr, epochs, tol,
                                    absolute_sigma)  # fmt: skip
    else:
        result = _lm_chunk(problem, p_start, mask, f_scale, epochs, tol, absolute_sigma, columns)
    fixed = tuple(n for n, v in zip(space.names, space.fixed, strict=True) if v is not None)
    result = replace(result, fixed=fixed)
    if few is None and bool((result.n_points < y.shape[-1]).any()):
        # the compiled kernel left out non-finite y values (_batch_tensors' check_y)
        n_valid = result.n_points
        few = _too_few(n_valid, len(space.free))
    if few is not None:
        result = _mark_unfitted(result, n_valid, few)
    return result if tied is None else _with_tied(problem, result, mask, tied, absolute_sigma)


def _too_few(n_valid: Tensor, n_free: int) -> Tensor:
    """Curves with fewer valid points than free parameters, or none (``_mark_unfitted``)."""
    return (n_valid < n_free) | (n_valid == 0)


def _with_tied(
    problem: Problem, result: BatchResult, mask: Tensor, tied: Tied, absolute_sigma: bool
) -> BatchResult:
    """``result`` with a column for each tied parameter (the original model's order): its
    value and its delta-method stderr ``sqrt(g C gᵀ)`` from each curve's full covariance
    (NaN where a parameter the tie uses has none)."""
    params, free = result.params, problem.space.free
    rows = _weighted_rows(problem, params.nan_to_num(nan=1.0))  # unfitted curves: NaN below
    rows = torch.where(mask.unsqueeze(1), rows, 0.0)
    jt = rows[:, :-1]
    L, info = torch.linalg.cholesky_ex(torch.bmm(jt, jt.mT))
    ok = (info == 0)[:, None, None]
    L = torch.where(ok, L, torch.eye(L.shape[-1], dtype=L.dtype, device=L.device))  # singular
    cov_free = torch.where(ok, torch.cholesky_inverse(L), torch.nan)
    scale = torch.ones_like(result.reduced_chi2) if absolute_sigma else result.reduced_chi2
    k, P = params.shape
    cov = params.new_zeros(k, P, P)
    cov[:, [[i] for i in free], free] = cov_free * scale[:, None, None]
    values, sd = tied_values(tied, params, cov)
    names = tied.model.param_names
    columns, errors = [], []
    for n in tied.original.param_names:
        if n in values:
            uses = [names.index(u) for u in tied.exprs[n].names if u in names]
            free_uses = [i for i in uses if i in free]
            missing = result.stderr[:, free_uses].isnan().any(-1) | params.isnan().any(-1)
            columns.append(values[n])
            errors.append(torch.where(missing, torch.nan, sd[n]))
        else:
            columns.append(params[:, names.index(n)])
            errors.append(result.stderr[:, names.index(n)])
    return replace(
        result, params=torch.stack(columns, -1), stderr=torch.stack(errors, -1),
        param_names=tied.original.param_names,
    )  # fmt: skip


def _first_order_chunk(
    problem: Problem,
    p_start: Tensor,
    mask: Tensor,
    optimizer: str,
    lr: float,
    epochs: int | None,
    tol: float | None,
    absolute_sigma: bool,
) -> BatchResult:
    space = problem.space
    assert epochs is not None  # FitOptions.epoch_limit gives first-order optimizers one
    theta, loss_values, n_iter, status = fit_first_order(
        problem, space.to_theta(p_start), mask, optimizer, lr, epochs, tol
    )
    params = space.to_params(theta).detach()
    stats = _curve_statistics(problem, params, mask, absolute_sigma, rows=None)
    return BatchResult(
        params=params, stderr=stats["stderr"], loss=loss_values, n_iter=n_iter, status=status,
        param_names=space.names, reduced_chi2=stats["reduced_chi2"], r2=stats["r2"],
        n_points=count_valid(mask), optimizer=optimizer, loss_name=problem.loss.name,
    )  # fmt: skip


def _lm_chunk(
    problem: Problem,
    p_start: Tensor,
    mask: Tensor,
    f_scale: float,
    epochs: int | None,
    tol: float | None,
    absolute_sigma: bool,
    columns: Columns | None = None,
) -> BatchResult:
    """Levenberg–Marquardt on a chunk: the compiled kernel where it applies (into
    ``columns`` if given), else PyTorch's."""
    space, loss_fn = problem.space, problem.loss
    options: dict[str, Any] = {} if tol is None else {"ftol": tol}
    options["linear"] = linear_in_params(problem)  # as fit's run_lm
    if epochs is not None:
        options["max_iter"] = epochs
    robust = _robust(loss_fn)
    kernel_mask = None if all_valid(mask) else mask
    theta0 = space.to_theta(p_start)
    lm_compiled = lm_kernel(problem, robust, theta0, per_iteration=False)  # as fit's run_lm
    if lm_compiled is not None:
        fitted = lm_compiled.fit_curves(problem, theta0, kernel_mask, out=columns, **options)
        return _compiled_result(problem, fitted, absolute_sigma)
    residuals, stacked = residual_functions(problem)
    solved = levenberg_marquardt(
        residuals, theta0, stacked=stacked, robust=robust, mask=kernel_mask,
        f_scale=f_scale, subset=residual_subset(problem, kernel_mask), **options,
    )  # fmt: skip
    params = space.to_params(solved.theta)
    stats = _curve_statistics(problem, params, mask, absolute_sigma, solved.rows)
    n_valid = count_valid(mask)
    return BatchResult(
        params=params, stderr=stats["stderr"], loss=_lm_loss(solved.cost, n_valid, loss_fn),
        n_iter=solved.n_iter, status=solved.status, param_names=space.names,
        reduced_chi2=stats["reduced_chi2"], r2=stats["r2"], n_points=n_valid,
        loss_name=loss_fn.name,
    )  # fmt: skip


def _compiled_result(problem: Problem, fitted: CompiledFit, absolute_sigma: bool) -> BatchResult:
    """A chunk's result from the compiled kernel, which computed the statistics itself: its
    tensors share the memory of ``fitted.columns`` (rows of the batch's, see ``_joined``)."""
    # one native call: a chunk's dozen small tensor operations, each releasing and taking
    # back the GIL, held up the threads that fit chunks side by side
    from gradfit.optim.compiled.bridge import batch_outputs

    space, t, columns = problem.space, torch.from_numpy, fitted.columns
    per_point = problem.loss.reduction == "mean"
    batch_outputs(fitted, space.free, absolute_sigma, per_point, columns)
    params = t(columns.params)  # the same array as theta where the space is the identity
    if not space.is_identity:
        params.copy_(space.to_params(t(columns.theta)))
    return BatchResult(
        params=params, stderr=t(columns.stderr), loss=t(columns.loss),
        n_iter=t(columns.n_iter), status=t(columns.status), param_names=space.names,
        reduced_chi2=t(columns.reduced_chi2), r2=t(columns.r2), n_points=t(columns.n_points),
        loss_name=problem.loss.name,
    )  # fmt: skip


def _joined(
    results: list[BatchResult], chunks: list[tuple[int, int]], columns: Columns | None
) -> BatchResult:
    """The chunks' results as one: the batch's ``columns`` themselves where every chunk's
    result is still its rows of them (compiled kernel, nothing replaced, none skipped), else
    a concatenation."""
    if columns is None or len(results) != len(chunks) or results[0].keys is not None:
        return concat(results)  # (keys: chunk by chunk, as they were streamed)
    names = ("params", "stderr", "loss", "n_iter", "status", "reduced_chi2", "r2", "n_points")
    for (start, _), result in zip(chunks, results, strict=True):
        for name in names:
            if getattr(result, name).data_ptr() != getattr(columns, name)[start:].ctypes.data:
                return concat(results)
    t = torch.from_numpy
    return replace(
        results[0], params=t(columns.params), stderr=t(columns.stderr), loss=t(columns.loss),
        n_iter=t(columns.n_iter), status=t(columns.status),
        reduced_chi2=t(columns.reduced_chi2), r2=t(columns.r2), n_points=t(columns.n_points),
    )  # fmt: skip


def _mark_unfitted(result: BatchResult, n_valid: Tensor, few: Tensor) -> BatchResult:
    """Curves with fewer valid points than free parameters: status ``too_few_points`` (or
    ``no_data`` without any), no iterations, and NaN for everything a fit would have
    estimated (``fit`` refuses them)."""
    if not bool(few.any()):
        return result
    few = few.to(result.params.device)
    status = torch.where(n_valid.to(few.device) == 0, NO_DATA, TOO_FEW_POINTS)
    row, nan = few.unsqueeze(-1), torch.nan

    def blank(values: Tensor) -> Tensor:
        return torch.where(row if values.dim() == 2 else few, nan, values)

    return replace(
        result,
        params=blank(result.params), stderr=blank(result.stderr), loss=blank(result.loss),
        reduced_chi2=blank(result.reduced_chi2), r2=blank(result.r2),
        n_iter=torch.where(few, 0, result.n_iter),
        status=torch.where(few, status, result.status),
    )  # fmt: skip


def _curve_statistics(
    problem: Problem, params: Tensor, mask: Tensor, absolute_sigma: bool, rows: Tensor | None
) -> dict[str, Tensor]:
    """Per-curve stderr, reduced χ² and R², from the Jacobian at the solution.

    ``rows`` are the LM kernel's weighted Jacobian rows and residuals at the solution; they
    are the ones needed here unless bounds transform the parameters. None: evaluate them.
    """
    from gradfit.results import stats

    space, free = problem.space, problem.space.free
    y_pred = problem.model(problem.x, params).detach()
    if rows is None or not space.is_identity:
        rows = _weighted_rows(problem, params)
    if not all_valid(mask):
        rows = torch.where(mask.unsqueeze(1), rows, 0.0)
    jt = rows[:, :-1]  # (k, F, N)
    fit_stats = cast(  # tensors in, tensors out
        dict[str, Tensor],
        stats.goodness(
            problem.y, y_pred, rows[:, -1], len(free), None if all_valid(mask) else mask
        ),
    )
    normal = torch.bmm(jt, jt.mT)  # (k, F, F)
    if len(free) <= MAX_P:
        L, ok = cholesky(normal)
        variance = cholesky_inverse(L).diagonal(dim1=-2, dim2=-1)
    else:
        L_full, info = torch.linalg.cholesky_ex(normal)
        ok = info == 0
        variance = torch.cholesky_inverse(L_full).diagonal(dim1=-2, dim2=-1)
    variance = torch.where(ok.unsqueeze(-1), variance, torch.nan)
    variance = stats.estimable_variance(variance, normal.diagonal(dim1=-2, dim2=-1))
    reduced_chi2 = fit_stats["reduced_chi2"]
    stderr = _stderr(params, free, variance, reduced_chi2, absolute_sigma)
    return {"stderr": stderr, "reduced_chi2": reduced_chi2, "r2": fit_stats["r2"]}


def _stderr(
    params: Tensor, free: list[int], variance: Tensor, reduced_chi2: Tensor, absolute_sigma: bool
) -> Tensor:
    """``[k, P]`` standard errors from the diagonal of (JᵀJ)⁻¹ of the free parameters (NaN
    where singular), scaled by χ²ᵣ unless ``absolute_sigma``; NaN for fixed parameters."""
    scale = torch.ones_like(reduced_chi2) if absolute_sigma else reduced_chi2
    stderr = torch.full_like(params, torch.nan)
    stderr[:, free] = torch.sqrt(variance * scale.unsqueeze(-1))
    return stderr


def _lm_loss(cost: Tensor, n_valid: Tensor, loss: Loss) -> Tensor:
    """The user's loss from the LM kernels' cost 0.5 Σ f_scale²·rho (f_scale² included):
    its mean over the valid points or its sum."""
    return 2 * cost / (n_valid.clamp_min(1) if loss.reduction == "mean" else 1)


def _weighted_rows(problem: Problem, params: Tensor) -> Tensor:
    """(k, F + 1, N): the kernel's rows with respect to the free parameters themselves.

    The kernel's own rows differentiate with respect to the bound-transformed parameters;
    the same residual functions on a space without bounds give the derivatives stderr needs.
    """
    space = problem.space
    none = (None,) * len(space.names)
    unbounded = ParameterSpace(space.names, none, none, space.fixed)
    residuals, stacked = residual_functions(replace(problem, space=unbounded))
    evaluate = stacked or stack_jacobian(autodiff_jacobian(residuals))
    return evaluate(unbounded.to_theta(params)).detach()


def _empty(
    model: Model, space: ParameterSpace, loss_fn: Loss, tied: Tied | None = None
) -> BatchResult:
    model = model if tied is None else tied.original
    empty = torch.empty(0, len(model.param_names), dtype=torch.float64)
    none = torch.empty(0, dtype=torch.float64)
    return BatchResult(
        params=empty, stderr=empty, loss=none, n_iter=none.long(), status=none.long(),
        param_names=model.param_names, reduced_chi2=none, r2=none, n_points=none.long(),
        loss_name=loss_fn.name,
    )  # fmt: skip


class _progress:
    """A Rich bar over curves on a terminal; a no-op elsewhere."""

    def __init__(self, enabled: bool, total: int) -> None:
        import sys

        self.bar = None
        if enabled and sys.stderr.isatty():
            from rich.progress import Progress

            self.bar = Progress(transient=True)
            self.task = self.bar.add_task("fitting curves", total=total)

    def __enter__(self) -> Callable[[int], None]:
        if self.bar is not None:
            self.bar.start()
        return self.advance

    def advance(self, n: int) -> None:
        if self.bar is not None:
            self.bar.advance(self.task, n)

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.stop()
