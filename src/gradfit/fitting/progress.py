"""A progress bar on a terminal, hung off the loop's hook."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # typing only: fitting shows this bar, so the views do not import fitting
    from gradfit.optim.problem import Hook


@contextlib.contextmanager
def progress_bar(inner: Hook | None, total: int, every: int = 100) -> Iterator[Hook | None]:
    """Yield ``inner`` wrapped so a Rich bar advances every ``every`` epochs.

    Off a terminal (pipes, CI, tests) it yields ``inner`` unchanged.
    """
    if not sys.stderr.isatty():
        yield inner
        return
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (TextColumn("fitting"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
               TextColumn("loss {task.fields[loss]:.6g}"), TimeRemainingColumn())  # fmt: skip
    with Progress(*columns, transient=True) as bar:
        task = bar.add_task("fit", total=total or None, loss=float("nan"))

        def hook(epoch: int, loss: float) -> bool:
            if (epoch + 1) % every == 0:
                bar.update(task, completed=epoch + 1, loss=loss)
            return bool(inner(epoch, loss)) if inner is not None else False

        yield hook
