"""The ``gradfit`` command: demo, fit, fit-many, models.

User errors become one ``error: ...`` line on stderr and exit code 2 (usage errors too: a
missing or unknown option, a bad option value); a failed fit (diverged, non-finite at the
start, singular) exits 3.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.table import Table
from typer.core import TyperGroup

from gradfit.errors import GradfitError

if TYPE_CHECKING:  # checked against the copy of click that typer >= 0.24 carries
    from typer._click import exceptions as click_errors
    from typer._click.core import Parameter
else:
    try:  # typer >= 0.24 carries its own copy of click
        from typer._click import exceptions as click_errors
    except ImportError:  # pragma: no cover - older typer uses click itself
        from click import exceptions as click_errors

EXIT_USAGE, EXIT_FAILED = 2, 3


def fail(message: str, code: int = EXIT_USAGE) -> typer.Exit:
    """Print one ``error:`` line on stderr and return the exit to raise."""
    print(f"error: {' '.join(message.splitlines())}", file=sys.stderr)
    return typer.Exit(code)


def os_error_line(error: OSError) -> str:
    """An ``OSError`` that no writer turned into an ``OutputError``, in one line: the file
    if the system named it, never "None"."""
    reason = error.strerror or str(error) or type(error).__name__
    return f"{error.filename}: {reason}" if error.filename else f"input or output failed: {reason}"


class OneLineErrors(TyperGroup):
    """Typer's command group, but usage errors (missing, unknown or bad options) print one
    ``error: ...`` line with a pointer to ``--help``, like every other bad input, instead of
    the usage text and a framed box. Help output is Typer's own.

    Overriding ``main`` covers both ``gradfit`` (``app()``) and ``CliRunner.invoke(app)``.
    """

    def main(
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        windows_expand_args: bool = True,
        **extra: Any,
    ) -> Any:
        extra["windows_expand_args"] = windows_expand_args
        if not standalone_mode:  # the caller handles exceptions itself
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:  # not standalone: Typer raises usage errors instead of drawing them in a box
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click_errors.UsageError as error:
            code = show_usage_error(error)
        except click_errors.ClickException as error:
            print(f"error: {_sentence(error.format_message())}", file=sys.stderr)
            code = EXIT_USAGE
        except typer.Abort:
            print("Aborted!", file=sys.stderr)
            code = 1
        sys.exit(code if isinstance(code, int) else 0)

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except click_errors.UsageError as error:
            if error.ctx is None and ctx.invoked_subcommand:  # the parser's errors carry none
                # our own attribute, read back by show_usage_error
                error.command_path = f"{ctx.command_path} {ctx.invoked_subcommand}"  # type: ignore[attr-defined]
            raise


def show_usage_error(error: Any) -> int:
    """Print a usage error as one line (the help for a bare ``gradfit``); return its code."""
    if type(error).__name__ == "NoArgsIsHelpError":  # Rich has printed the help already
        if error.format_message().strip():
            print(error.format_message(), file=sys.stderr)
        return int(error.exit_code)
    path = error.ctx.command_path if error.ctx is not None else getattr(error, "command_path", "")
    see = f"; see {path} --help" if path else ""
    print(f"error: {usage_message(error)}{see}", file=sys.stderr)
    return EXIT_USAGE


def usage_message(error: Any) -> str:
    """What is wrong, in the house style: ``no such option --modle (did you mean --model?)``."""
    param = getattr(error, "param", None)
    if isinstance(error, click_errors.NoSuchOption):
        close = f" (did you mean {error.possibilities[0]}?)" if error.possibilities else ""
        return f"no such option {error.option_name}{close}"
    if isinstance(error, click_errors.MissingParameter) and param is not None:
        return f"missing {param.param_type_name} {_param_name(param)}"
    if isinstance(error, click_errors.BadParameter) and param is not None:
        return f"invalid value for {_param_name(param)}: {_sentence(error.message)}"
    return _sentence(error.format_message())


def _param_name(param: Parameter) -> str:
    if param.param_type_name == "argument":
        return str(param.name).upper()  # as the docstrings name it: DATA
    return max(param.opts, key=len)  # the long spelling: --checkpoint-every


def _sentence(text: str) -> str:
    """Click's "No such command 'fitt'. Did you mean 'fit'?" -> "no such command 'fitt'
    (did you mean 'fit'?)": lower case, no final stop, so it reads inside one line."""
    text = re.sub(r"\.\s+Did you mean (.+)\?$", r" (did you mean \1?)", text.strip())
    text = text.rstrip(".")
    return text[:1].lower() + text[1:] if text[1:2].islower() else text


