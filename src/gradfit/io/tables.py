"""Data at the edges: loading tables (CSV, TSV, text, Parquet, NumPy), validation, NaN policy.

Every check names the file, column and first bad row, so a user can fix the input
without reading a traceback.

Text tables (``.csv .tsv .tab .txt .dat``) are separated by a comma, tab, semicolon, any one
character, or runs of whitespace. Unless told (``TableOptions``; the CLI's ``--delimiter`` and
``--header/--no-header``), the reader decides: ``.tsv``/``.tab`` mean tab, other files are
sniffed from their first lines (tab, ``;``, ``,``, then whitespace: the first that splits every
line into the same number of fields); a first row of numbers is data, not a header, and the
columns are then named by position ``c0, c1, ...``. Lines starting with ``#`` at the top of
the file are skipped.
"""

from __future__ import annotations

import contextlib
import csv
import difflib
from collections.abc import Iterator, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gradfit.errors import DataError, GradfitError, OptionError

Tensor = torch.Tensor
NAN_POLICIES = ("raise", "omit")
TEXT_SUFFIXES = (".csv", ".tsv", ".tab", ".txt", ".dat")
TABLE_SUFFIXES = (*TEXT_SUFFIXES, ".parquet", ".pq", ".npy", ".npz")
WHITESPACE = "whitespace"  # the delimiter "runs of spaces and tabs"
SNIFFED = ("\t", ";", ",")  # tab first: commas and semicolons also occur inside values
DELIMITER_NAMES = {
    "tab": "\t", "\\t": "\t", "comma": ",", "semicolon": ";", "pipe": "|", "space": WHITESPACE,
    "spaces": WHITESPACE, "whitespace": WHITESPACE, "ws": WHITESPACE,
}  # fmt: skip
SNIFF_BYTES = 65536


@dataclass
class FitData:
    """Validated tensors for one fit: ``x`` (array or name -> array), ``y``, ``sigma``."""

    x: Tensor | dict[str, Tensor]
    y: Tensor
    sigma: Tensor | None
    n_omitted: int = 0

    @property
    def n_points(self) -> int:
        return self.y.shape[-1]


def _as_numpy(values: object, what: str, *, scalar: bool = False) -> np.ndarray:
    if isinstance(values, Tensor):
        values = values.detach().cpu().numpy()
    try:
        array = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        raise DataError(f"{what} must be numeric") from None
    if scalar and array.ndim == 0:
        return array
    if array.ndim != 1:
        raise DataError(f"{what} must be one-dimensional, got shape {tuple(array.shape)}")
    return array


