"""fit-many on Dask: the local engine's scan and tasks as Dask tasks (``--engine dask``).

Workers read their own units from the files (a task carries the unit's path and row group,
never its rows), fit with the same kernel and write their chunks' part files; the driver
only sees each unit's runs of group keys and each task's count, and commits the output when
every part is in. A worker that dies mid-task costs a retry: Dask reschedules the task, and
its chunks already written are skipped.

Set-up that the first prototype got wrong, done here once:

- each worker gets a writable Numba cache (``NUMBA_CACHE_DIR`` on the node's temporary
  folder when the package's own cache folder is read-only: a read-only cache made gradfit
  fall back to its PyTorch kernel), one torch and one Numba thread per Dask thread, and
  warms the compiled kernel before the first task; each task reports the kernel its worker
  ran, and a fallback is printed as a warning;
- starting a ``LocalCluster`` sets ``OMP_NUM_THREADS=1`` and friends in the client's own
  environment: the client's variables and torch's thread count are put back as they were;
- only this module imports ``dask``/``distributed`` (an optional extra).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import distributed
from distributed import WorkerPlugin, get_worker

from gradfit.batch.parts import Job, TaskReport, kernel_name, run_task
from gradfit.batch.plan import Task, UnitScan, scan_units
from gradfit.batch.sources import Spec, Unit
from gradfit.errors import GradfitError, OptionError

#: the client's thread settings a LocalCluster changes (and this module puts back)
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                    "NUMBA_NUM_THREADS", "MALLOC_TRIM_THRESHOLD_")  # fmt: skip
CONNECT_TIMEOUT = "20s"
# distributed's functions are untyped: called through Any
Client: Any = distributed.Client
LocalCluster: Any = distributed.LocalCluster
wait: Any = distributed.wait
POLL_SECONDS = 0.25  # how often the driver looks at a stop request while tasks run


class WorkerSetup(WorkerPlugin):
    """Run :func:`prepare_worker` once on every worker, new ones included."""

    name = "gradfit-worker-setup"

    def __init__(self) -> None:
        self.client_pid = os.getpid()

    def setup(self, worker: Any) -> None:
        # a worker in the client's own process (``processes=False``) shares its torch: the
        # client's thread count stays as it is (fit_batch runs its chunks side by side there)
        prepare_worker(threads=os.getpid() != self.client_pid)


def dask_setup(worker: Any) -> None:
    """``dask worker --preload gradfit.batch.dask_engine``: prepare the worker as it starts
    (the plugin then finds it ready), instead of when the first run connects."""
    prepare_worker()


def prepare_worker(threads: bool = True) -> str:
    """A writable Numba cache, one thread for torch and Numba (unless not ``threads``), the
    kernel warmed; returns the LM kernel this process runs (``numba`` or ``pytorch``)."""
    if not os.environ.get("NUMBA_CACHE_DIR") and not _package_cache_writable():
        cache = Path(tempfile.gettempdir()) / f"gradfit-numba-{os.getuid()}"
        cache.mkdir(parents=True, exist_ok=True)
        os.environ["NUMBA_CACHE_DIR"] = str(cache)
        if "numba" in sys.modules:  # read at cache creation: a late change still counts
            sys.modules["numba"].config.CACHE_DIR = str(cache)
    if threads:
        os.environ.setdefault("NUMBA_NUM_THREADS", "1")
        import torch

        torch.set_num_threads(1)
    _warm()
    return kernel_name()


def _package_cache_writable() -> bool:
    """Whether Numba can cache beside the compiled kernel's source (its first choice)."""
    import gradfit.optim.compiled as compiled

    folder = Path(compiled.__file__).parent / "__pycache__"
    target = folder if folder.exists() else folder.parent
    return os.access(target, os.W_OK)


def _warm() -> None:
    """One tiny fit, so the kernel is compiled (or loaded from the cache) before any task;
    the workers of one node take turns (a file lock), so the first compiles and fills the
    cache and the others load it instead of compiling side by side."""
    import numpy as np

    from gradfit.batch.fit_batch import fit_batch

    x = np.linspace(-2.0, 2.0, 9)
    with _node_lock(Path(tempfile.gettempdir()) / f"gradfit-warm-{os.getuid()}.lock"):
        fit_batch("gaussian", x, np.exp(-(x[None] ** 2)))


@contextlib.contextmanager
def _node_lock(path: Path) -> Iterator[None]:
    """An exclusive lock on ``path`` (Unix); none where it cannot be had."""
    try:
        import fcntl

        handle = open(path, "a")  # noqa: SIM115 - held open across the yield
    except (ImportError, OSError):  # not on Unix, or no writable temporary folder
        yield
        return
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield  # closing the file releases the lock


def run_remote(task: Task, job: Job) -> TaskReport:
    """:func:`run_task` on a worker, saying which worker and which kernel."""
    report = run_task(task, job)
    report.worker = get_worker().address
    return report