app = typer.Typer(
    cls=OneLineErrors,
    add_completion=False,
    no_args_is_help=True,
    help="Fit any model to data with a visible PyTorch training loop.",
    pretty_exceptions_enable=False,
)
console = Console()


Out = Annotated[Path | None, typer.Option("--out", help="Folder for results and plots.")]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="Replace files in an existing --out.")]
# the options fit and fit-many share, declared once (FitOptions validates them)
ModelText = Annotated[str, typer.Option("--model", help="Expression or built-in name.")]
Sigma = Annotated[str | None, typer.Option("--sigma", help="Column of y's standard deviations.")]
P0 = Annotated[str | None, typer.Option("--p0", help="Starting values: a=1,b=2.")]
Bounds = Annotated[str | None, typer.Option("--bounds", help="Bounds: k=0:inf,a=-1:1.")]
Fix = Annotated[str | None, typer.Option("--fix", help="Fixed values: c=0.")]
Tie = Annotated[
    list[str] | None,
    typer.Option("--tie", help="Tied parameters: p2_width=p1_width (repeat, or join with ,)."),
]
LossName = Annotated[str, typer.Option(help="mse sse chi2 mae huber soft_l1 cauchy arctan.")]
FScale = Annotated[float, typer.Option("--f-scale", help="Robust loss scale.")]
Optimizer = Annotated[
    str, typer.Option(help="auto lm gd sgd adam lbfgs (auto: lm for least squares).")
]
Lr = Annotated[float | None, typer.Option(help="Learning rate (gd, sgd, adam, lbfgs).")]
Epochs = Annotated[int | None, typer.Option(help="Epoch (LM: iteration) limit.")]
Tol = Annotated[float | None, typer.Option(help="LM: ftol; else stop when the loss changes less.")]
NanPolicy = Annotated[str, typer.Option("--nan-policy", help="raise or omit.")]
AbsoluteSigma = Annotated[bool, typer.Option("--absolute-sigma")]
Delimiter = Annotated[
    str | None,
    typer.Option(
        "--delimiter",
        help="Text tables: the column separator: ',', tab, ';', whitespace (runs of blanks) or "
        "another character. Default: tab for .tsv/.tab, else detected from the first lines.",
        show_default=False,
    ),
]
Header = Annotated[
    bool | None,
    typer.Option(
        "--header/--no-header",
        help="Text tables: whether the first row names the columns. Without a header the "
        "columns are named by position, c0, c1, ... (--x c0 --y c1). Default: detected (a "
        "first row of numbers is data).",
        show_default=False,
    ),
]


def read_tables_with(delimiter: str | None, header: bool | None) -> AbstractContextManager[Any]:
    """The block in which the command reads its table with ``--delimiter``/``--header``."""
    from gradfit.io.tables import TableOptions, parse_delimiter, table_options

    given = None if delimiter is None else parse_delimiter(delimiter, "--delimiter")
    return table_options(TableOptions(given, header))


