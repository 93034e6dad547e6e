"""What the CLI commands do, apart from argument parsing and printing."""

from __future__ import annotations

import contextlib
from pathlib import Path

from .data import read_table
from .files import output_dir
from .fitting import fit
from .models import Model, get_builtin
from .parameters import parse_assignments, parse_bounds
from .results import FitResult


def build_model(text: str, x_columns: list[str]) -> tuple[Model, bool]:
    """A built-in (x is positional) or an expression whose variables are the x columns."""
    builtin = get_builtin(text)
    if builtin is not None:
        if len(x_columns) != 1:
            from .errors import OptionError

            raise OptionError(f"built-in model {text!r} takes one x column, got {x_columns}")
        return builtin, False
    return Model(text, independent=x_columns), True


def run_fit(
    data: Path,
    *,
    x: str,
    y: str,
    model: str,
    sigma: str | None,
    p0: str | None,
    bounds: str | None,
    fix: str | None,
    loss: str,
    f_scale: float,
    optimizer: str,
    lr: float | None,
    epochs: int | None,
    tol: float | None,
    seed: int | None,
    nan_policy: str,
    absolute_sigma: bool,
    out: Path | None,
    report: bool,
    overwrite: bool,
) -> FitResult:
    """Read the columns, fit, and (with ``out``) write results.json, plots and report.html."""
    x_columns = [c.strip() for c in x.split(",") if c.strip()]
    the_model, named = build_model(model, x_columns)
    options = {
        "p0": parse_assignments(p0, "--p0") if p0 else None,
        "bounds": parse_bounds(bounds) if bounds else None,
        "fixed": parse_assignments(fix, "--fix") if fix else None,
    }
    columns = read_table(data, [*x_columns, y, *([sigma] if sigma else [])])
    x_values = {c: columns[c] for c in x_columns} if named else columns[x_columns[0]]
    with contextlib.ExitStack() as stack:
        folder = stack.enter_context(output_dir(out, overwrite=overwrite)) if out else None
        result = fit(
            the_model, x_values, columns[y], sigma=columns[sigma] if sigma else None,
            loss=loss, f_scale=f_scale, optimizer=optimizer, lr=lr, epochs=epochs, tol=tol,
            seed=seed, nan_policy=nan_policy, absolute_sigma=absolute_sigma, progress=True,
            **options,
        )  # fmt: skip
        if folder is not None:
            write_outputs(result, folder, report)
    return result


def write_outputs(result: FitResult, folder: Path, report: bool) -> list[Path]:
    """results.json, fit.png, history.png and, if asked, report.html."""
    written = [result.save(folder / "results.json"), *result.plot(folder)]
    if report:
        from .report import write_html_report

        written.append(write_html_report(result, folder / "report.html", written[1:]))
    return written
