"""fit-many's input: a file, a folder of Parquet files or a glob, read a unit at a time.

A *unit* is what one reader call returns: a Parquet row group, a whole text table or ``.npz``
(text tables are read whole: their sniffing, header detection and error messages are those
of ``io/tables.py``), or an in-memory table. Units are small, picklable descriptions, so a
Dask worker reads its own units from the files; nothing here holds more than one unit.

Each unit is checked and cleaned by :func:`read_columns` with the messages of a whole-table
read: the file, the column and the row *within that file* (a row group's rows are offset by
the rows before it).
"""

from __future__ import annotations

import functools
import glob
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from gradfit.batch.text_units import TextLayout, read_range, text_ranges
from gradfit.errors import DataError, GradfitError, OptionError
from gradfit.io import tables
from gradfit.io.tables import TEXT_SUFFIXES, TableOptions, read_raw_table, to_float

PARQUET_SUFFIXES = (".parquet", ".pq")
WIDE_SUFFIXES = (".npz", ".npy")
GLOB_CHARACTERS = "*?["


@dataclass(frozen=True)
class Spec:
    """Which columns make a group's curve, and how non-finite values are treated."""

    group: str | None
    x: str
    y: str
    sigma: str | None = None
    nan_policy: str = "raise"

    @property
    def names(self) -> dict[str, str]:
        """Role -> column name (``x``, ``y`` and, if given, ``sigma``)."""
        return {"x": self.x, "y": self.y} | ({"sigma": self.sigma} if self.sigma else {})


@dataclass(frozen=True)
class Unit:
    """One readable piece of the input.

    ``kind`` is ``parquet`` (row group ``row_group`` of ``path``), ``table`` (a text table,
    read whole), ``wide`` (an ``.npz`` of ``x``/``y`` arrays: one curve per row of ``y``) or
    ``text`` (bytes ``byte_range`` of a large text table: ``batch/text_units.py``), ``memory``
    (``table``, a ``pyarrow.Table`` given by a library caller) or ``delayed`` (a Dask
    DataFrame's partition). ``first_row`` is
    the unit's first row within its file; ``partition`` the hive partition values
    (``site=a/part.parquet``) that become columns.
    """

    kind: str
    path: str
    n_rows: int = 0
    row_group: int = 0
    first_row: int = 0
    partition: tuple[tuple[str, Any], ...] = ()
    table: Any = field(default=None, repr=False, compare=False)
    options: TableOptions | None = None  # the CLI's --delimiter/--header, for text tables
    byte_range: tuple[int, int] = (0, 0)  # kind "text": a large text table's rows, by bytes
    layout: TextLayout | None = None  # kind "text": how every range is parsed

    @property
    def label(self) -> str:
        return self.path


def find_units(
    data: str | Path, options: TableOptions | None = None, group: str | None = None
) -> list[Unit]:
    """The units of ``data``: a file, a folder of Parquet files (hive partitions such as
    ``site=a/`` become columns) or a glob; files in sorted path order, row groups in order.

    Example:
        >>> find_units("no/such/*.parquet")
        Traceback (most recent call last):
        gradfit.errors.DataError: no/such/*.parquet: no file matches
    """
    text = str(data)
    path = Path(text)
    if path.is_dir():
        return _folder_units(path)
    if not path.exists() and any(c in text for c in GLOB_CHARACTERS):
        files = sorted(p for p in glob.glob(text, recursive=True) if Path(p).is_file())
        if not files:
            raise DataError(f"{text}: no file matches")
        return [unit for name in files for unit in _file_units(Path(name), (), options, group)]
    return _file_units(path, (), options, group)


def memory_units(table: Any) -> list[Unit]:
    """A ``pyarrow.Table`` or a pandas DataFrame as units of at most ``MEMORY_ROWS`` rows; a
    Dask DataFrame as one unit per partition (computed where the unit is read)."""
    import pyarrow as pa

    if hasattr(table, "to_delayed") and hasattr(table, "npartitions"):  # no dask import here
        # a partition's length is unknown until it is computed: each is its own task
        return [Unit("delayed", f"partition {i}", n_rows=PARTITION_ROWS, table=part)
                for i, part in enumerate(table.to_delayed())]  # fmt: skip
    if not isinstance(table, pa.Table):
        table = pa.Table.from_pandas(table, preserve_index=False)
    step = MEMORY_ROWS
    return [
        Unit("memory", "data", n_rows=min(step, table.num_rows - start), first_row=start,
             table=table.slice(start, step))
        for start in range(0, max(table.num_rows, 1), step)
    ]  # fmt: skip


