"""A long loss history kept beside results.json as a compact ``.npz``, not inline.

The demo's 15,000 epochs would be 15,000 numbers in the JSON (about 300 kB of text); in an
``.npz`` they take 8 bytes each, bit-exact. Short histories stay inline, where ``jq`` and
other readers see them directly.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np

from gradfit.errors import DataError
from gradfit.io.files import write_with

#: longer histories go to ``<stem>.history.npz`` beside the JSON
INLINE_HISTORY = 10_000


def history_path(json_path: Path) -> Path:
    """``results.json`` -> ``results.history.npz``."""
    return json_path.with_name(json_path.stem + ".history.npz")


def store_history(history: list[float], json_path: Path) -> str | None:
    """Write ``history`` beside ``json_path`` (atomically) if it is long; its file name, or
    None when it stays inline."""
    if len(history) <= INLINE_HISTORY:
        return None
    buffer = io.BytesIO()  # np.savez would append ".npz" to the temporary file's name
    np.savez_compressed(buffer, loss=np.asarray(history, dtype=np.float64))
    target = history_path(json_path)

    def write(tmp: Path) -> None:
        tmp.write_bytes(buffer.getvalue())

    write_with(target, write)
    return target.name


def history_entry(history: list[float], file: str | None) -> Any:
    """What results.json holds under ``"history"``: the numbers, or where they are."""
    if file is None:
        return [None if not np.isfinite(v) else float(v) for v in history]
    return {"file": file, "length": len(history)}


def load_history(entry: Any, json_path: Path) -> list[float]:
    """The history that ``history_entry`` described, read back (NaN for a saved null).

    Example:
        >>> load_history([1.0, None], Path("results.json"))
        [1.0, nan]
    """
    if isinstance(entry, list):
        return [float("nan") if v is None else float(v) for v in entry]
    path = json_path.with_name(str(entry["file"]))
    try:
        with np.load(path) as saved:
            values: list[float] = saved["loss"].astype(np.float64).tolist()
    except (OSError, KeyError, ValueError) as error:
        raise DataError(f"{path}: cannot read the loss history ({error})") from None
    if len(values) != int(entry["length"]):
        raise DataError(
            f"{path}: holds {len(values)} epochs, {json_path.name} says {entry['length']}; "
            "the two files are from different runs"
        )
    return values
