"""A progress bar on a terminal, hung off the loop's hook."""

from __future__ import annotations

import contextlib
import math
import sys
import time
from collections.abc import Callable, Iterator
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


#: seconds between redraws of the mini-batch bar's step count (steps take microseconds)
STEP_REDRAW = 0.1


@contextlib.contextmanager
def epoch_bar(
    inner: Hook | None, total: int, validation: list[float]
) -> Iterator[tuple[Hook | None, Callable[[int], None] | None]]:
    """Mini-batch training's bar: epochs done of ``total``, the steps of this epoch, the last
    epoch's training loss and validation loss (read from ``validation``, the list the loop
    appends to). Yields ``(hook, on_step)``; off a terminal, ``(inner, None)``."""
    if not sys.stderr.isatty():
        yield inner, None
        return
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (TextColumn("epoch"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
               TextColumn("step {task.fields[step]}"), TextColumn("loss {task.fields[loss]:.6g}"),
               TextColumn("{task.fields[val]}"), TimeRemainingColumn())  # fmt: skip
    with Progress(*columns, transient=True) as bar:
        task = bar.add_task("fit", total=total or None, loss=math.nan, step=0, val="")
        last = [0.0]

        def on_step(step: int) -> None:
            now = time.monotonic()
            if now - last[0] >= STEP_REDRAW:
                last[0] = now
                bar.update(task, step=step)

        def hook(epoch: int, loss: float) -> bool:
            val = f"val {validation[-1]:.6g}" if validation else ""
            bar.update(task, completed=epoch + 1, loss=loss, step=0, val=val)
            return bool(inner(epoch, loss)) if inner is not None else False

        yield hook, on_step
