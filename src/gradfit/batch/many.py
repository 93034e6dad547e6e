"""``gradfit fit-many``: long-form tables (one row per point) to one result row per group.

Groups of any length are packed into a NaN-padded ``[K, N_max]`` batch (vectorised: one
stable sort by group, no Python loop over groups), fitted with ``fit_batch``, and written
chunk by chunk so a killed run loses at most one chunk.
"""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import numpy as np

from gradfit.batch.fit_batch import batch_optimizer, default_chunk_size, fit_batch
from gradfit.batch.stream import SUFFIXES as OUTPUT_SUFFIXES
from gradfit.errors import DataError, OptionError, OutputError
from gradfit.fitting.checkpoint import data_hashes, mismatch, model_identity, plain
from gradfit.io.files import (
    check_parent,
    make_parents,
    remove_folders,
    write_text_atomic,
    writing,
)
from gradfit.io.tables import read_raw_table, to_float
from gradfit.model.models import Model
from gradfit.model.parameters import ParameterSpace
from gradfit.options import FitOptions, options_from
from gradfit.results.batch_result import NO_DATA, STATUS_NAMES, BatchResult

#: status of a group with no valid point; until batch_result names a ``no_data`` code, such
#: groups are marked ``too_few_points`` (as fit_batch marks them)


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


