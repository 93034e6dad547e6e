"""What the CLI commands do, apart from argument parsing and printing."""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gradfit.cli.outputs import check_output_dir, output_dir
from gradfit.cli.parsing import parse_assignments, parse_bounds
from gradfit.errors import OptionError, OutputError
from gradfit.fitting import distributed
from gradfit.fitting.fit import check_model_name, fit
from gradfit.io.files import check_parent, write_text_atomic
from gradfit.io.streamed import STREAM_ROWS, is_parquet, parquet_rows
from gradfit.io.tables import prepare_data, read_table
from gradfit.model.composite import parse_composite
from gradfit.model.models import Model, get_builtin
from gradfit.optim.problem import Hook
from gradfit.optim.status import FAILED
from gradfit.options import FitOptions
from gradfit.results.batch_result import BatchResult
from gradfit.results.fit_result import FitResult
from gradfit.results.history_store import store_history


def build_model(text: str, x_columns: list[str]) -> tuple[Model, bool]:
    """A built-in (x is positional), a composite (``model/composite.py:parse_composite``) or an
    expression whose variables are the x columns."""
    builtin = get_builtin(text)
    if builtin is not None:
        if len(x_columns) != 1:
            raise OptionError(f"built-in model {text!r} takes one x column, got {x_columns}")
        return builtin, False
    composite = parse_composite(text, x_columns[0])  # "gaussian(prefix=p1_) + linear"
    if composite is not None:
        if len(x_columns) != 1:
            raise OptionError(f"composite model {text!r} takes one x column, got {x_columns}")
        return composite, composite.independent == tuple(x_columns)
    check_model_name(text, x_columns)
    return Model(text, independent=x_columns), True


def fit_options(
    *,
    p0: str | None,
    bounds: str | None,
    fix: str | None,
    dtype: str | None = None,
    tie: list[str] | None = None,
    **flags: Any,
) -> FitOptions:
    """One ``FitOptions`` from the CLI's flags: ``--p0``, ``--bounds``, ``--fix``, ``--tie``
    and ``--dtype`` are parsed here, the rest go in as given (and are validated there)."""
    if dtype is not None and dtype not in DTYPES:
        raise OptionError(f"--dtype must be float64 or float32, got {dtype!r}")
    ties: dict[str, str] = {}
    for item in (part.strip() for text in tie or () for part in text.split(",")):
        name, sep, expression = item.partition("=")  # an expression has no ',' and no '='
        if not sep or not name.strip() or not expression.strip() or "=" in expression:
            raise OptionError(f"--tie: expected name=expression, got {item!r}")
        ties[name.strip()] = expression.strip()
    if ties:
        flags["ties"] = ties
    return FitOptions(
        p0=parse_assignments(p0, "--p0") if p0 else None,
        bounds=parse_bounds(bounds) if bounds else None,
        fixed=parse_assignments(fix, "--fix") if fix else None,
        dtype=None if dtype is None else getattr(torch, DTYPES[dtype]),
        **flags,
    )