@app.command()
def demo(
    out: Out = Path("gradfit-demo"),
    seed: Annotated[
        int | None, typer.Option(help="torch.manual_seed before the post's program.")
    ] = None,
    epochs: int = 15_000,
    lr: float = 1e-3,
    optimizer: Annotated[str, typer.Option(help="gd (the post's), sgd, adam, lbfgs, lm.")] = "gd",
    overwrite: Overwrite = False,
) -> None:
    """The blog post end to end: four figures, results.json and the truth about convergence."""
    from gradfit.cli.demo import run_demo, write_demo
    from gradfit.cli.outputs import output_dir

    try:
        with output_dir(out or Path("gradfit-demo"), overwrite=overwrite) as staging:
            run = run_demo(seed=seed, epochs=epochs, lr=lr, optimizer=optimizer, progress=True)
            written = write_demo(run, staging)
    except GradfitError as error:
        raise fail(str(error)) from None
    table = Table(title=f"y = a x² + b x + c  (seed {run.seed}, {run.result.optimizer})")
    for column in ("param", "true", "fitted", "least-squares optimum", "fitted - optimum"):
        table.add_column(column, justify="right")
    for name in "abc":
        fitted, best = run.result.params[name], run.optimum[name]
        true = run.to_dict()["true_params"][name]
        table.add_row(name, f"{true:g}", f"{fitted:.6f}", f"{best:.6f}", f"{fitted - best:+.6f}")
    console.print(table)
    console.print(f"final MSE {run.result.loss:.6f}; optimum MSE {run.optimum_loss:.6f}")
    if run.excess > 1e-4:
        console.print(
            f"[bold yellow]{run.result.optimizer} has NOT reached the least-squares optimum:[/] "
            f"its loss is {100 * run.excess:.1f}% above it after {run.result.n_iter} epochs. "
            "Try `--optimizer lm` (or `gradfit fit ... --optimizer lm`)."
        )
    else:
        console.print("[green]reached the least-squares optimum.[/]")
    names = " ".join(path.name for path in written)
    console.print(f"wrote {out or Path('gradfit-demo')}/: {names}", highlight=False)


@app.command(name="fit")
def fit_command(
    data: Annotated[
        Path, typer.Argument(help="CSV, TSV, whitespace-separated text, Parquet or NumPy file.")
    ],
    model: ModelText,
    x: Annotated[str, typer.Option("--x", help="x column (several: x1,x2).")] = "x",
    y: Annotated[str, typer.Option("--y", help="y column.")] = "y",
    delimiter: Delimiter = None,
    header: Header = None,
    sigma: Sigma = None,
    p0: P0 = None,
    bounds: Bounds = None,
    fix: Fix = None,
    tie: Tie = None,
    loss: LossName = "mse",
    f_scale: FScale = 1.0,
    optimizer: Optimizer = "auto",
    lr: Lr = None,
    epochs: Epochs = None,
    tol: Tol = None,
    seed: int | None = None,
    nan_policy: NanPolicy = "raise",
    absolute_sigma: AbsoluteSigma = False,
    intervals: Annotated[
        str | None,
        typer.Option(
            "--intervals",
            help="Also the parameters' 68.27% confidence intervals: profile or bootstrap "
            "(1000 refits, seeded by --seed). Plain least squares only (mse, sse, chi2).",
        ),
    ] = None,
    out: Out = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print results JSON on stdout.")] = False,
    report: Annotated[bool, typer.Option("--report", help="Also write report.html.")] = False,
    overwrite: Overwrite = False,
    checkpoint: Annotated[
        Path | None,
        typer.Option(help="Save the fit's state here every --checkpoint-every epochs."),
    ] = None,
    checkpoint_every: Annotated[
        int | None,
        typer.Option(min=1, help="Epochs between checkpoints. Default: 1000; lm, lbfgs: 1."),
    ] = None,
    resume: Annotated[
        Path | None,
        typer.Option(help="Continue from this checkpoint (and keep saving to it)."),
    ] = None,
    batch_size: Annotated[
        int | None,
        typer.Option(
            "--batch-size",
            help="Mini-batch training (gd, sgd, adam; default adam): one step per this many "
            "rows, 100 epochs unless --epochs. A Parquet file or folder is then streamed by "
            "row groups through a shuffle buffer of 2^20 rows, never loaded whole; with "
            "--checkpoint, --checkpoint-every counts batches.",
        ),
    ] = None,
    shuffle: Annotated[
        bool, typer.Option("--shuffle/--no-shuffle", help="A new order of the rows every epoch.")
    ] = True,
    validation: Annotated[
        float | None,
        typer.Option(
            help="Hold out this fraction of the rows (Parquet: of its row groups), chosen by "
            "--seed; keep the parameters with the best validation loss."
        ),
    ] = None,
    patience: Annotated[
        int | None,
        typer.Option(help="Stop after this many epochs without a better validation loss."),
    ] = None,
) -> None:
    """Fit MODEL to the columns of DATA; write results.json, fit.png, history.png to --out.

    Text tables are comma, tab, semicolon or whitespace separated, detected unless
    --delimiter says; a first row of numbers means no header (columns c0, c1, ...).

    Ctrl-C or SIGTERM stops after the current step and writes the best result so far
    (status "interrupted", exit 130 or 143). Exit 2: bad input; 3: the fit failed (diverged,
    non-finite at the start, singular).
    """
    from gradfit.cli.commands import fit_options, results_dict, run_fit
    from gradfit.cli.signals import stop_on_signals

    with stop_on_signals() as stop:
        try:
            with read_tables_with(delimiter, header):
                options = fit_options(
                    p0=p0, bounds=bounds, fix=fix, tie=tie, loss=loss, f_scale=f_scale,
                    optimizer=optimizer, lr=lr, epochs=epochs, tol=tol, seed=seed,
                    nan_policy=nan_policy, absolute_sigma=absolute_sigma, batch_size=batch_size,
                    shuffle=shuffle, validation=validation, patience=patience,
                )  # fmt: skip
                result, found = run_fit(
                    data, x=x, y=y, model=model, sigma=sigma, options=options, out=out,
                    report=report, overwrite=overwrite, checkpoint=checkpoint,
                    checkpoint_every=checkpoint_every, resume=resume, hook=stop.hook,
                    intervals=intervals,
                )  # fmt: skip
        except GradfitError as error:
            raise fail(str(error)) from None
        except OSError as error:  # not an OutputError (which names the file): say what we know
            raise fail(os_error_line(error)) from None
        except KeyboardInterrupt:  # a second signal: stopped at once, nothing written
            raise fail("interrupted twice: stopped at once; nothing written", 130) from None
    if result.n_omitted:
        print(f"note: --nan-policy omit dropped {result.n_omitted} rows with NaN or inf",
              file=sys.stderr)  # fmt: skip
    if as_json:
        print(json.dumps(results_dict(result, found), indent=2, allow_nan=False))
    else:
        from gradfit.cli.commands import INTERVAL_LEVEL
        from gradfit.views.report import text_report

        text = text_report(result, found, method=intervals or "profile", level=INTERVAL_LEVEL)
        console.print(text, highlight=False, markup=False)
    if stop.requested:
        where = f"; results in {out}" if out is not None else ""
        again = f"; continue with --resume {checkpoint or resume}" if checkpoint or resume else ""
        print(f"note: stopped by {stop.name}: {result.message}{where}{again}", file=sys.stderr)
        raise typer.Exit(stop.exit_code)
    from gradfit.optim.status import FAILED  # torch is loaded by now; the CLI's start stays light

    if result.status in FAILED:
        print(f"error: {result.message}", file=sys.stderr)
        raise typer.Exit(EXIT_FAILED)


