"""``gradfit fit-many --shared k``: every group of a table in one global fit, ``k`` shared.

The input is whatever fit-many reads (a file, a folder of Parquet files or a glob; CSV, TSV,
Parquet or a wide ``.npz``), through fit-many's readers (``batch/sources.py``, ``plan.py``):
the same checks, messages and NaN policy. It is held whole (one global problem has no chunks
to stream or resume), packed by group into a NaN-padded ``[K, N_max]`` batch and fitted by
``fit_shared``. The output has one
row per group, its own parameters ± stderr and the shared parameters' columns (the same value
in every row), written atomically; ``BatchResult.load`` reads it back.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from gradfit.batch.many import _note_omitted as note_omitted
from gradfit.batch.plan import Task, build_index, read_task, scan_unit
from gradfit.batch.shared import SharedParams, fit_shared
from gradfit.batch.sources import Spec, find_units
from gradfit.batch.stream import SUFFIXES
from gradfit.errors import OptionError
from gradfit.io.files import check_parent, writing
from gradfit.model.models import Model
from gradfit.options import FitOptions
from gradfit.results.batch_result import BatchResult


def parse_shared(given: Sequence[str] | None) -> list[str]:
    """``--shared k --shared w`` or ``--shared k,w`` -> ``["k", "w"]`` (blanks dropped).

    Example:
        >>> parse_shared(["k, w", "c"])
        ['k', 'w', 'c']
    """
    names = [part.strip() for text in given or () for part in text.split(",")]
    if given and not any(names):
        raise OptionError("--shared: give a parameter name, e.g. --shared k")
    return [name for name in names if name]


def run_fit_many_shared(
    data: Path,
    *,
    model: Model,
    shared: Sequence[str],
    group: str | None,
    x: str,
    y: str,
    sigma: str | None,
    out: Path,
    options: FitOptions,
    overwrite: bool = False,
    resume: bool = False,
) -> tuple[BatchResult, SharedParams]:
    """Fit every group of ``data`` with ``shared`` common to all; write ``out``."""
    if resume:
        raise OptionError(
            "--resume does not apply to --shared: all groups form one global fit, with no "
            "chunks to continue"
        )
    if out.suffix.lower() not in SUFFIXES:
        raise OptionError(f"--out {out}: use a .parquet or .csv file")
    if out.is_dir():
        raise OptionError(f"--out {out}: is a folder; give a .parquet or .csv file name")
    if out.exists() and not overwrite:
        raise OptionError(f"--out {out}: file exists; use --overwrite")
    check_parent(out, "--out")
    names = model.param_names
    for name in shared:  # before the data are read: a typo fails at once
        if name not in names:
            raise OptionError(
                f"--shared: unknown parameter {name!r}; the model's parameters are "
                f"{', '.join(names)}"
            )
    keys, packed, key_name = _read(data, group, x, y, sigma, options.nan_policy)
    result, common = fit_shared(
        model, packed["x"], packed["y"], sigma=packed.get("sigma"), shared=shared,
        options=options,
    )  # fmt: skip
    result.keys, result.key_name = keys, key_name
    with writing(out, "--out"):
        result.save(out)
    return result, common


def _read(
    data: Path, group: str | None, x: str, y: str, sigma: str | None, nan_policy: str
) -> tuple[np.ndarray, dict[str, np.ndarray], str]:
    """(group keys in first-seen order, packed ``[K, N_max]`` arrays, key column name).

    fit-many's reader: ``data`` is a file, a folder of Parquet files or a glob; every unit is
    checked by ``read_rows`` (messages name the file, column and row) and a group split over
    row groups or files is joined. The scan is a first pass over the units (the group order,
    the rows ``--nan-policy omit`` drops); the packing a second, of every group at once.
    """
    units = find_units(data, group=group)
    if any(unit.kind == "wide" for unit in units) and len(units) > 1:
        raise OptionError(f"{data}: a wide .npz input (curves as rows of y) is one file, alone")
    spec = Spec(group, x, y, sigma, nan_policy)
    index = build_index([scan_unit(unit, spec) for unit in units], group)
    if not len(index.keys):
        raise OptionError("the input has no groups to fit")
    if index.n_dropped:
        note_omitted(index)
    everything = np.arange(len(index.keys))  # one task: all units, all groups, no filter
    packed = read_task(Task(0, units, index.keys, everything, whole=True), spec)
    return index.keys, packed, group or "curve"