def run_fit(
    data: Path,
    *,
    x: str,
    y: str,
    model: str,
    sigma: str | None,
    options: FitOptions,
    out: Path | None,
    report: bool,
    overwrite: bool,
    checkpoint: Path | None = None,
    checkpoint_every: int | None = None,
    resume: Path | None = None,
    hook: Hook | None = None,
    intervals: str | None = None,
) -> tuple[FitResult, Intervals | None]:
    """Read the columns, fit, and (with ``out``) write results.json, plots and report.html.

    ``intervals``: ``"profile"`` or ``"bootstrap"`` (seeded by ``options.seed``): also the
    parameters' 68.27% confidence intervals (``FitResult.confidence_intervals``), returned
    beside the result and written as ``"intervals"`` in results.json and in report.html;
    None for a fit that failed or was interrupted. Every check on the arguments and the data
    runs before anything is written: a bad input leaves no ``out`` folder and no checkpoint
    behind.
    """
    if intervals is not None:
        check_intervals(intervals, options)
    # under torchrun: rank 0 alone writes and prints (the others' stdout goes nowhere)
    where = distributed.group(torch.device(options.device or "cpu"))
    distributed.quiet_unless_leader(where)
    if where is not None and not where.leader:
        out, report, intervals = None, False, None
    x_columns = [c.strip() for c in x.split(",") if c.strip()]
    the_model, named = build_model(model, x_columns)
    if intervals == "bootstrap" and named:  # results/intervals.py resamples one positional x
        raise OptionError(
            "--intervals bootstrap needs a built-in model (its x is positional), not an "
            f"expression in named columns ({model!r}); use --intervals profile"
        )
    if out is not None:
        check_output_dir(out, overwrite=overwrite)
    checkpoint = checkpoint or resume  # a resumed run stays resumable
    fresh = resume is None or checkpoint is None or checkpoint.resolve() != resume.resolve()
    if checkpoint is not None:
        check_parent(checkpoint, "--checkpoint")
    if checkpoint is not None and checkpoint.is_dir():
        raise OptionError(f"--checkpoint {checkpoint}: is a folder; name a file")
    if checkpoint is not None and checkpoint.exists() and fresh and not overwrite:
        raise OptionError(
            f"--checkpoint {checkpoint}: file exists; continue it with --resume {checkpoint} "
            "or start over with --overwrite"
        )
    if _streamed(data, options):  # read by row groups, never loaded whole
        if intervals is not None:
            raise OptionError("--intervals refits the whole data: not with a streamed "
                              "--batch-size fit")  # fmt: skip
        result = _fit_streamed(data, the_model, x_columns, y, sigma, named, options, hook,
                               checkpoint, checkpoint_every, resume)  # fmt: skip
        return _finish_fit(result, data, x, x_columns, y, options, out, overwrite, report,
                           None, None, where)  # fmt: skip
    columns = read_table(data, [*x_columns, y, *([sigma] if sigma else [])])
    x_values = {c: columns[c] for c in x_columns} if named else columns[x_columns[0]]
    sigma_values = columns[sigma] if sigma else None
    # validate here too, so messages name the file and column rather than "x" or "y"
    names = {f"x[{c!r}]": c for c in x_columns} if named else {"x": x_columns[0]}
    names |= {"y": y, "sigma": sigma or ""}
    labels = {key: f"{data}: column {name!r}" for key, name in names.items()}
    prepare_data(
        x_values, columns[y], sigma_values, independent=the_model.independent,
        nan_policy=options.nan_policy, labels=labels, omit_hint="--nan-policy omit",
    )  # fmt: skip
    try:
        result = fit(
            the_model, x_values, columns[y], sigma=sigma_values, options=options, progress=True,
            hook=hook, checkpoint=checkpoint, checkpoint_every=checkpoint_every, resume=resume,
        )  # fmt: skip
    except OutputError as error:  # a checkpoint that could not be saved (a full disk)
        error.option = error.option or "--checkpoint"
        raise
    return _finish_fit(result, data, x, x_columns, y, options, out, overwrite, report,
                       intervals, None, where)  # fmt: skip


def _streamed(data: Path, options: FitOptions) -> bool:
    """Parquet streamed by row groups: with ``--batch-size``; for lm, a folder or a file of
    more than ``STREAM_ROWS`` rows (others are read whole, as every table)."""
    if not is_parquet(data):
        return False
    if options.batch_size is not None:
        return True
    large = data.is_dir() or parquet_rows(data) > STREAM_ROWS
    return large and options.resolve(batched=False) == "lm"


def _fit_streamed(
    data: Path,
    model: Model,
    x_columns: list[str],
    y: str,
    sigma: str | None,
    named: bool,
    options: FitOptions,
    hook: Hook | None,
    checkpoint: Path | None,
    checkpoint_every: int | None,
    resume: Path | None,
) -> FitResult:
    """``--batch-size`` on a Parquet file or folder: ``fitting/streamed.py``."""
    from gradfit.fitting.streamed import Columns, fit_streamed
    from gradfit.io.streamed import ParquetRows

    columns = Columns(x_columns, y, sigma, named)
    source = ParquetRows(data, columns.all)
    try:
        return fit_streamed(
            model, source, columns, options, hook=hook, progress=True, checkpoint=checkpoint,
            checkpoint_every=checkpoint_every, resume=resume,
        )  # fmt: skip
    except OutputError as error:
        error.option = error.option or "--checkpoint"
        raise


def _finish_fit(
    result: FitResult,
    data: Path,
    x: str,
    x_columns: list[str],
    y: str,
    options: FitOptions,
    out: Path | None,
    overwrite: bool,
    report: bool,
    intervals: str | None,
    found: Intervals | None,
    where: distributed.Group | None,
) -> tuple[FitResult, Intervals | None]:
    """Labels, provenance, intervals, the --out folder (rank 0) and the warnings."""
    # the figures' axes carry the table's column names
    result.data["labels"] = {"x": x_columns[0] if len(x_columns) == 1 else x, "y": y}
    result.provenance = {"input": str(data), "command": list(sys.argv)}
    if intervals is not None and result.status not in (*FAILED, "interrupted"):
        found = result.confidence_intervals(
            INTERVAL_LEVEL, intervals, seed=options.seed, options=options
        )
    if out is not None:
        with output_dir(out, overwrite=overwrite) as folder:
            write_outputs(result, folder, report, found, method=intervals or "profile")
    if where is None or where.leader:
        print_warnings(result)
    return result, found