@app.command(name="fit-many")
def fit_many_command(
    data: Annotated[
        Path,
        typer.Argument(
            help="Long-form CSV/TSV/text/Parquet, a folder of Parquet files, a quoted glob, "
            "or wide .npz (x, y)."
        ),
    ],
    model: ModelText,
    out: Annotated[
        str,
        typer.Option(
            "--out", help="Results: one row per group (.parquet/.csv, or a folder: end with /)."
        ),
    ],
    group: Annotated[str | None, typer.Option("--group", help="Group key column.")] = None,
    x: Annotated[str, typer.Option("--x", help="x column.")] = "x",
    y: Annotated[str, typer.Option("--y", help="y column.")] = "y",
    delimiter: Delimiter = None,
    header: Header = None,
    sigma: Sigma = None,
    p0: P0 = None,
    bounds: Bounds = None,
    fix: Fix = None,
    loss: LossName = "mse",
    f_scale: FScale = 1.0,
    optimizer: Optimizer = "auto",
    lr: Lr = None,
    epochs: Epochs = None,
    tol: Tol = None,
    dtype: Annotated[str, typer.Option(help="float64 or float32.")] = "float64",
    device: Annotated[str | None, typer.Option(help="cpu, cuda, ... Default: cpu.")] = None,
    chunk_size: Annotated[int | None, typer.Option(min=1, help="Curves per chunk.")] = None,
    nan_policy: NanPolicy = "raise",
    absolute_sigma: AbsoluteSigma = False,
    resume: Annotated[bool, typer.Option("--resume", help="Skip chunks already written.")] = False,
    overwrite: Overwrite = False,
    engine: Annotated[
        str, typer.Option("--engine", help="local (this process) or dask (a Dask cluster).")
    ] = "local",
    workers: Annotated[
        int | None, typer.Option("--workers", min=1, help="Dask: a LocalCluster of N processes.")
    ] = None,
    scheduler: Annotated[
        str | None, typer.Option("--scheduler", help="Dask: a running scheduler, tcp://host:port.")
    ] = None,
    shared: Annotated[
        list[str] | None,
        typer.Option(
            "--shared",
            help="Parameters shared by every group: one global fit (repeat, or join with ,).",
        ),
    ] = None,
) -> None:
    """Fit MODEL to every group of DATA at once; write one row of params ± stderr per group.

    Finished chunks are kept beside --out (in OUT.parts/) until the run completes, so a killed
    or interrupted run continues with --resume and loses at most one chunk.
    """
    from gradfit.cli.commands import fit_options, run_fit_many_command
    from gradfit.cli.signals import stop_on_signals

    with stop_on_signals() as stop:
        try:
            with read_tables_with(delimiter, header):
                options = fit_options(
                    p0=p0, bounds=bounds, fix=fix, loss=loss, f_scale=f_scale,
                    optimizer=optimizer, lr=lr, epochs=epochs, tol=tol, dtype=dtype,
                    device=device, nan_policy=nan_policy, absolute_sigma=absolute_sigma,
                )  # fmt: skip
                if shared:  # one global fit (batch/many_shared.py), not chunks of groups
                    if engine != "local":
                        raise fail("--shared runs one global fit in this process: drop --engine")
                    _fit_many_shared(
                        data, model=model, shared=shared, out=Path(out), group=group, x=x,
                        y=y, sigma=sigma, options=options, resume=resume, overwrite=overwrite,
                    )  # fmt: skip
                    return
                result = run_fit_many_command(
                    data, model=model, out=out, group=group, x=x, y=y, sigma=sigma,
                    options=options, chunk_size=chunk_size, resume=resume,
                    overwrite=overwrite, stop=lambda: stop.requested, engine=engine,
                    workers=workers, scheduler=scheduler,
                )  # fmt: skip
        except GradfitError as error:
            raise fail(str(error)) from None
        except OSError as error:
            raise fail(os_error_line(error)) from None
        except KeyboardInterrupt:
            raise fail("interrupted twice: stopped at once; finished chunks kept", 130) from None
    if result is None:
        print(f"note: stopped by {stop.name}; finished chunks are kept: continue with "
              f"the same command and --resume", file=sys.stderr)  # fmt: skip
        raise typer.Exit(stop.exit_code)
    console.print(result.summary(), highlight=False, markup=False)
    console.print(f"wrote {out} ({len(result)} rows)", highlight=False)


