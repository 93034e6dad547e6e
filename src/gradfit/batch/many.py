"""``gradfit fit-many``: long-form tables (one row per point) to one result row per group.

The input (``batch/sources.py``: a file, a folder of Parquet files or a glob) is read a unit
at a time (a Parquet row group; a large text table by ranges of lines, ``batch/text_units.py``;
a small one or an ``.npz`` whole), never all at once. One scan checks every unit and keeps
its runs of group keys (``batch/plan.py``); tasks then fit the groups that lie whole in a unit
as the input streams by, and gather only the groups that straddle units. Each chunk of a task
is packed into a NaN-padded ``[K, N_max]`` batch, fitted with ``fit_batch`` and written to the
parts folder (``batch/parts.py``), so a killed run loses at most a chunk and ``--resume``
continues it. ``engine="dask"`` runs the same tasks on a Dask cluster
(``batch/dask_engine.py``); the results are the same.

The output has one row per group of the input. A file output (``.parquet``/``.csv``) lists
the groups in the order of their first row in the input (files in sorted path order); a
folder output (``out/``: one Parquet file per chunk and ``_manifest.json``) lists them part
by part: the groups whole in a unit in input order, then those that straddled units.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, cast

import numpy as np

from gradfit.batch.fit_batch import TRIM_EVERY, batch_optimizer, default_chunk_size
from gradfit.batch.malloc import release_freed_memory
from gradfit.batch.parts import Job, PartStore, run_task
from gradfit.batch.plan import Index, Task, UnitCache, UnitScan, build_index, plan_tasks, scan_unit
from gradfit.batch.sources import Spec, Unit, find_units, memory_units
from gradfit.batch.stream import SUFFIXES as OUTPUT_SUFFIXES
from gradfit.batch.stream import ResultStream
from gradfit.errors import OptionError, OutputError
from gradfit.fitting.checkpoint import model_identity, plain
from gradfit.io.files import check_parent, writing
from gradfit.model.models import Model, check_uses_independent
from gradfit.model.parameters import ParameterSpace
from gradfit.options import FitOptions, options_from
from gradfit.results.batch_result import NO_DATA, STATUS_NAMES, BatchResult, concat

ENGINES = ("local", "dask")


def pack_groups(
    keys: np.ndarray, columns: dict[str, np.ndarray]
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Rows grouped by ``keys`` -> (unique keys in first-seen order, ``[K, N_max]`` arrays).

    Example:
        >>> keys, packed = pack_groups(np.array(["b", "a", "b"]), {"y": np.array([1.0, 2.0, 3.0])})
        >>> keys.tolist(), packed["y"].tolist()
        (['b', 'a'], [[1.0, 3.0], [2.0, nan]])
    """
    runs = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]]) if len(keys) else np.arange(0)
    if len(np.unique(keys[runs])) == len(runs):
        # each group is one contiguous run of rows (the usual layout): no sort needed
        counts = np.diff(np.r_[runs, len(keys)])
        if len(runs) and (counts == counts[0]).all():  # and all of one length: a reshape
            shape = (len(runs), int(counts[0]))
            return keys[runs], {name: v.reshape(shape) for name, v in columns.items()}
        unique_in_order, rows, starts = keys[runs], np.arange(len(keys)), runs
    else:
        unique, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
        order_of_groups = np.argsort(first, kind="stable")  # keep the file's group order
        rank = np.empty_like(order_of_groups)
        rank[order_of_groups] = np.arange(len(order_of_groups))
        group = rank[inverse.reshape(-1)]
        rows = np.argsort(group, kind="stable")
        counts = np.bincount(group, minlength=len(unique))
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        unique_in_order = unique[order_of_groups]
    sorted_group = np.repeat(np.arange(len(counts)), counts)
    position = np.arange(len(rows)) - np.repeat(starts, counts)
    packed = {}
    for name, values in columns.items():
        out = np.full((len(counts), max(int(counts.max(initial=0)), 1)), np.nan)
        out[sorted_group, position] = values[rows]
        packed[name] = out
    return unique_in_order, packed