#: rows per unit of an in-memory table (a unit is also the most a reader holds at once)
MEMORY_ROWS = 1 << 20
#: the rows a Dask DataFrame's partition counts as when tasks are planned (unknown before)
PARTITION_ROWS = 1 << 21


def _folder_units(folder: Path) -> list[Unit]:
    import pyarrow.dataset as ds

    try:
        dataset = ds.dataset(folder, format="parquet", partitioning="hive")
        fragments = sorted(dataset.get_fragments(), key=lambda f: f.path)
    except Exception as error:  # pyarrow names the file it could not open
        raise DataError(
            f"{folder}: cannot read as a Parquet dataset ({_first_line(error)})"
        ) from None
    if not fragments:
        raise DataError(f"{folder}: no Parquet files in the folder")
    units = []
    for fragment in fragments:
        partition = ds.get_partition_keys(fragment.partition_expression)
        units += _file_units(Path(fragment.path), tuple(sorted(partition.items())), None, None)
    return units


def _file_units(
    path: Path,
    partition: tuple[tuple[str, Any], ...],
    options: TableOptions | None,
    group: str | None,
) -> list[Unit]:
    if not path.exists():
        raise DataError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix in WIDE_SUFFIXES:
        return [Unit("wide", str(path))]
    if suffix not in PARQUET_SUFFIXES:
        options = options or current_table_options()  # carried to the Dask workers
        split = text_ranges(path, options, group) if suffix in TEXT_SUFFIXES else None
        if split is None:  # read whole, as gradfit fit reads it
            return [Unit("table", str(path), options=options)]
        layout, ranges = split
        return [Unit("text", str(path), n_rows=rows, first_row=first, options=options,
                     byte_range=(start, stop), layout=layout)
                for start, stop, first, rows in ranges]  # fmt: skip
    import pyarrow.parquet as pq

    try:
        metadata = pq.ParquetFile(path).metadata
    except Exception:  # damaged: read_raw_table says how, as a whole-file read does
        read_raw_table(path)
        raise
    if metadata.num_rows == 0:
        raise DataError(f"{path}: the file has no data rows")
    units, first = [], 0
    for index in range(metadata.num_row_groups):
        rows = metadata.row_group(index).num_rows
        units.append(Unit("parquet", str(path), rows, index, first, partition))
        first += rows
    return units


def current_table_options() -> TableOptions | None:
    """The ``--delimiter``/``--header`` of the enclosing ``io.tables.table_options`` block."""
    return tables._OPTIONS.get()


def _first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def read_raw(unit: Unit, names: list[str]) -> dict[str, np.ndarray]:
    """Columns ``names`` of ``unit`` as NumPy arrays (strings as objects); a missing column
    is a ``DataError`` naming the file and the columns it has."""
    if unit.kind == "wide":
        return read_raw_table(Path(unit.path))
    import pyarrow as pa

    if unit.kind == "table":
        table = read_raw_table(Path(unit.path), unit.options)
        _check_names(unit, names, list(table))
        return {name: table[name] for name in names}
    if unit.kind == "text":
        assert unit.layout is not None
        _check_names(unit, names, list(unit.layout.names))
        start, stop = unit.byte_range
        return read_range(Path(unit.path), unit.layout, start, stop, unit.first_row, names)
    if unit.kind == "delayed":  # a Dask DataFrame's partition, computed here, in this thread
        arrow = pa.Table.from_pandas(unit.table.compute(scheduler="sync"), preserve_index=False)
        columns = list(arrow.column_names)
    elif unit.kind == "memory":
        arrow, columns = unit.table, list(unit.table.column_names)
    else:  # only the wanted columns are read: the error names every column of the file
        arrow, columns = _read_row_group(unit, names)
    columns += [name for name, _ in unit.partition]
    _check_names(unit, names, columns)
    partition = dict(unit.partition)
    out = {}
    for name in names:
        if name in arrow.column_names:
            out[name] = arrow.column(name).to_numpy(zero_copy_only=False)
        else:  # a hive partition value: one value for the whole file
            out[name] = np.full(arrow.num_rows, partition[name])
    return out


def _read_row_group(unit: Unit, names: list[str]) -> tuple[Any, list[str]]:
    """The row group's columns ``names`` (those present), and every column of the file."""
    try:
        handle = _parquet_file(unit.path, os.stat(unit.path).st_mtime_ns)
        every = list(handle.schema_arrow.names)
        present = [name for name in names if name in every]
        return handle.read_row_group(unit.row_group, columns=present), every
    except GradfitError:
        raise
    except Exception as error:  # a damaged column: named as a whole-file read names it
        read_raw_table(Path(unit.path))
        raise DataError(f"{unit.path}: cannot read as parquet ({_first_line(error)})") from None