def _fit_many_shared(data: Path, *, model: str, shared: list[str], x: str, **given: Any) -> None:
    """``fit-many --shared``: fit, write, print the summary and the shared values; a failed
    global fit exits 3."""
    from gradfit.batch.many_shared import parse_shared, run_fit_many_shared
    from gradfit.cli.commands import build_model
    from gradfit.optim.status import FAILED

    the_model, _ = build_model(model, [x])
    result, common = run_fit_many_shared(
        data, model=the_model, shared=parse_shared(shared), x=x, **given
    )
    console.print(result.summary(), highlight=False, markup=False)
    console.print(common.summary(), highlight=False, markup=False)
    console.print(f"wrote {given['out']} ({len(result)} rows)", highlight=False)
    if common.status in FAILED:
        raise fail(f"the global fit failed ({common.status}): {common.message}", EXIT_FAILED)


@app.command()
def models(as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """List the built-in models with their formulas and parameters."""
    from gradfit.model.catalog import describe_builtins  # no torch: answers at once

    rows = describe_builtins()
    if as_json:
        print(json.dumps([{"name": n, "formula": f, "params": list(p)} for n, f, p in rows]))
        return
    table = Table(title="built-in models (x is the independent variable)")
    for column in ("name", "formula", "parameters"):
        table.add_column(column)
    for name, formula, params in rows:
        table.add_row(name, formula, ", ".join(params))
    console.print(table)


if __name__ == "__main__":  # python -m gradfit.cli.app (gradfit.cli: __main__.py)
    app()