#: the level of ``gradfit fit --intervals``: one standard deviation, as lmfit's default
INTERVAL_LEVEL = 0.6827

Intervals = dict[str, tuple[float, float]]


def check_intervals(method: str, options: FitOptions) -> None:
    """Refuse ``--intervals`` before anything runs: an unknown method, or a loss that
    ``results/intervals.py`` refuses (robust and absolute losses)."""
    from gradfit.results.intervals import LEAST_SQUARES, METHODS

    if method not in METHODS:
        raise OptionError(f"--intervals must be one of {', '.join(METHODS)}, got {method!r}")
    loss = options.loss_fn.name
    if loss not in LEAST_SQUARES:
        raise OptionError(
            f"--intervals needs a plain least-squares loss ({', '.join(LEAST_SQUARES)}), not "
            f"--loss {loss}: the F-test on χ² and the residual bootstrap assume "
            "squared residuals"
        )


def results_dict(
    result: FitResult, intervals: Intervals | None, history_file: str | None = None
) -> dict[str, Any]:
    """``result.to_dict()`` plus ``"intervals": {name: [lo, hi]}`` when there are some
    (an infinite end, where χ² never reached the level, as null)."""
    saved = result.to_dict(history_file)
    if intervals is not None:
        saved["intervals"] = {
            name: [v if math.isfinite(v) else None for v in (lo, hi)]
            for name, (lo, hi) in intervals.items()
        }
    return saved


def print_warnings(result: FitResult) -> None:
    """Each warning as one ``warning: ...`` line on stderr (the exit code does not change).

    A failed fit (diverged, ...) prints none: the CLI's one ``error:`` line already says the
    result is not to be trusted (results.json keeps the list). An interrupted one leaves out "not
    converged": the CLI's note says where it stopped.
    """
    if result.status in FAILED:
        return
    for text in result.warnings:
        if result.status == "interrupted" and text.startswith("not converged"):
            continue
        print(f"warning: {text}", file=sys.stderr)


def write_outputs(
    result: FitResult,
    folder: Path,
    report: bool,
    intervals: Intervals | None = None,
    *,
    method: str = "profile",
) -> list[Path]:
    """results.json, fit.png, history.png and, if asked, report.html (with ``intervals``,
    from ``method``, in results.json and report.html)."""
    if intervals is None:
        written = [result.save(folder / "results.json")]
    else:
        stored = store_history(result.history, folder / "results.json")
        saved = results_dict(result, intervals, stored)
        text = json.dumps(saved, indent=2, allow_nan=False)
        written = [write_text_atomic(folder / "results.json", text + "\n")]
    # a diverged history spans hundreds of decades: matplotlib's log scale overflows, harmlessly
    with np.errstate(over="ignore"):
        written += result.save_plots(folder)
    if report:
        from gradfit.views.report import write_html_report

        page = folder / "report.html"
        written.append(
            write_html_report(
                result, page, written[1:], intervals, method=method, level=INTERVAL_LEVEL
            )
        )
    return written


DTYPES = {"float64": "float64", "float32": "float32", "double": "float64", "float": "float32"}


def run_fit_many_command(
    data: Path,
    *,
    model: str,
    out: str | Path,
    group: str | None,
    x: str,
    y: str,
    sigma: str | None,
    options: FitOptions,
    chunk_size: int | None,
    resume: bool,
    overwrite: bool,
    stop: Callable[[], bool] | None = None,
    engine: str = "local",
    workers: int | None = None,
    scheduler: str | None = None,
) -> BatchResult | None:
    """``many.run_fit_many`` with the CLI's model text; None when a signal stopped the run.

    ``--engine dask`` without ``--scheduler`` starts a LocalCluster of ``--workers``
    processes (default: one per core).
    """
    from gradfit.batch.many import run_fit_many

    the_model, _ = build_model(model, [x])
    return run_fit_many(
        data, model=the_model, group=group, x=x, y=y, sigma=sigma, out=out, resume=resume,
        overwrite=overwrite, chunk_size=chunk_size, stop=stop, progress=True, options=options,
        engine=engine, workers=workers, scheduler=scheduler,
    )  # fmt: skip
