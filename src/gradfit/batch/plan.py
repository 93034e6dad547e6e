"""fit-many's plan: which groups each task fits, from one scan of the input's group keys.

The scan (:func:`scan_unit`, one call per unit, on a Dask worker or here) reads each unit
once, checks it, and keeps only the key of each contiguous run of rows, the run's length and
a hash of each column. From the runs alone (:func:`build_index`) the driver sees which
groups are whole inside one unit and which *straddle*: split across row groups or files, or
re-appearing later. Whole groups are fitted unit by unit as the input streams by; only the
straddlers are gathered (each straddler task reads just the units its groups touch, keeping
their rows), so a sorted or partitioned input is never shuffled.

Every engine runs the same tasks and the same chunks, so results do not depend on the engine.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from gradfit.batch.sources import Rows, Spec, Unit, read_rows
from gradfit.errors import DataError
from gradfit.fitting.checkpoint import digest

#: a task reads units until it holds this many rows (a unit larger than this stays whole)
TASK_ROWS = 1 << 21
#: and fits at most this many chunks (so a Dask task lasts seconds, not minutes)
CHUNKS_PER_TASK = 8


@dataclass
class UnitScan:
    """What the plan needs of one unit: its runs of equal keys and its columns' hashes."""

    run_keys: np.ndarray  # the key of each contiguous run of rows, in order
    run_rows: np.ndarray  # rows in each run
    run_valid: np.ndarray  # finite rows in each run (all of them under nan_policy="raise")
    width: int  # a wide unit's points per curve (0 for long-form rows)
    digests: dict[str, str | None]


def scan_unit(unit: Unit, spec: Spec) -> UnitScan:
    """Read and check ``unit`` (file, column and row named in every error), keep its runs."""
    rows = read_rows(unit, spec)
    digests = {"keys": digest(rows.keys)} | {r: digest(v) for r, v in rows.columns.items()}
    if unit.kind == "wide":
        n_curves, width = rows.columns["y"].shape
        ones = np.ones(n_curves, dtype=np.int64)
        return UnitScan(rows.keys, ones, ones, width, digests)
    starts = run_starts(rows.keys)
    valid = np.add.reduceat(rows.finite.astype(np.int64), starts) if len(rows) else starts
    return UnitScan(rows.keys[starts], np.diff(np.r_[starts, len(rows)]), valid, 0, digests)


def scan_units(units: list[Unit], spec: Spec) -> list[UnitScan]:
    """:func:`scan_unit` of each of ``units`` (one Dask task per file, not per row group)."""
    return [scan_unit(unit, spec) for unit in units]


def run_starts(keys: np.ndarray) -> np.ndarray:
    """The first row of each run of equal consecutive keys.

    Example:
        >>> run_starts(np.array(["a", "a", "b", "a"])).tolist()
        [0, 2, 3]
    """
    if len(keys) == 0:
        return np.zeros(0, dtype=np.int64)
    return np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])


@dataclass
class Task:
    """Groups ``keys`` (their places in the output: ``ranks``, increasing), read from
    ``units``; ``whole`` when the units hold no other group's rows (no filtering needed)."""

    index: int
    units: list[Unit]
    keys: np.ndarray
    ranks: np.ndarray
    whole: bool
    straddlers: bool = False  # its groups straddle units (gathered from several)

    def chunks(self, chunk_size: int) -> list[int]:
        """The first group of each of the task's chunks."""
        return list(range(0, len(self.keys), chunk_size))


@dataclass
class Index:
    """Every group in first-seen order, which runs straddle, and the data's identity."""

    keys: np.ndarray  # every group, in the order of its first row in the input
    run_unit: np.ndarray  # the unit of each run
    run_group: np.ndarray  # each run's group (its index in ``keys``)
    straddles: np.ndarray  # [groups] bool: in more than one run
    n_valid: np.ndarray  # [groups] finite rows
    n_dropped: int  # non-finite rows (nan_policy="omit")
    width: int  # the longest group's finite rows: the packed curves' length
    digests: dict[str, str | None] = field(default_factory=dict)

    @property
    def n_empty(self) -> int:
        return int((self.n_valid == 0).sum())