def prepare_data(
    x: object,
    y: object,
    sigma: object = None,
    *,
    independent: Sequence[str] = ("x",),
    nan_policy: str = "raise",
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
    labels: Mapping[str, str] | None = None,
    omit_hint: str = "nan_policy='omit'",
) -> FitData:
    """Check lengths, finiteness and ``sigma > 0``; apply the NaN policy; make tensors.

    Messages call the arrays ``x`` (``x['t']`` for a mapping), ``y`` and ``sigma``;
    ``labels`` replace those names (the CLI passes ``"decay.csv: column 'counts'"`` for
    ``y``), and ``omit_hint`` is how the caller spells the omit policy.

    Example:
        >>> d = prepare_data([0, 1, float("nan")], [1, 2, 3], nan_policy="omit")
        >>> d.y.tolist(), d.n_omitted
        ([1.0, 2.0], 1)
    """
    if nan_policy not in NAN_POLICIES:
        raise OptionError(
            f"nan_policy must be one of {', '.join(NAN_POLICIES)}, got {nan_policy!r}"
        )
    if isinstance(x, Mapping):
        missing = [name for name in independent if name not in x]
        if missing:
            raise DataError(
                f"x has no variable {missing[0]!r}; the model needs {list(independent)}"
            )
        keys = {name: f"x[{name!r}]" for name in independent}  # never clash with y, sigma
        arrays = {keys[name]: _as_numpy(x[name], keys[name]) for name in independent}
    else:
        keys = {independent[0]: "x"}
        arrays = {"x": _as_numpy(x, "x")}
    y_np = arrays["y"] = _as_numpy(y, "y")
    if sigma is not None:
        sigma_np = _as_numpy(sigma, "sigma", scalar=True)
        one = sigma_np.size == 1  # one sigma for every point
        arrays["sigma"] = np.full(y_np.shape, sigma_np.item()) if one else sigma_np
    for name, values in arrays.items():
        if len(values) != len(y_np):
            raise DataError(
                f"{name} and y must have the same length, got {len(values)} and {len(y_np)}"
            )
    label = {name: name for name in arrays} | dict(labels or {})
    keep = np.ones(len(y_np), dtype=bool)
    for name, values in arrays.items():
        bad = ~np.isfinite(values)
        if bad.any() and nan_policy == "raise":
            row = int(np.argmax(bad))
            raise DataError(
                f"{label[name]} has a non-finite value ({values[row]}) at row {row}; "
                f"clean the data or use {omit_hint}"
            )
        keep &= ~bad
    if "sigma" in arrays and (arrays["sigma"][keep] <= 0).any():
        row = int(np.argmax((arrays["sigma"] <= 0) & keep))
        raise DataError(f"{label['sigma']} must be > 0, got {arrays['sigma'][row]} at row {row}")
    tensors = {k: torch.as_tensor(v[keep], dtype=dtype, device=device) for k, v in arrays.items()}
    x_out: Tensor | dict[str, Tensor] = (
        {name: tensors[key] for name, key in keys.items()}
        if isinstance(x, Mapping)
        else tensors["x"]
    )
    return FitData(x_out, tensors["y"], tensors.get("sigma"), int((~keep).sum()))


@dataclass(frozen=True)
class TableOptions:
    """How to split a text table: ``delimiter`` (None: detect; ``","``, ``"tab"``, ``";"``,
    ``"whitespace"`` or any one character) and ``header`` (None: detect; False names the
    columns by position, ``c0, c1, ...``). Parquet and NumPy files take neither.
    """

    delimiter: str | None = None
    header: bool | None = None

    def __post_init__(self) -> None:
        if self.delimiter is not None:  # frozen: normalise through object.__setattr__
            object.__setattr__(self, "delimiter", parse_delimiter(self.delimiter, "delimiter"))

    @property
    def given(self) -> bool:
        return self.delimiter is not None or self.header is not None


_OPTIONS: ContextVar[TableOptions | None] = ContextVar("table_options", default=None)


@contextlib.contextmanager
def table_options(options: TableOptions) -> Iterator[TableOptions]:
    """Read text tables with ``options`` inside the block, wherever the reading happens.

    The CLI sets ``--delimiter`` and ``--header/--no-header`` here once, so every command's
    reader sees them without threading them through each call chain.
    """
    token = _OPTIONS.set(options)
    try:
        yield options
    finally:
        _OPTIONS.reset(token)


def parse_delimiter(text: str, option: str = "--delimiter") -> str:
    """A delimiter as a user spells it: ``tab``/``\\t``, ``whitespace``/``" "``, one character.

    Example:
        >>> parse_delimiter("tab") == "\\t", parse_delimiter(";"), parse_delimiter(" ")
        (True, ';', 'whitespace')
    """
    if text == "\t":
        return text
    if text and text.isspace():  # " ": columns padded with spaces, so any run of blanks
        return WHITESPACE
    name = text.strip().lower()
    if name in DELIMITER_NAMES:
        return DELIMITER_NAMES[name]
    if len(text) == 1 and not text.isalnum() and text not in '"\r\n.-+':
        return text
    raise OptionError(
        f"{option} must be one character (',', ';', '|'), 'tab' or 'whitespace', got {text!r}"
    )


