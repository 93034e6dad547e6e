"""Data at the edges: loading tables (CSV, Parquet, NumPy), validation, the NaN policy.

Every check names the file, column and first bad row, so a user can fix the input
without reading a traceback.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import DataError, OptionError

Tensor = torch.Tensor
NAN_POLICIES = ("raise", "omit")
TABLE_SUFFIXES = (".csv", ".tsv", ".txt", ".parquet", ".pq", ".npy", ".npz")


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


def read_table(path: str | Path, columns: Sequence[str]) -> dict[str, np.ndarray]:
    """Read ``columns`` of a CSV/TSV/Parquet/NumPy file as float64 arrays.

    Non-numeric cells raise a ``DataError`` naming the column and first bad row.
    """
    path = Path(path)
    table = read_raw_table(path)
    result = {}
    for name in columns:
        if name not in table:
            close = difflib.get_close_matches(name, list(table), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise DataError(f"{path}: no column {name!r}{hint}; columns are {', '.join(table)}")
        result[name] = to_float(table[name], f"{path}: column {name!r}")
    return result


def read_raw_table(path: Path) -> dict[str, np.ndarray]:
    """All columns of a table file as NumPy arrays (strings left as objects)."""
    if not path.exists():
        raise DataError(f"{path}: no such file")
    if not path.is_file():
        raise DataError(f"{path}: not a file")
    suffix = path.suffix.lower()
    if suffix not in TABLE_SUFFIXES:
        raise DataError(
            f"{path}: unsupported file type {suffix or '(none)'!r}; use CSV, Parquet or NumPy"
        )
    try:
        size = path.stat().st_size
        if size == 0:
            raise DataError(f"{path}: the file is empty (0 bytes)")
        if suffix in (".npy", ".npz"):
            return _read_numpy(path)
        if suffix in (".csv", ".tsv", ".txt"):
            _check_text(path)
        return _read_arrow(path, suffix)
    except DataError:
        raise
    except Exception as error:  # pyarrow/numpy raise many types for unreadable files
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise DataError(f"{path}: cannot read as {suffix[1:]} ({message})") from None


def _check_text(path: Path) -> None:
    """Refuse binary content early: CSV parsers happily read it as one odd column."""
    with open(path, "rb") as handle:
        head = handle.read(65536)
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as error:
        if error.start < len(head) - 4:  # not merely a character cut at the end of the sample
            raise DataError(f"{path}: not a text file (binary or non-UTF-8 content)") from None
    if b"\0" in head:
        raise DataError(f"{path}: not a text file (binary content)")


def _read_arrow(path: Path, suffix: str) -> dict[str, np.ndarray]:
    import pyarrow.csv as pa_csv
    import pyarrow.parquet as pq

    if suffix in (".parquet", ".pq"):
        table = pq.read_table(path)
    else:
        delimiter = "\t" if suffix == ".tsv" else ","
        # read everything as text: the numeric check below can then name the bad row
        table = pa_csv.read_csv(
            path,
            parse_options=pa_csv.ParseOptions(delimiter=delimiter),
            convert_options=pa_csv.ConvertOptions(auto_dict_encode=False),
        )
    if table.num_rows == 0:
        raise DataError(f"{path}: the file has no data rows")
    return {name: table.column(name).to_numpy(zero_copy_only=False) for name in table.column_names}


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
    out = np.empty(len(values), dtype=np.float64)
    for row, value in enumerate(values):
        if value is None:
            out[row] = np.nan
            continue
        try:
            out[row] = float(value)
        except (TypeError, ValueError):
            raise DataError(f"{what}: row {row} is not a number ({value!r})") from None
    return out