def build_index(scans: list[UnitScan], group: str | None) -> Index:
    """The runs of every unit, joined: groups in first-seen order, straddlers marked."""
    run_keys = np.concatenate([s.run_keys for s in scans]) if scans else np.zeros(0)
    run_unit = np.repeat(np.arange(len(scans)), [len(s.run_keys) for s in scans])
    try:
        unique, first, inverse, counts = np.unique(
            run_keys, return_index=True, return_inverse=True, return_counts=True
        )
    except TypeError:  # e.g. 3 in one file, "3" in another: not comparable
        kinds = sorted({type(k).__name__ for k in run_keys})
        raise DataError(
            f"column {group!r} holds keys of different types ({', '.join(kinds)}) in different "
            "files; give every file the same key type"
        ) from None
    order = np.argsort(first, kind="stable")
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    run_group = rank[inverse.reshape(-1)]
    rows = np.concatenate([s.run_valid for s in scans]) if scans else np.zeros(0, np.int64)
    total = np.concatenate([s.run_rows for s in scans]) if scans else np.zeros(0, np.int64)
    n_valid = np.bincount(run_group, weights=rows, minlength=len(unique)).astype(np.int64)
    width = max([s.width for s in scans] + [int(n_valid.max(initial=0)), 1])
    return Index(
        keys=unique[order], run_unit=run_unit, run_group=run_group,
        straddles=(counts > 1)[order], n_valid=n_valid, n_dropped=int((total - rows).sum()),
        width=width, digests=_joined_digests(scans),
    )  # fmt: skip


def _joined_digests(scans: list[UnitScan]) -> dict[str, str | None]:
    """One hash per column over every unit, in order (the resume identity's ``data``)."""
    roles = dict.fromkeys(role for s in scans for role in s.digests)
    joined: dict[str, str | None] = {}
    for role in roles:
        parts = [s.digests.get(role) for s in scans]
        if all(p is None for p in parts):
            joined[role] = None
            continue
        hasher = hashlib.sha256("\x00".join(str(p) for p in parts).encode())
        joined[role] = hasher.hexdigest()[:32]
    return joined


def plan_tasks(index: Index, units: list[Unit], chunk_size: int) -> list[Task]:
    """Whole groups unit by unit (consecutive units joined up to ``TASK_ROWS`` rows and
    ``CHUNKS_PER_TASK`` chunks; a unit with more groups split over tasks that each read it),
    then the straddlers in first-seen order."""
    limit = chunk_size * CHUNKS_PER_TASK
    tasks: list[Task] = []
    local = ~index.straddles[index.run_group]
    bounds = np.searchsorted(index.run_unit, np.arange(len(units) + 1))
    pending: list[tuple[Unit, np.ndarray, bool]] = []  # (unit, its whole groups, only those)
    rows = held = 0  # rows and groups pending

    def flush() -> None:
        nonlocal rows, held
        groups = np.concatenate([g for _, g, _ in pending]) if pending else np.zeros(0, int)
        whole = all(only for _, _, only in pending)
        for start in range(0, len(groups), limit):
            part = groups[start : start + limit]
            tasks.append(Task(len(tasks), [u for u, _, _ in pending], index.keys[part], part,
                              whole and len(part) == len(groups)))  # fmt: skip
        pending.clear()
        rows = held = 0

    for i, unit in enumerate(units):
        runs = slice(bounds[i], bounds[i + 1])
        mine = local[runs]
        if not mine.any():
            continue
        groups = index.run_group[runs][mine]
        if pending and held + len(groups) > limit:
            flush()  # a task's units hold only its own groups (and straddlers)
        pending.append((unit, groups, bool(mine.all())))
        rows, held = rows + unit.n_rows, held + len(groups)
        if rows >= TASK_ROWS or held >= limit:
            flush()
    flush()
    straddlers = np.flatnonzero(index.straddles)  # in first-seen order
    for start in range(0, len(straddlers), limit):
        groups = straddlers[start : start + limit]
        touched = np.unique(index.run_unit[np.isin(index.run_group, groups)])
        tasks.append(Task(len(tasks), [units[u] for u in touched], index.keys[groups],
                          groups, False, straddlers=True))  # fmt: skip
    return tasks


