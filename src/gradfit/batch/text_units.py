"""Large text tables for fit-many, read a byte range at a time.

A CSV/TSV file up to ``SPLIT_BYTES`` is read whole by ``io/tables.py`` (its sniffing, header
detection and messages). A larger one is cut into ranges of about ``SPLIT_BYTES`` at line
ends; the delimiter and the header are decided once from the file's first lines, as the
whole-file reader decides them, and each range is parsed by Arrow's CSV reader on its own
(so a Dask worker reads only its range). Row numbers in messages count data rows from the
file's start. Not split: whitespace-separated text (Arrow has no "runs of blanks"
delimiter), and files whose quoted fields hold line breaks would be cut wrongly (such files
are rare in long-form numeric tables; ``SPLIT_BYTES`` bounds the harm to a clear error).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gradfit.errors import DataError
from gradfit.io import tables
from gradfit.io.tables import WHITESPACE, TableOptions

#: files above this size are read in ranges of about this many bytes
SPLIT_BYTES = 64 * 2**20
BLOCK = 1 << 20  # bytes read at a time while counting lines


@dataclass(frozen=True)
class TextLayout:
    """How every range of a text file is parsed: delimiter, column names, header row."""

    delimiter: str
    names: tuple[str, ...]
    group: str | None  # the key column, read as text unless the file's first keys are integers
    integer_keys: bool


def text_ranges(
    path: Path, options: TableOptions | None, group: str | None
) -> tuple[TextLayout, list[tuple[int, int, int, int]]] | None:
    """``(layout, [(start byte, end byte, first data row, rows), ...])`` for a large text table;
    None when it is read whole (small, or separated by runs of whitespace)."""
    size = path.stat().st_size
    if size <= SPLIT_BYTES:
        return None
    options = options or tables._OPTIONS.get() or TableOptions()  # the CLI's --delimiter
    tables._check_text(path, options)
    skip, lines = tables._sample_lines(path)
    if not lines:
        return None  # the whole-file reader says what is wrong
    delimiter = options.delimiter
    if delimiter is None:
        tab = path.suffix.lower() in (".tsv", ".tab")
        delimiter = "\t" if tab else tables._sniff_delimiter(path, lines)
    if delimiter == WHITESPACE:
        return None
    first = [name.strip() for name in tables._split(lines[0], delimiter)]
    header = options.header if options.header is not None else not tables._is_numeric_row(first)
    names = tuple(first) if header else tuple(f"c{i}" for i in range(len(first)))
    integer_keys = False
    if group in names:
        column = names.index(group)
        keys = [tables._split(line, delimiter) for line in lines[1 if header else 0 :]]
        integer_keys = all(len(k) > column and k[column].strip().lstrip("-").isdigit()
                           for k in keys)  # fmt: skip
    layout = TextLayout(delimiter, names, group, integer_keys)
    return layout, _ranges(path, skip + (1 if header else 0))


def _ranges(path: Path, skipped_lines: int) -> list[tuple[int, int, int, int]]:
    """Byte ranges of about ``SPLIT_BYTES`` ending at line ends, after the header: (start,
    stop, data rows before it, its rows)."""
    ranges, rows, start = [], 0, 0
    with open(path, "rb") as handle:
        for _ in range(skipped_lines):
            handle.readline()
        start = handle.tell()
        position, lines = start, 0
        while True:
            block = handle.read(min(BLOCK, SPLIT_BYTES))
            if not block:
                break
            position += len(block)
            lines += block.count(b"\n")
            if position - start >= SPLIT_BYTES:
                tail = handle.readline()  # finish the line the block ended in
                position += len(tail)
                lines += tail.endswith(b"\n")
                ranges.append((start, position, rows, lines))
                rows += lines
                start, lines = position, 0
        if position > start:
            handle.seek(position - 1)
            ended = handle.read(1) == b"\n"
            ranges.append((start, position, rows, lines + (not ended)))
    return ranges


def read_range(
    path: Path, layout: TextLayout, start: int, stop: int, first_row: int, names: list[str]
) -> dict[str, np.ndarray]:
    """Columns ``names`` of the rows in bytes ``start:stop`` (messages count rows from the
    file's start)."""
    import pyarrow as pa
    import pyarrow.csv as pa_csv

    with open(path, "rb") as handle:
        handle.seek(start)
        data = handle.read(stop - start)
    types: dict[str, Any] = {}
    if layout.group is not None:
        types[layout.group] = pa.int64() if layout.integer_keys else pa.string()
    try:
        table = pa_csv.read_csv(
            io.BytesIO(data),
            read_options=pa_csv.ReadOptions(column_names=list(layout.names)),
            parse_options=pa_csv.ParseOptions(delimiter=layout.delimiter),
            convert_options=pa_csv.ConvertOptions(
                include_columns=[n for n in names if n in layout.names],
                column_types=types,
                auto_dict_encode=False,
            ),
        )
    except pa.ArrowInvalid as error:
        message = (str(error).strip().splitlines() or ["unreadable"])[0]
        raise DataError(
            f"{path}: cannot read the rows from data row {first_row} on ({message})"
        ) from None
    return {
        name: np.asarray(table.column(name).to_numpy(zero_copy_only=False))
        for name in table.column_names
    }