def read_long(
    path: Path, group: str, x: str, y: str, sigma: str | None, nan_policy: str = "raise"
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Read a long-form CSV/Parquet table, apply the NaN policy, and pack it by ``group``."""
    table = read_raw_table(path)
    wanted = [group, x, y, *([sigma] if sigma else [])]
    for name in wanted:
        if name not in table:
            raise DataError(f"{path}: no column {name!r}; columns are {', '.join(table)}")
    keys = table[group]
    if keys.dtype == object and any(k is None for k in keys):
        row = next(i for i, k in enumerate(keys) if k is None)
        raise DataError(f"{path}: column {group!r} is empty at row {row}")
    columns = {"x": to_float(table[x], f"{path}: column {x!r}")}
    columns["y"] = to_float(table[y], f"{path}: column {y!r}")
    if sigma:
        columns["sigma"] = to_float(table[sigma], f"{path}: column {sigma!r}")
        bad = np.isfinite(columns["sigma"]) & (columns["sigma"] <= 0)
        if bad.any():
            row = int(np.argmax(bad))
            raise DataError(
                f"{path}: column {sigma!r} must be > 0, got {columns['sigma'][row]} at row {row}"
            )
    finite = np.ones(len(keys), dtype=bool)
    for name, values in columns.items():
        bad = ~np.isfinite(values)
        if bad.any() and nan_policy == "raise":
            row = int(np.argmax(bad))
            column = {"x": x, "y": y, "sigma": sigma}[name]
            raise DataError(
                f"{path}: column {column!r} has a non-finite value ({values[row]}) at row {row}; "
                "clean the data or use --nan-policy omit"
            )
        finite &= ~bad
    if not finite.all():
        return _omit_rows(np.asarray(keys), columns, finite)
    return pack_groups(np.asarray(keys), columns)


def _omit_rows(
    keys: np.ndarray, columns: dict[str, np.ndarray], finite: np.ndarray
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """``--nan-policy omit``: pack the finite rows; a group left with none keeps its row."""
    kept, packed = pack_groups(keys[finite], {n: v[finite] for n, v in columns.items()})
    every, packed = _with_empty_groups(keys, kept, packed)
    n_empty = len(every) - len(kept)
    groups = "1 group has" if n_empty == 1 else f"{n_empty} groups have"
    empty = f"; {groups} no valid point left (status {STATUS_NAMES[NO_DATA]})"
    print(f"note: --nan-policy omit dropped {int((~finite).sum())} rows with NaN or inf"
          f"{empty if n_empty else ''}", file=sys.stderr)  # fmt: skip
    return every, packed


def _with_empty_groups(
    keys: np.ndarray, kept: np.ndarray, packed: dict[str, np.ndarray]
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Every group of ``keys`` in the file's first-seen order (whichever rows were omitted);
    those not in ``kept`` (all their rows were omitted) as all-NaN rows, so they keep a row in
    the output (status no_data) instead of vanishing.

    Example:
        >>> keys = np.array(["a", "b", "c"])
        >>> every, packed = _with_empty_groups(keys, keys[[0, 2]], {"y": np.array([[1.0], [3.0]])})
        >>> every.tolist(), packed["y"].tolist()
        (['a', 'b', 'c'], [[1.0], [nan], [3.0]])
    """
    unique, first = np.unique(keys, return_index=True)
    every = unique[np.argsort(first, kind="stable")]  # the file's group order
    if len(every) == len(kept) and (every == kept).all():
        return kept, packed
    sorter = np.argsort(every, kind="stable")
    rows = sorter[np.searchsorted(every, kept, sorter=sorter)]  # each kept group's new row
    widened = {}
    for name, values in packed.items():
        widened[name] = np.full((len(every), values.shape[1]), np.nan)
        widened[name][rows] = values
    return every, widened


def read_wide(path: Path) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """A ``.npz`` with ``x`` (``[N]`` or ``[K, N]``), ``y`` ``[K, N]`` and optional ``sigma``."""
    arrays = read_raw_table(path)
    for name in ("x", "y"):
        if name not in arrays:
            raise DataError(f"{path}: no array {name!r}; arrays are {', '.join(arrays)}")
    y = np.asarray(arrays["y"], dtype=np.float64)
    if y.ndim != 2:
        raise DataError(f"{path}: y must be [K, N], got shape {y.shape}")
    packed = {"x": np.asarray(arrays["x"], dtype=np.float64), "y": y}
    if "sigma" in arrays:
        packed["sigma"] = np.asarray(arrays["sigma"], dtype=np.float64)
    return np.arange(y.shape[0]), packed


def run_fit_many(
    data: Path,
    *,
    model: Model,
    group: str | None,
    x: str,
    y: str,
    sigma: str | None,
    out: Path,
    resume: bool = False,
    overwrite: bool = False,
    chunk_size: int | None = None,
    stop: Callable[[], bool] | None = None,
    progress: bool = False,
    options: FitOptions | None = None,
    **keywords: Any,
) -> BatchResult | None:
    """Fit every group of ``data``; write ``out`` (Parquet or CSV), chunk by chunk.

    ``options`` (or the same as keywords: loss, optimizer, p0, ...) say how to fit. Returns
    None when ``stop()`` turned true: finished chunks stay for ``resume``.
    """
    opts = options_from(options, **keywords)
    nan_policy = opts.nan_policy  # also how the table is read: omitted rows, no_data groups
    suffix = out.suffix.lower()
    if suffix not in OUTPUT_SUFFIXES:
        raise OptionError(f"--out {out}: use a .parquet or .csv file")
    if out.is_dir():
        raise OptionError(f"--out {out}: is a folder; give a .parquet or .csv file name")
    if out.exists() and not (overwrite or resume):
        raise OptionError(f"--out {out}: file exists; use --overwrite (or --resume)")
    check_parent(out, "--out")
    if data.suffix.lower() in (".npz", ".npy"):
        keys, packed = read_wide(data)  # NaN marks padding in wide arrays
    else:
        if group is None:
            raise OptionError("--group is required for long-form CSV/Parquet input")
        keys, packed = read_long(data, group, x, y, sigma, nan_policy)
    chunk_size = chunk_size or default_chunk_size(
        packed["y"].shape[1], len(model.param_names), opts.device
    )
    if resume and not overwrite and out.exists() and not _PartStore.folder_of(out).exists():
        raise OptionError(
            f"--resume: {out} is complete (no {_PartStore.folder_of(out).name}/ left to "
            "continue); use --overwrite to fit again"
        )
    identity = run_identity(model, keys, packed, opts)
    with writing(out, "--out"):  # a full disk names the file, and what was kept
        parts = _PartStore(out, resume=resume, chunk_size=chunk_size, identity=identity)
    stopped = stop or (lambda: False)
    try:
        fit_batch(
            model, packed["x"], packed["y"], sigma=packed.get("sigma"),
            chunk_size=parts.chunk_size,
            on_chunk=lambda start, chunk: parts.write(
                start, chunk, keys, group or "curve"
            ),
            skip_chunk=lambda start, stop: parts.done(start, stop) or stopped(), options=opts,
            progress=progress,
        )  # fmt: skip
        if stopped():
            return None
        # the table is re-read from the parts, so fresh and resumed runs write the same thing
        final = parts.combine(keys, group or "curve")
        final.optimizer = batch_optimizer(opts)
        final.fixed = tuple(opts.fixed or ())  # the parts' tables do not carry it
        with writing(out, "--out"):
            final.save(out)
    except OutputError as error:  # a full disk: name the file, and what is kept
        error.option = error.option or "--out"
        if not parts.clean_if_empty():
            error.note = f"the finished chunks are kept in {parts.folder}/ for --resume"
        raise
    except Exception:
        parts.clean_if_empty()  # refused before any chunk was fitted: leave nothing behind
        raise
    parts.clean()
    return final


def run_identity(
    model: Model, keys: np.ndarray, packed: dict[str, np.ndarray], options: FitOptions
) -> dict[str, Any]:
    """What a parts folder belongs to: model, options and a hash of each data array.

    Every option that changes a row is here, ``epochs`` included (finished chunks are not
    continued, so rows fitted under other limits would mix); ``device``, ``chunk_size`` (the
    folder's own is kept) and the progress bar may change on resume.
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
    identity["data"] = data_hashes({"keys": keys, **packed})
    return cast(dict[str, Any], json.loads(json.dumps(identity)))  # as the manifest reads it back


class _PartStore:
    """Finished chunks as Parquet files in ``<out>.parts/``; the manifest holds the chunking
    and the run's identity, so ``--resume`` continues only the same run."""

    def __init__(
        self, out: Path, *, resume: bool, chunk_size: int, identity: dict[str, Any]
    ) -> None:
        self.folder = self.folder_of(out)
        self._created: list[Path] = []
        manifest = self.folder / "manifest.json"
        if resume and manifest.exists():
            saved = json.loads(manifest.read_text())
            self._check(saved.get("identity"), identity)
            self.chunk_size = int(saved["chunk_size"])
            return
        if self.folder.exists():
            shutil.rmtree(self.folder)
        self._created = make_parents(manifest)  # the folder and any parent it needed
        self.chunk_size = chunk_size
        try:
            write_text_atomic(
                manifest, json.dumps({"chunk_size": self.chunk_size, "identity": identity})
            )
        except OutputError:
            remove_folders(self._created)
            raise

    @staticmethod
    def folder_of(out: Path) -> Path:
        return out.with_name(out.name + ".parts")

    def _check(self, saved: dict[str, Any] | None, identity: dict[str, Any]) -> None:
        if saved is None:  # an older gradfit's folder: it recorded no options to compare
            raise OptionError(
                f"--resume: {self.folder} does not record the options it was fitted with "
                "(an older gradfit wrote it); drop --resume to start over"
            )
        different = mismatch(saved, identity)
        if different is not None:  # refused before anything is written or removed
            raise OptionError(
                f"--resume: {self.folder} was written for {different}; resume with the "
                "original options, or drop --resume to start over"
            )

    def _path(self, start: int) -> Path:
        return self.folder / f"part-{start:012d}.parquet"

    def done(self, start: int, stop: int) -> bool:
        return self._path(start).exists()

    def write(self, start: int, chunk: BatchResult, keys: np.ndarray, key_name: str) -> None:
        chunk.keys, chunk.key_name = keys[start : start + len(chunk)], key_name
        chunk.to_parquet(self._path(start))

    def combine(self, keys: np.ndarray, key_name: str) -> BatchResult:
        import pyarrow as pa
        import pyarrow.parquet as pq

        parts = sorted(self.folder.glob("part-*.parquet"))
        table = pa.concat_tables([pq.read_table(p) for p in parts])
        return BatchResult.from_table(table, key_name)

    def clean(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)

    def clean_if_empty(self) -> bool:
        """Remove the folder (and the parents this run made for it) if it holds no part;
        True if it did."""
        if any(self.folder.glob("part-*.parquet")):
            return False
        self.clean()
        remove_folders([folder for folder in self._created if folder != self.folder])
        return True