class UnitCache:
    """The last unit read, kept: consecutive tasks of one large row group read it once."""

    def __init__(self) -> None:
        self._unit: Unit | None = None
        self._rows: Rows | None = None

    def read(self, unit: Unit, spec: Spec) -> Rows:
        if self._rows is None or self._unit != unit:
            self._unit, self._rows = None, None  # drop the old one before reading the next
            self._rows, self._unit = read_rows(unit, spec), unit
        return self._rows


def read_task(task: Task, spec: Spec, cache: UnitCache | None = None) -> dict[str, np.ndarray]:
    """The task's groups packed as ``[G, N]`` NaN-padded arrays (``x``, ``y``, ``sigma``),
    row ``i`` being ``task.keys[i]``; a group left without finite points is all NaN."""
    cache = cache or UnitCache()
    if task.units and task.units[0].kind == "wide":
        return _wide_task(task, cache.read(task.units[0], spec))
    pieces = []
    for unit in task.units:
        rows = cache.read(unit, spec)
        if not task.whole:
            rows = rows.select(_member(rows.keys, task.keys))
        pieces.append(rows)
    keys = np.concatenate([p.keys for p in pieces]) if pieces else np.zeros(0)
    finite = np.concatenate([p.finite for p in pieces]) if pieces else np.zeros(0, bool)
    columns = {
        role: np.concatenate([p.columns[role] for p in pieces]) for role in spec.names
    } if pieces else {}  # fmt: skip
    if not finite.all():  # nan_policy="omit": drop the rows, the group keeps its row
        keys, columns = keys[finite], {r: v[finite] for r, v in columns.items()}
    return pack_in_order(task.keys, keys, columns)


def _member(keys: np.ndarray, wanted: np.ndarray) -> np.ndarray:
    """``np.isin`` through a hash set (Arrow's): string keys need no sort."""
    import pyarrow as pa
    import pyarrow.compute as pc

    found = pc.is_in(pa.array(keys), value_set=pa.array(wanted))
    return np.asarray(found.to_numpy(zero_copy_only=False), dtype=bool)


def _wide_task(task: Task, rows: Rows) -> dict[str, np.ndarray]:
    curves = task.keys.astype(np.int64)
    n_curves = rows.columns["y"].shape[0]
    packed = {}
    for role, values in rows.columns.items():
        per_curve = values.ndim == 2 and values.shape[0] == n_curves
        packed[role] = values[curves] if per_curve else values
    return packed


def pack_in_order(
    expected: np.ndarray, keys: np.ndarray, columns: dict[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """Rows of ``columns`` grouped by ``keys`` into ``[len(expected), N_max]`` NaN-padded
    arrays, row ``i`` holding group ``expected[i]``'s rows in their order.

    Example:
        >>> packed = pack_in_order(np.array(["b", "a", "c"]), np.array(["a", "b", "a"]),
        ...                        {"y": np.array([1.0, 2.0, 3.0])})
        >>> packed["y"].tolist()
        [[2.0, nan], [1.0, 3.0], [nan, nan]]
    """
    n_groups = len(expected)
    starts = run_starts(keys)
    if len(starts) == n_groups and (keys[starts] == expected).all():
        counts = np.diff(np.r_[starts, len(keys)])  # already grouped, in order: no sort
        if n_groups and (counts == counts[0]).all():
            shape = (n_groups, int(counts[0]))
            return {name: values.reshape(shape) for name, values in columns.items()}
        group, rows = np.repeat(np.arange(n_groups), counts), None
    else:
        sorter = np.argsort(expected, kind="stable")
        group = sorter[np.searchsorted(expected, keys, sorter=sorter)]
        rows = np.argsort(group, kind="stable")
        group = group[rows]
        counts = np.bincount(group, minlength=n_groups)
    position = np.arange(len(keys)) - np.repeat(np.cumsum(counts) - counts, counts)
    width = max(int(counts.max(initial=0)), 1)
    packed = {}
    for name, values in columns.items():
        out = np.full((n_groups, width), np.nan)
        out[group, position] = values if rows is None else values[rows]
        packed[name] = out
    return packed


def task_keys(task: Task, start: int, stop: int) -> Any:
    """The group keys of chunk ``start:stop`` of ``task``."""
    return task.keys[start:stop]