def read_table(
    path: str | Path, columns: Sequence[str], options: TableOptions | None = None
) -> dict[str, np.ndarray]:
    """Read ``columns`` of a CSV/TSV/text/Parquet/NumPy file as float64 arrays.

    Non-numeric cells raise a ``DataError`` naming the column and first bad row.
    """
    path = Path(path)
    table = read_raw_table(path, options)
    result = {}
    for name in columns:
        if name not in table:
            close = difflib.get_close_matches(name, list(table), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise DataError(
                f"{path}: no column {name!r}{hint}; columns are {', '.join(table)}"
                f"{_headerless_note(table)}"
            )
        result[name] = to_float(table[name], f"{path}: column {name!r}")
    return result


def _headerless_note(table: Mapping[str, object]) -> str:
    if list(table) != [f"c{i}" for i in range(len(table))]:
        return ""
    return " (read without a header row; give --header if the first row names the columns)"


def read_raw_table(path: Path, options: TableOptions | None = None) -> dict[str, np.ndarray]:
    """All columns of a table file as NumPy arrays (strings left as objects).

    ``options`` default to those of the enclosing ``table_options`` block, else detection.
    """
    options = options or _OPTIONS.get() or TableOptions()
    if not path.exists():
        raise DataError(f"{path}: no such file")
    if not path.is_file():
        raise DataError(f"{path}: not a file")
    suffix = path.suffix.lower()
    if suffix not in TABLE_SUFFIXES:
        raise DataError(
            f"{path}: unsupported file type {suffix or '(none)'!r}; use CSV, Parquet or NumPy "
            f"({' '.join(TABLE_SUFFIXES)})"
        )
    if options.given and suffix not in TEXT_SUFFIXES:
        raise OptionError(
            f"{path}: --delimiter and --header/--no-header apply to text tables "
            f"({' '.join(TEXT_SUFFIXES)}), not {suffix}"
        )
    try:
        size = path.stat().st_size
        if size == 0:
            raise DataError(f"{path}: the file is empty (0 bytes)")
        if suffix in (".npy", ".npz"):
            return _read_numpy(path)
        if suffix in TEXT_SUFFIXES:
            return _read_text(path, options)
        return _read_parquet(path)
    except GradfitError:
        raise
    except Exception as error:  # pyarrow/numpy raise many types for unreadable files
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise DataError(f"{path}: cannot read as {suffix[1:]} ({message})") from None


def _check_text(path: Path, options: TableOptions) -> None:
    """Refuse binary content early: CSV parsers happily read it as one odd column."""
    with open(path, "rb") as handle:
        head = handle.read(SNIFF_BYTES)
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as error:
        if error.start < len(head) - 4:  # not merely a character cut at the end of the sample
            raise DataError(f"{path}: not a text file (binary or non-UTF-8 content)") from None
    at = head.find(b"\0")
    if at >= 0:
        raise DataError(
            f"{path}: {_place_of(path, head, at, options)} holds a NUL byte: not a text file, "
            "or a damaged one"
        )


def _place_of(path: Path, head: bytes, at: int, options: TableOptions) -> str:
    """Where byte ``at`` of a text table is: ``line 3, column 'y'`` (the column when the
    lines before it say how the file is split), else ``line 3``."""
    before = head[:at].decode("utf-8-sig", errors="replace").split("\n")
    place, prefix = f"line {len(before)}", before[-1].rstrip("\r")
    rows = [row for row in before[:-1] if row.strip() and not row.lstrip().startswith("#")]
    if not rows:
        return place
    try:
        tab = path.suffix.lower() in (".tsv", ".tab")
        delimiter = options.delimiter or ("\t" if tab else _sniff_delimiter(path, rows))
    except DataError:
        return place
    first = [name.strip() for name in _split(rows[0], delimiter)]
    header = options.header if options.header is not None else not _is_numeric_row(first)
    fields = _split(prefix, delimiter)
    if delimiter == WHITESPACE:  # "3 " has begun its second field, "3" is in its first
        index = len(fields) - (1 if prefix and not prefix[-1].isspace() else 0)
    else:
        index = max(len(fields) - 1, 0)
    if index >= len(first):
        return place
    return f"{place}, column {first[index] if header else f'c{index}'!r}"


def _read_text(path: Path, options: TableOptions) -> dict[str, np.ndarray]:
    _check_text(path, options)
    skip, lines = _sample_lines(path)
    if not lines:
        raise DataError(f"{path}: the file has no data rows")
    delimiter = options.delimiter
    if delimiter is None:
        tab = path.suffix.lower() in (".tsv", ".tab")
        delimiter = "\t" if tab else _sniff_delimiter(path, lines)
    first = _split(lines[0], delimiter)
    header = options.header if options.header is not None else not _is_numeric_row(first)
    if delimiter == WHITESPACE:
        table = _read_whitespace(path, skip, header)
    else:
        table = _read_delimited(path, delimiter, skip, header, len(first))
    _check_not_one_column(path, table, delimiter, header)
    return table


def _sample_lines(path: Path) -> tuple[int, list[str]]:
    """(leading blank or ``#`` lines to skip, up to 50 non-blank lines after them)."""
    with open(path, "rb") as handle:
        head = handle.read(SNIFF_BYTES)
        whole = not handle.read(1)
    lines = head.decode("utf-8-sig", errors="replace").splitlines()
    if not whole and len(lines) > 1:
        lines = lines[:-1]  # the sample may end inside a line
    skip = 0
    while skip < len(lines) and (not lines[skip].strip() or lines[skip].lstrip().startswith("#")):
        skip += 1
    return skip, [line for line in lines[skip:] if line.strip()][:50]


def _split(line: str, delimiter: str) -> list[str]:
    if delimiter == WHITESPACE:
        return line.split()
    return next(csv.reader([line], delimiter=delimiter), [])


def _sniff_delimiter(path: Path, lines: list[str]) -> str:
    """The first of tab, ``;``, ``,`` (quote-aware) and whitespace that splits every sampled
    line into as many fields (>= 2) as the first line; else the one that does so for most
    lines, so that the reader names the odd row; else refuse with a hint."""
    best, agreeing = None, 1
    for delimiter in (*SNIFFED, WHITESPACE):
        rows = (
            csv.reader(lines, delimiter=delimiter)
            if delimiter in SNIFFED
            else map(str.split, lines)
        )
        widths = [len(row) for row in rows]
        if widths[0] < 2:
            continue
        agree = widths.count(widths[0])
        if agree == len(widths):
            return delimiter
        if agree > agreeing:
            best, agreeing = delimiter, agree
    if best is not None:
        return best
    if not any(c in line for line in lines for c in ("\t", ";", ",", " ")):
        return ","  # one column: nothing to sniff
    raise DataError(
        f"{path}: cannot tell how the columns are separated: its first lines split into "
        "different numbers of fields on tab, ';', ',' and whitespace; give --delimiter "
        "(',', tab, ';', whitespace or another character)"
    )


def _is_numeric_row(fields: Sequence[str]) -> bool:
    """True for a first row of numbers (and blanks): data, so the file has no header."""
    cells = [field.strip() for field in fields if field.strip()]
    try:
        [float(cell) for cell in cells]
    except ValueError:
        return False
    return bool(cells)


def _shown(delimiter: str) -> str:
    return {"\t": "tab", WHITESPACE: "whitespace"}.get(delimiter, repr(delimiter))


def _read_delimited(
    path: Path, delimiter: str, skip: int, header: bool, width: int
) -> dict[str, np.ndarray]:
    import pyarrow as pa
    import pyarrow.csv as pa_csv

    names = None if header else [f"c{i}" for i in range(width)]
    ragged: list[Any] = []

    def keep_first(row: Any) -> str:  # the row the error is about, to name its line
        ragged.append(row)
        return "error"

    try:
        table = pa_csv.read_csv(
            path,
            read_options=pa_csv.ReadOptions(skip_rows=skip, column_names=names),
            parse_options=pa_csv.ParseOptions(delimiter=delimiter, invalid_row_handler=keep_first),
            convert_options=pa_csv.ConvertOptions(auto_dict_encode=False),
        )
    except pa.ArrowInvalid as error:  # e.g. a row with more fields than the first
        raise DataError(_ragged_message(path, delimiter, header, ragged, error)) from None
    if table.num_rows == 0:
        raise DataError(f"{path}: the file has no data rows")
    table = table.rename_columns([name.strip() for name in table.column_names])
    return {name: table.column(name).to_numpy(zero_copy_only=False) for name in table.column_names}


def _ragged_message(
    path: Path, delimiter: str, header: bool, ragged: list[Any], error: Exception
) -> str:
    """A row with too many or too few fields: a file cut off mid-row (its last line short,
    with no newline) says so and names the missing column; another names its line."""
    if not ragged:
        message = str(error).splitlines()[0]
        return (
            f"{path}: cannot read as separated by {_shown(delimiter)} ({message}); "
            "if the separator is another, give --delimiter"
        )
    expected, actual, text = ragged[0].expected_columns, ragged[0].actual_columns, ragged[0].text
    lines, last = _count_lines(path)
    fields = _split(last, delimiter) if last is not None else []
    if last is not None and len(fields) < expected:
        _, sample = _sample_lines(path)
        first = [name.strip() for name in _split(sample[0], delimiter)]
        names = first if header else [f"c{i}" for i in range(len(first))]
        missing = names[len(fields)] if len(fields) < len(names) else f"c{len(fields)}"
        return (
            f"{path}: the file ends mid-row: line {lines} has {len(fields)} of {expected} "
            f"fields ({last!r}), no value for column {missing!r}; was it cut off?"
        )
    number = _line_number(path, text)
    where = f"line {number}" if number is not None else "a row"
    return (
        f"{path}: cannot read as separated by {_shown(delimiter)}: {where} has {actual} "
        f"fields, not {expected} ({text!r}); if the separator is another, give --delimiter"
    )


def _count_lines(path: Path) -> tuple[int, str | None]:
    """(the number of lines, the last line if the file does not end with a newline)."""
    count, tail = 0, b""
    with open(path, "rb") as handle:
        while block := handle.read(1 << 20):
            count += block.count(b"\n")
            tail = (tail + block)[-SNIFF_BYTES:]
    if tail.endswith(b"\n"):
        return count, None
    return count + 1, tail.rsplit(b"\n", 1)[-1].decode("utf-8", errors="replace").rstrip("\r")


def _line_number(path: Path, text: str) -> int | None:
    """The number of the first line that reads ``text``."""
    with open(path, encoding="utf-8-sig", errors="replace", newline="") as handle:
        for number, line in enumerate(handle, 1):
            if line.rstrip("\r\n") == text:
                return number
    return None


def _read_whitespace(path: Path, skip: int, header: bool) -> dict[str, np.ndarray]:
    """Columns separated by runs of spaces or tabs (as ``numpy.loadtxt`` reads them)."""
    with open(path, encoding="utf-8-sig") as handle:
        lines = handle.read().splitlines()
    rows = [(n, line.split()) for n, line in enumerate(lines[skip:], skip + 1) if line.strip()]
    width = len(rows[0][1])
    for number, fields in rows:
        if len(fields) != width:
            raise DataError(
                f"{path}: line {number} has {len(fields)} fields, line {rows[0][0]} has "
                f"{width} (read as separated by whitespace; give --delimiter if it is another)"
            )
    names = rows[0][1] if header else [f"c{i}" for i in range(width)]
    data = [fields for _, fields in rows[1 if header else 0 :]]
    if not data:
        raise DataError(f"{path}: the file has no data rows")
    return {
        name: np.array(column) for name, column in zip(names, zip(*data, strict=True), strict=True)
    }


def _check_not_one_column(
    path: Path, table: Mapping[str, np.ndarray], delimiter: str, header: bool
) -> None:
    """A table read as one column whose first line splits on another delimiter was read
    with the wrong one (a ``;`` file named .tsv, or the wrong --delimiter)."""
    if len(table) != 1:
        return
    name, values = next(iter(table.items()))
    first = name if header else str(values[0])
    for other in (*SNIFFED, WHITESPACE):
        if other != delimiter and len(_split(first, other)) >= 2:
            raise DataError(
                f"{path}: read as one column {first!r} separated by {_shown(delimiter)}, but "
                f"its lines look separated by {_shown(other)}: give --delimiter {_shown(other)}"
            )


def _read_parquet(path: Path) -> dict[str, np.ndarray]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as error:  # pyarrow raises ArrowInvalid, OSError, ... for bad files
        raise DataError(_parquet_damage(path, error)) from None
    if table.num_rows == 0:
        raise DataError(f"{path}: the file has no data rows")
    return {name: table.column(name).to_numpy(zero_copy_only=False) for name in table.column_names}


def _parquet_damage(path: Path, error: Exception) -> str:
    """What is wrong with a Parquet file pyarrow cannot read: no footer (cut off, or not
    Parquet), or the first column whose data cannot be read."""
    import pyarrow.parquet as pq

    message = (str(error).strip().splitlines() or [type(error).__name__])[0]
    if "magic bytes not found" in message:
        return (
            f"{path}: cannot read as parquet: no Parquet footer at its end (the file is "
            "cut off, or not Parquet)"
        )
    with contextlib.suppress(Exception):  # a damaged footer: no column to name
        for name in pq.read_schema(path).names:
            try:
                pq.read_table(path, columns=[name])
            except Exception as column_error:
                detail = (str(column_error).strip().splitlines() or [message])[0]
                return (
                    f"{path}: cannot read as parquet: column {name!r} is damaged ({detail}); "
                    "the file may be cut off or corrupted"
                )
    return f"{path}: cannot read as parquet ({message})"


def _read_numpy(path: Path) -> dict[str, np.ndarray]:
    loaded = np.load(path, allow_pickle=False)
    if isinstance(loaded, np.ndarray):
        if loaded.dtype.names:
            return {name: loaded[name] for name in loaded.dtype.names}
        raise DataError(f"{path}: a .npy file must hold a structured array with named columns")
    with loaded:
        return {name: loaded[name] for name in loaded.files}


def to_float(values: np.ndarray, what: str) -> np.ndarray:
    """Convert a column to float64, naming the first row that is not a number."""
    if values.dtype.kind in "fiu":
        return values.astype(np.float64)
    if values.dtype.kind == "b":
        raise DataError(f"{what}: booleans are not numbers")
    if values.dtype.kind in "mM":  # their float values would be counts of some unit
        raise DataError(
            f"{what}: dates and times are not numbers; convert them, e.g. to seconds since "
            "the first"
        )
    with contextlib.suppress(ValueError, TypeError):  # text of numbers: convert in C
        return values.astype(np.float64)
    out = np.empty(len(values), dtype=np.float64)
    for row, value in enumerate(values):
        if value is None:
            out[row] = np.nan
            continue
        try:
            out[row] = float(value)
        except (TypeError, ValueError):
            raise DataError(f"{what}: row {row} is not a number ({_cell(value)})") from None
    return out


def _cell(value: object) -> str:
    """A cell that is not a number, as a message shows it: ``'v0'``, ``a list [1.0, 2.0]``."""
    if isinstance(value, str):
        return repr(str(value))  # not np.str_('v0')
    if isinstance(value, np.ndarray | list | tuple):
        return f"a list {np.asarray(value, dtype=object).tolist()!r}"
    if isinstance(value, dict):
        return f"a record {value!r}"
    return repr(value)
