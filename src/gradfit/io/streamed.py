"""Parquet data read one row group at a time: a fit over more rows than memory holds.

A ``ParquetRows`` is a Parquet file or a folder of them (``*.parquet``/``*.pq``, in name
order); its *units* are their row groups. Opening reads the footers alone (row counts and
columns); ``read(unit)`` reads one row group's columns as float64 arrays, checked as
``tables.py`` checks a whole table (file, row group, column and row named in every error).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gradfit.errors import DataError
from gradfit.io.tables import to_float

PARQUET_SUFFIXES = (".parquet", ".pq")
#: ``gradfit fit`` streams a Parquet file with more rows than this (or a folder) for lm;
#: with ``--batch-size`` it streams every Parquet input
STREAM_ROWS = 1 << 22


@dataclass(frozen=True)
class Unit:
    """One row group: its file, its index in the file, its rows and its first row's number
    in its file (errors name rows as the file numbers them)."""

    path: Path
    group: int
    rows: int
    start: int


def is_parquet(path: Path) -> bool:
    """A Parquet file, or a folder holding Parquet files."""
    if path.is_dir():
        return any(p.suffix.lower() in PARQUET_SUFFIXES for p in path.iterdir())
    return path.suffix.lower() in PARQUET_SUFFIXES


def parquet_rows(path: Path) -> int:
    """A Parquet file's rows, from its footer (0 when it cannot be read: the reader says why)."""
    import pyarrow.parquet as pq

    try:
        return int(pq.ParquetFile(path).metadata.num_rows)
    except Exception:  # the in-memory reader names the damage
        return 0


class ParquetRows:
    """The row groups of a Parquet file or folder, with the ``columns`` a fit reads."""

    def __init__(self, path: str | Path, columns: list[str]) -> None:
        import pyarrow.parquet as pq

        self.path = Path(path)
        self.columns = list(dict.fromkeys(columns))
        if self.path.is_dir():
            files = sorted(p for p in self.path.iterdir() if p.suffix.lower() in PARQUET_SUFFIXES)
            if not files:
                raise DataError(f"{self.path}: a folder without .parquet files")
        elif self.path.is_file():
            files = [self.path]
        else:
            raise DataError(f"{self.path}: no such file or folder")
        self.units: list[Unit] = []
        self.n_rows = 0
        for file in files:
            try:
                meta = pq.ParquetFile(file).metadata
            except Exception as error:  # pyarrow raises several types for unreadable files
                first = (str(error).strip().splitlines() or [type(error).__name__])[0]
                raise DataError(f"{file}: cannot read as parquet ({first})") from None
            names = meta.schema.names
            for column in self.columns:
                if column not in names:
                    raise DataError(f"{file}: no column {column!r} (it has {', '.join(names)})")
            start = 0
            for group in range(meta.num_row_groups):
                rows = meta.row_group(group).num_rows
                if rows:
                    self.units.append(Unit(file, group, rows, start))
                    start += rows
            self.n_rows += start
        if not self.n_rows:
            raise DataError(f"{self.path}: no data rows")

    def read(self, unit: Unit) -> dict[str, np.ndarray]:
        """One row group's columns as float64 arrays (NaN where a cell is null)."""
        import pyarrow.parquet as pq

        try:
            table: Any = pq.ParquetFile(unit.path).read_row_group(unit.group, columns=self.columns)
        except Exception as error:
            first = (str(error).strip().splitlines() or [type(error).__name__])[0]
            raise DataError(
                f"{unit.path}: row group {unit.group} cannot be read ({first})"
            ) from None
        out = {}
        for name in self.columns:
            values = table.column(name).to_numpy(zero_copy_only=False)
            out[name] = to_float(values, f"{unit.path}: column {name!r} (row group {unit.group})")
        return out


def check_finite(
    columns: dict[str, np.ndarray], unit: Unit, omit: bool
) -> tuple[dict[str, np.ndarray], int]:
    """The rows whose every value is finite (``omit``), else a ``DataError`` naming the first
    bad row by its number in the whole data; and how many rows were dropped."""
    keep = np.ones(unit.rows, dtype=bool)
    for name, values in columns.items():
        bad = ~np.isfinite(values)
        if bad.any() and not omit:
            row = int(np.argmax(bad))
            raise DataError(
                f"{unit.path}: column {name!r} has a non-finite value ({values[row]}) at row "
                f"{unit.start + row}; clean the data or use --nan-policy omit"
            )
        keep &= ~bad
    if keep.all():
        return columns, 0
    return {name: values[keep] for name, values in columns.items()}, int((~keep).sum())