def run_fit_many(
    data: Any,
    *,
    model: Model,
    group: str | None,
    x: str,
    y: str,
    sigma: str | None,
    out: str | Path,
    resume: bool = False,
    overwrite: bool = False,
    chunk_size: int | None = None,
    stop: Callable[[], bool] | None = None,
    progress: bool = False,
    options: FitOptions | None = None,
    engine: str = "local",
    workers: int | None = None,
    scheduler: str | None = None,
    client: Any = None,
    **keywords: Any,
) -> BatchResult | None:
    """Fit every group of ``data``; write ``out`` (a Parquet/CSV file, or a folder of Parquet
    files when it ends with ``/``), chunk by chunk.

    ``data`` is a path (file, folder of Parquet files, glob) or an in-memory ``pyarrow.Table``
    or pandas DataFrame. ``options`` (or the same as keywords: loss, optimizer, p0, ...) say
    how to fit. ``engine="dask"`` runs the tasks on ``client``, on the scheduler at
    ``scheduler`` or on a new ``LocalCluster`` of ``workers`` processes. Returns None when
    ``stop()`` turned true: finished chunks stay for ``resume``.
    """
    opts = options_from(options, **keywords)
    _check_engine(engine, workers, scheduler, client)
    target = Target.of(out, overwrite=overwrite, resume=resume)
    check_uses_independent(model)  # refused before anything is read or written
    batch_optimizer(opts)
    if isinstance(data, str | os.PathLike):
        units = find_units(os.fspath(data), group=group)
    else:
        units = memory_units(data)
    if any(unit.kind == "wide" for unit in units) and len(units) > 1:
        raise OptionError(f"{data}: a wide .npz input (curves as rows of y) is one file, alone")
    if group is None and any(unit.kind != "wide" for unit in units):
        raise OptionError("--group is required for long-form CSV/Parquet input")
    spec = Spec(group, x, y, sigma, opts.nan_policy)
    with _open_engine(engine, workers, scheduler, client) as runner:
        index = build_index(runner.scan(units, spec), group)
        if index.n_dropped:
            _note_omitted(index)
        chunk_size = chunk_size or default_chunk_size(
            index.width, len(model.param_names), opts.device
        )
        if resume and not overwrite and target.path.exists() and not target.parts.exists():
            raise OptionError(
                f"--resume: {target.path} is complete (no {target.parts.name}/ left to "
                "continue); use --overwrite to fit again"
            )
        identity = run_identity(model, index.digests, opts)
        with writing(target.path, "--out"):  # a full disk names the file, and what was kept
            parts = PartStore(target.parts, resume=resume, chunk_size=chunk_size,
                              identity=identity, manifest=target.manifest)  # fmt: skip
        tasks = plan_tasks(index, units, parts.chunk_size)
        _note_scattered(tasks, len(units), group)
        job = Job(spec, model, opts, parts.chunk_size, str(parts.folder), group or "curve")
        stopped = stop or (lambda: False)
        try:
            todo = [task for task in tasks if not parts.done(task)]
            with _Progress(progress, tasks, todo, parts.chunk_size) as bar:
                runner.fit(todo, job, stopped, bar)
            if stopped():
                return None
            # the rows are re-read from the parts, so fresh and resumed runs write the same
            with writing(target.path, "--out"):
                final = target.commit(parts, tasks, job.key_name, opts)
        except OutputError as error:  # a full disk: name the file, and what is kept
            error.option = error.option or "--out"
            if not parts.clean_if_empty():
                error.note = f"the finished chunks are kept in {parts.folder}/ for --resume"
            raise
        except Exception:
            parts.clean_if_empty()  # refused before any chunk was fitted: leave nothing behind
            raise
    return final