class DaskEngine:
    """The scan and the tasks on ``client``'s cluster."""

    def __init__(self, client: Any) -> None:
        self.client: Any = client
        self.kernels: dict[str, str] = {}

    @classmethod
    @contextlib.contextmanager
    def open(
        cls, *, workers: int | None, scheduler: str | None, client: Any
    ) -> Iterator[DaskEngine]:
        """The given ``client``; a client of ``scheduler``; or a new ``LocalCluster`` of
        ``workers`` single-threaded processes (default: one per core), closed at the end."""
        saved = _thread_settings()
        cluster = None
        own = client is None
        try:
            if client is None and scheduler is not None:
                client = _connect(scheduler)
            elif client is None:
                # silence_logs: a worker with torch loaded is slow to exit, and its nanny's
                # warning about that on closing would be noise
                cluster = LocalCluster(
                    n_workers=workers or os.cpu_count() or 1, threads_per_worker=1,
                    processes=True, dashboard_address=":0", silence_logs=logging.ERROR,
                )  # fmt: skip
                client = Client(cluster)
                print(f"note: Dask dashboard at {client.dashboard_link}", file=sys.stderr)
            _restore(saved)
            try:
                client.register_plugin(WorkerSetup())
            except Exception as error:  # e.g. workers without gradfit (or its Numba, torch)
                raise GradfitError(
                    f"the Dask workers cannot run gradfit: {type(error).__name__}: {error}"
                ) from None
            yield cls(client)
        finally:
            if own and client is not None:
                client.close()
            if cluster is not None:
                cluster.close()
            _restore(saved)

    def scan(self, units: list[Unit], spec: Spec) -> list[UnitScan]:
        by_file: dict[str, list[Unit]] = {}
        for unit in units:  # one task per file: a row group is too small to be a task
            by_file.setdefault(unit.path, []).append(unit)
        futures = self.client.map(scan_units, list(by_file.values()), spec=spec, pure=False)
        try:
            return [scan for scans in self.client.gather(futures) for scan in scans]
        finally:
            self.client.cancel(futures)

    def fit(self, tasks: list[Task], job: Job, stop: Callable[[], bool], bar: Any) -> None:
        if not tasks:
            return
        chunks = {task.index: len(task.chunks(job.chunk_size)) for task in tasks}
        # the job (model, options: a few kB) travels inside every task rather than scattered:
        # scattered data cannot be recomputed, so a killed worker holding it could fail the run
        pending = {
            self.client.submit(run_remote, task, job, pure=False): task.index for task in tasks
        }
        try:
            while pending:
                if stop():
                    return
                try:
                    done, _ = wait(list(pending), timeout=POLL_SECONDS,
                                   return_when="FIRST_COMPLETED")  # fmt: skip
                except TimeoutError:  # nothing finished yet: look at the stop request again
                    continue
                for future in done:
                    report = _result(future)  # a task's error is raised here
                    bar.advance(report.fitted, chunks[pending.pop(future)])
                    self.kernels[report.worker] = report.kernel
        finally:
            self.client.cancel(list(pending))
        self._report_kernels()

    def _report_kernels(self) -> None:
        """Which LM kernel the workers ran; the PyTorch fallback as a warning."""
        if not self.kernels:
            return
        slow = sorted(w for w, k in self.kernels.items() if k != "numba")
        if slow:
            print(f"warning: {len(slow)} of {len(self.kernels)} Dask workers ran the PyTorch LM "
                  f"kernel, not the compiled one (Numba missing or no writable cache): "
                  f"{', '.join(slow)}", file=sys.stderr)  # fmt: skip
        else:
            print(f"note: {len(self.kernels)} Dask workers ran the compiled (Numba) LM kernel",
                  file=sys.stderr)  # fmt: skip


def _result(future: Any) -> TaskReport:
    """A task's report; its gradfit error as it is, Dask's own failures (a task whose
    workers kept dying, a cluster gone) as one ``GradfitError`` line."""
    try:
        return cast(TaskReport, future.result())
    except (GradfitError, OSError):
        raise
    except Exception as error:
        raise GradfitError(
            f"a Dask task failed: {type(error).__name__}: {error}; the finished chunks are "
            "kept: run again with --resume"
        ) from None


def _connect(address: str) -> Any:
    try:
        return Client(address, timeout=CONNECT_TIMEOUT)
    except (OSError, TimeoutError) as error:
        raise OptionError(f"--scheduler {address}: cannot connect ({error})") from None


def _thread_settings() -> tuple[dict[str, str | None], int | None]:
    torch = sys.modules.get("torch")
    threads = torch.get_num_threads() if torch is not None else None
    return {name: os.environ.get(name) for name in THREAD_VARIABLES}, threads


def _restore(saved: tuple[dict[str, str | None], int | None]) -> None:
    variables, threads = saved
    for name, value in variables.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    torch = sys.modules.get("torch")
    if torch is not None and threads is not None and torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
