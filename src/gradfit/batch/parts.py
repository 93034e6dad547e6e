"""fit-many's finished chunks: one Parquet file per chunk in a parts folder, and the task that
writes them (the same function runs here and on a Dask worker).

The folder's manifest holds the chunking and the run's identity, so ``--resume`` continues
only the same run; a chunk whose file exists is never fitted again, so a task that a killed
Dask worker left half done is finished, not repeated, when it is retried.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gradfit.batch.fit_batch import fit_batch
from gradfit.batch.plan import Task, UnitCache, read_task
from gradfit.batch.sources import Spec
from gradfit.errors import OptionError, OutputError
from gradfit.fitting.checkpoint import mismatch
from gradfit.io.files import make_parents, remove_folders, write_text_atomic
from gradfit.model.models import Model
from gradfit.options import FitOptions
from gradfit.results.batch_result import BatchResult


def part_name(task: int, start: int) -> str:
    return f"part-{task:06d}-{start:09d}.parquet"


class PartStore:
    """Finished chunks as Parquet files in ``folder``; ``manifest`` names the manifest file
    (``manifest.json`` beside a file output, ``_manifest.json`` inside a folder output, where
    readers of Parquet datasets skip it)."""

    def __init__(
        self,
        folder: Path,
        *,
        resume: bool,
        chunk_size: int,
        identity: dict[str, Any],
        manifest: str = "manifest.json",
    ) -> None:
        self.folder = folder
        self._created: list[Path] = []
        path = self.folder / manifest
        if resume and path.exists():
            saved = json.loads(path.read_text())
            self._check(saved.get("identity"), identity)
            self.chunk_size = int(saved["chunk_size"])
            return
        if self.folder.exists():
            shutil.rmtree(self.folder)
        self._created = make_parents(path)  # the folder and any parent it needed
        self.chunk_size = chunk_size
        try:
            write_text_atomic(
                path, json.dumps({"chunk_size": self.chunk_size, "identity": identity})
            )
        except OutputError:
            remove_folders(self._created)
            raise

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

    def done(self, task: Task) -> bool:
        """Whether every chunk of ``task`` is in."""
        return all(
            (self.folder / part_name(task.index, s)).exists() for s in task.chunks(self.chunk_size)
        )

    def _chunks(self, tasks: list[Task]) -> Iterator[tuple[np.ndarray, Any]]:
        """(ranks, table) of every chunk of ``tasks``, in order, read one at a time."""
        import pyarrow.parquet as pq

        for task in tasks:
            for start in task.chunks(self.chunk_size):
                table = pq.read_table(self.folder / part_name(task.index, start))
                yield task.ranks[start : start + self.chunk_size], table

    def tables(self, tasks: list[Task], *, reorder: bool) -> Iterator[Any]:
        """Every part's rows as Arrow tables, in task order; with ``reorder`` in the input's
        first-seen group order, a part or two in memory at a time.

        The whole groups' tasks list their groups in first-seen order, and so do the
        straddlers' tasks: the output is the merge of these two sorted streams.
        """
        if not reorder:
            yield from (table for _, table in self._chunks(tasks))
            return
        import pyarrow as pa

        gathered = self._chunks([t for t in tasks if t.straddlers])
        waiting: list[tuple[np.ndarray, Any]] = []  # straddlers' rows not yet placed
        for ranks, table in self._chunks([t for t in tasks if not t.straddlers]):
            before: list[tuple[np.ndarray, Any]] = []  # straddlers' rows due before ranks[-1]
            while True:
                if not waiting:
                    waiting = [next(gathered, (np.zeros(0, np.int64), None))]
                    if waiting[0][1] is None:
                        waiting = []
                        break
                pending, rows = waiting[0]
                due = int(np.searchsorted(pending, ranks[-1]))
                before.append((pending[:due], rows.slice(0, due)))
                if due < len(pending):
                    waiting = [(pending[due:], rows.slice(due))]
                    break
                waiting = []
            if any(len(r) for r, _ in before):
                merged = np.concatenate([ranks, *(r for r, _ in before)])
                joined = pa.concat_tables([table, *(t for _, t in before)])
                table = joined.take(pa.array(np.argsort(merged, kind="stable")))
            yield table
        for _, rows in waiting:
            yield rows
        yield from (rows for _, rows in gathered)

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


@dataclass(frozen=True)
class Job:
    """What every task of one run shares (a few kB: it travels with each Dask task)."""

    spec: Spec
    model: Model
    options: FitOptions
    chunk_size: int
    folder: str
    key_name: str


@dataclass
class TaskReport:
    """What a task did: groups fitted now, and which LM kernel the process runs."""

    fitted: int
    kernel: str
    worker: str = ""


def kernel_name() -> str:
    """``numba`` where the compiled LM kernel loads (Numba imports and can cache), else
    ``pytorch`` (the reference kernel: the same answers, slower)."""
    from gradfit.optim import compiled_lm

    if os.environ.get("GRADFIT_COMPILED", "1") == "0" or compiled_lm() is None:
        return "pytorch"
    return "numba"


def run_task(
    task: Task,
    job: Job,
    *,
    stop: Callable[[], bool] | None = None,
    on_chunk: Callable[[int], None] | None = None,
    cache: UnitCache | None = None,
) -> TaskReport:
    """Read ``task``'s groups, fit them chunk by chunk, write each chunk's part file.

    Chunks whose file exists are skipped (resume, or a retry after a worker died); ``stop``
    skips the chunks not yet started; ``on_chunk(n)`` is told of each chunk of ``n`` groups.
    """
    folder = Path(job.folder)
    paths = {s: folder / part_name(task.index, s) for s in task.chunks(job.chunk_size)}
    if all(p.exists() for p in paths.values()):
        return TaskReport(0, kernel_name())
    packed = read_task(task, job.spec, cache)
    fitted = 0

    def write(start: int, chunk: BatchResult) -> None:
        nonlocal fitted
        chunk.keys, chunk.key_name = task.keys[start : start + len(chunk)], job.key_name
        chunk.to_parquet(paths[start])
        fitted += len(chunk)
        if on_chunk is not None:
            on_chunk(len(chunk))

    def skip(start: int, _stop: int) -> bool:
        return paths[start].exists() or (stop is not None and stop())

    fit_batch(
        job.model, packed["x"], packed["y"], sigma=packed.get("sigma"),
        chunk_size=job.chunk_size, on_chunk=write, skip_chunk=skip, options=job.options,
    )  # fmt: skip
    return TaskReport(fitted, kernel_name())