def run_identity(
    model: Model, digests: dict[str, str | None], options: FitOptions
) -> dict[str, Any]:
    """What a parts folder belongs to: model, options and a hash of each data column.

    Every option that changes a row is here, ``epochs`` included (finished chunks are not
    continued, so rows fitted under other limits would mix); ``device``, ``chunk_size`` (the
    folder's own is kept), the engine and the progress bar may change on resume.
    """
    optimizer = batch_optimizer(options)
    space = ParameterSpace.build(model.param_names, options.bounds, options.fixed)
    identity = model_identity(model, space)
    identity |= {"loss": options.loss_fn.name, "f_scale": float(options.f_scale)}
    identity |= {"optimizer": optimizer, "lr": options.learning_rate(optimizer)}
    for name in ("epochs", "tol", "p0"):
        identity[name] = plain(getattr(options, name))
    identity["absolute_sigma"] = bool(options.absolute_sigma)
    identity["dtype"] = str(options.dtype or "torch.float64")
    identity["data"] = digests
    return cast(dict[str, Any], json.loads(json.dumps(identity)))  # as the manifest reads it back


def _note_omitted(index: Index) -> None:
    """``--nan-policy omit``: say how many rows went, and how many groups have none left."""
    n_empty = index.n_empty
    groups = "1 group has" if n_empty == 1 else f"{n_empty} groups have"
    empty = f"; {groups} no valid point left (status {STATUS_NAMES[NO_DATA]})"
    print(f"note: --nan-policy omit dropped {index.n_dropped} rows with NaN or inf"
          f"{empty if n_empty else ''}", file=sys.stderr)  # fmt: skip


def _note_scattered(tasks: list[Task], n_units: int, group: str | None) -> None:
    """Say so when groups are scattered over the input: each task of them reads the units
    they touch again (correct, but the input is read several times)."""
    gathered = [task for task in tasks if task.straddlers]
    passes = sum(len(task.units) for task in gathered) / max(n_units, 1)
    if passes >= 2:
        n_groups = sum(len(task.keys) for task in gathered)
        print(f"note: {n_groups} groups are spread over many row groups or files: gathering "
              f"them reads the input {passes:.0f} more times; sorting it by {group!r} avoids "
              "that", file=sys.stderr)  # fmt: skip


@dataclass(frozen=True)
class Target:
    """``--out``: a ``.parquet``/``.csv`` file, or a folder of Parquet parts (``out/``).

    The parts are kept in ``<out>.parts/`` until every one is in; then a file output is
    written from them atomically, and a folder output is that folder, renamed into place.
    """

    path: Path
    folder: bool

    @classmethod
    def of(cls, out: str | Path, *, overwrite: bool, resume: bool) -> Target:
        text = os.fspath(out)
        folder = text.endswith(("/", os.sep))
        path = Path(text)
        if folder:
            if path.exists() and not path.is_dir():
                raise OptionError(f"--out {text}: is a file; name a folder (or a .parquet file)")
            if path.exists() and not (overwrite or resume):
                raise OptionError(f"--out {text}: folder exists; use --overwrite (or --resume)")
        else:
            if path.suffix.lower() not in OUTPUT_SUFFIXES:
                raise OptionError(
                    f"--out {path}: use a .parquet or .csv file, or a folder ending in /"
                )
            if path.is_dir():
                raise OptionError(f"--out {path}: is a folder; give a .parquet or .csv file name")
            if path.exists() and not (overwrite or resume):
                raise OptionError(f"--out {path}: file exists; use --overwrite (or --resume)")
        check_parent(path, "--out")
        return cls(path, folder)

    @property
    def parts(self) -> Path:
        return self.path.with_name(self.path.name + ".parts")

    @property
    def manifest(self) -> str:
        return "_manifest.json" if self.folder else "manifest.json"

    def commit(
        self, parts: PartStore, tasks: list[Task], key_name: str, options: FitOptions
    ) -> BatchResult:
        """Put the finished output in place (written from the parts a few at a time, or the
        parts folder renamed into place); return every row as one result."""
        rows = []
        stream = None if self.folder else ResultStream(self.path)
        with stream or contextlib.nullcontext():
            for table in parts.tables(tasks, reorder=not self.folder):
                batch = BatchResult.from_table(table, key_name)
                batch.optimizer = batch_optimizer(options)
                batch.fixed = tuple(options.fixed or ())  # the parts' tables do not carry it
                if stream is not None:
                    stream.write(batch.to_arrow())
                rows.append(batch)
            if stream is not None:
                stream.finish(complete=True)
        if not rows:
            raise OptionError("the input has no groups to fit")
        if stream is not None:
            parts.clean()
        else:
            old = self.path.with_name(f".{self.path.name}.replaced")
            if self.path.exists():  # --overwrite: the old folder goes once the new is whole
                shutil.rmtree(old, ignore_errors=True)
                os.replace(self.path, old)
            os.replace(parts.folder, self.path)
            shutil.rmtree(old, ignore_errors=True)
        return concat(rows)