@functools.lru_cache(maxsize=4)
def _parquet_file(path: str, mtime_ns: int) -> Any:
    """An open Parquet file, kept for its next row groups (its footer is parsed once)."""
    import pyarrow.parquet as pq

    return pq.ParquetFile(path)


def _check_names(unit: Unit, names: list[str], columns: list[str]) -> None:
    for name in names:
        if name not in columns:
            raise DataError(f"{unit.label}: no column {name!r}; columns are {', '.join(columns)}")


@dataclass
class Rows:
    """One unit's rows, checked: group keys, float columns (``x``, ``y``, ``sigma``) and
    ``finite`` (False where a value is NaN or infinite: dropped under ``nan_policy="omit"``)."""

    keys: np.ndarray
    columns: dict[str, np.ndarray]
    finite: np.ndarray

    def __len__(self) -> int:
        return len(self.keys)

    def select(self, rows: np.ndarray) -> Rows:
        return Rows(self.keys[rows], {n: v[rows] for n, v in self.columns.items()},
                    self.finite[rows])  # fmt: skip


def read_rows(unit: Unit, spec: Spec) -> Rows:
    """``unit``'s rows checked as a whole-table read checks them (messages name the file,
    the column and the row within the file)."""
    if unit.kind == "wide":
        return _wide_rows(unit)
    if spec.group is None:
        raise OptionError("--group is required for long-form CSV/Parquet input")
    names = spec.names
    raw = read_raw(unit, [spec.group, *names.values()])
    keys = raw[spec.group]
    if keys.dtype == object:
        empty = np.fromiter((k is None for k in keys), dtype=bool, count=len(keys))
        if empty.any():
            row = unit.first_row + int(np.argmax(empty))
            raise DataError(f"{unit.label}: column {spec.group!r} is empty at row {row}")
    elif keys.dtype.kind == "f" and np.isnan(keys).any():  # a null in a numeric key column
        row = unit.first_row + int(np.argmax(np.isnan(keys)))
        raise DataError(f"{unit.label}: column {spec.group!r} is empty at row {row}")
    columns = {role: _floats(raw[name], unit, name) for role, name in names.items()}
    finite = np.ones(len(keys), dtype=bool)
    for role, values in columns.items():
        bad = ~np.isfinite(values)
        if bad.any() and spec.nan_policy == "raise":
            row = int(np.argmax(bad))
            raise DataError(
                f"{unit.label}: column {names[role]!r} has a non-finite value ({values[row]}) "
                f"at row {unit.first_row + row}; clean the data or use --nan-policy omit"
            )
        finite &= ~bad
    if "sigma" in columns:
        bad = finite & (columns["sigma"] <= 0)
        if bad.any():
            row = int(np.argmax(bad))
            raise DataError(
                f"{unit.label}: column {spec.sigma!r} must be > 0, got {columns['sigma'][row]} "
                f"at row {unit.first_row + row}"
            )
    return Rows(keys, columns, finite)


def _floats(values: np.ndarray, unit: Unit, name: str) -> np.ndarray:
    """``to_float`` with its row counted from the file's start, not the unit's."""
    what = f"{unit.label}: column {name!r}"
    try:
        return to_float(values, what)
    except DataError as error:
        prefix = f"{what}: row "
        text = str(error)
        if unit.first_row == 0 or not text.startswith(prefix):
            raise
        number, _, rest = text[len(prefix) :].partition(" ")
        raise DataError(f"{prefix}{unit.first_row + int(number)} {rest}") from None


def _wide_rows(unit: Unit) -> Rows:
    """A wide ``.npz``: curve ``i`` is row ``i`` of ``y`` (its key), ``x`` ``[N]`` or ``[K, N]``."""
    arrays = read_raw_table(Path(unit.path))
    for name in ("x", "y"):
        if name not in arrays:
            raise DataError(f"{unit.path}: no array {name!r}; arrays are {', '.join(arrays)}")
    y = np.asarray(arrays["y"], dtype=np.float64)
    if y.ndim != 2:
        raise DataError(f"{unit.path}: y must be [K, N], got shape {y.shape}")
    columns = {"x": np.asarray(arrays["x"], dtype=np.float64), "y": y}
    if "sigma" in arrays:
        columns["sigma"] = np.asarray(arrays["sigma"], dtype=np.float64)
    # NaN marks padding in wide arrays: every row is kept, fit_batch masks the points
    return Rows(np.arange(y.shape[0]), columns, np.ones(y.shape[0], dtype=bool))