class Engine(Protocol):
    """Runs the scan of every unit and the tasks: here (``local``) or on Dask."""

    def scan(self, units: list[Unit], spec: Spec) -> list[UnitScan]: ...

    def fit(
        self, tasks: list[Task], job: Job, stop: Callable[[], bool], bar: _Progress
    ) -> None: ...


class LocalEngine:
    """Units read one after another in this process; each task's chunks run side by side
    on the CPU's cores (``fit_batch``)."""

    def scan(self, units: list[Unit], spec: Spec) -> list[UnitScan]:
        scans = []
        for i, unit in enumerate(units):
            scans.append(scan_unit(unit, spec))
            if i % TRIM_EVERY == TRIM_EVERY - 1:
                release_freed_memory()
        return scans

    def fit(self, tasks: list[Task], job: Job, stop: Callable[[], bool], bar: _Progress) -> None:
        cache = UnitCache()  # a row group split over tasks is read once
        for task in tasks:
            if stop():
                return
            run_task(task, job, stop=stop, on_chunk=bar.advance, cache=cache)
            # the units' arrays are freed into the heap, in holes of many sizes: give the
            # pages back, so that the peak is one task's, not a fragmented sum of them
            release_freed_memory()


def _check_engine(engine: str, workers: int | None, scheduler: str | None, client: Any) -> None:
    if engine not in ENGINES:
        raise OptionError(f"--engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    if engine == "local" and (workers is not None or scheduler is not None or client is not None):
        raise OptionError("--workers, --scheduler and client= need --engine dask")
    if workers is not None and workers < 1:
        raise OptionError(f"--workers must be at least 1, got {workers}")
    if sum(v is not None for v in (workers, scheduler, client)) > 1:
        raise OptionError("give one of --workers, --scheduler and client=, not several")


@contextlib.contextmanager
def _open_engine(
    engine: str, workers: int | None, scheduler: str | None, client: Any
) -> Iterator[Engine]:
    if engine == "local":
        yield LocalEngine()
        return
    from gradfit.batch.dask_engine import DaskEngine  # Dask is an optional extra

    with DaskEngine.open(workers=workers, scheduler=scheduler, client=client) as runner:
        yield runner


class _Progress:
    """A bar over chunks (parts) on a terminal, with the fits per second; a no-op elsewhere."""

    def __init__(self, enabled: bool, tasks: list[Task], todo: list[Task], chunk: int) -> None:
        self.bar: Any = None
        self.fitted, self.started = 0, time.perf_counter()
        if not (enabled and sys.stderr.isatty()):
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

        total = sum(len(t.chunks(chunk)) for t in tasks)
        left = sum(len(t.chunks(chunk)) for t in todo)
        self.bar = Progress(
            TextColumn("fitting groups: parts"), MofNCompleteColumn(), BarColumn(),
            TextColumn("{task.fields[rate]}"), transient=True,
        )  # fmt: skip
        self.task = self.bar.add_task("fit", total=total, completed=total - left, rate="")

    def __enter__(self) -> _Progress:
        if self.bar is not None:
            self.bar.start()
        return self

    def advance(self, groups: int, parts: int = 1) -> None:
        self.fitted += groups
        if self.bar is not None:
            rate = self.fitted / max(time.perf_counter() - self.started, 1e-9)
            self.bar.update(self.task, advance=parts, rate=f"{rate:,.0f} fits/s")

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.stop()
