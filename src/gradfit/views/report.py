"""Reports: plain text for the terminal, and a self-contained HTML page (figures inline)."""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from gradfit.io.files import write_text_atomic

if TYPE_CHECKING:  # typing only: results call this module lazily, never the reverse
    from gradfit.results.fit_result import FitResult


def _fmt(value: float | None) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.6g}"


def parameter_rows(result: FitResult) -> list[tuple[str, str, str, str, str]]:
    """``(name, value, stderr, relative %, note)`` for each parameter."""
    rows = []
    for name in result.param_names:
        value, err = result.params[name], result.stderr[name]
        relative = "" if err is None or value == 0 else f"{100 * abs(err / value):.3g}%"
        rows.append((name, _fmt(value), _fmt(err), relative, _note(result, name, err)))
    return rows


def _note(result: FitResult, name: str, err: float | None) -> str:
    if name in result.fixed:
        return "fixed"
    if name in result.at_bound:
        return "at bound"
    return "not estimable" if err is None else ""


def strong_correlations(result: FitResult, threshold: float = 0.5) -> list[tuple[str, str, float]]:
    """Parameter pairs whose |correlation| exceeds ``threshold``, strongest first."""
    names, corr = result.param_names, result.correlation.tolist()
    pairs = [
        (names[i], names[j], corr[i][j])
        for i in range(len(names))
        for j in range(i + 1, len(names))
        if math.isfinite(corr[i][j]) and abs(corr[i][j]) > threshold
    ]
    return sorted(pairs, key=lambda item: -abs(item[2]))


def statistic_rows(result: FitResult) -> list[tuple[str, str]]:
    return [
        ("model", getattr(result.model, "formula", str(result.model))),
        ("loss", f"{result.loss_name} = {_fmt(result.loss)}"),
        ("optimizer", f"{result.optimizer}, {result.n_iter} {_steps(result)}"),
        ("status", f"{result.status}: {result.message}"),
        ("points", f"{result.n_points} (omitted {result.n_omitted}), dof {result.dof}"),
        ("chi-square", _fmt(result.chi2)),
        ("reduced chi-square", _fmt(result.reduced_chi2)),
        ("R²", _fmt(result.r2)),
        ("AIC / BIC", f"{_fmt(result.aic)} / {_fmt(result.bic)}"),
        (
            "error bars",
            "absolute sigma" if result.absolute_sigma else "scaled by reduced chi-square",
        ),
    ]


def _steps(result: FitResult) -> str:
    return "iterations" if result.optimizer == "lm" else "epochs"


Intervals = Mapping[str, tuple[float, float]]


def interval_title(method: str, level: float) -> str:
    """``"68.27% profile"``: what the confidence intervals are."""
    return f"{100 * level:.4g}% {method}"


def text_report(
    result: FitResult,
    intervals: Intervals | None = None,
    *,
    method: str = "profile",
    level: float = 0.6827,
) -> str:
    """The report as aligned plain text: the warnings first, then the parameters, and the
    confidence ``intervals`` (``FitResult.confidence_intervals``) when given."""
    lines = ["[[Warnings]]", *(f"  {w}" for w in result.warnings)] if result.warnings else []
    lines.append("[[Parameters]]")
    rows = parameter_rows(result)
    width = max(len(r[0]) for r in rows)
    for name, value, err, relative, note in rows:
        rel = f" ({relative})" if relative else ""
        suffix = f"  [{note}]" if note else ""
        lines.append(f"  {name:<{width}} = {value:>13} +/- {err}{rel}{suffix}")
    correlations = strong_correlations(result)
    if correlations:
        lines.append("[[Correlations]] (|r| > 0.5)")
        lines += [f"  C({a}, {b}) = {c:+.4f}" for a, b, c in correlations]
    if intervals:
        lines.append(f"[[Confidence intervals]] ({interval_title(method, level)})")
        width = max(len(name) for name in intervals)
        lines += [
            f"  {name:<{width}} = [{lo:.6g}, {hi:.6g}]" for name, (lo, hi) in intervals.items()
        ]
    lines.append("[[Fit statistics]]")
    lines += [f"  {label:<19} {value}" for label, value in statistic_rows(result)]
    return "\n".join(lines)


def html_report(
    result: FitResult,
    figures: list[Path],
    intervals: Intervals | None = None,
    *,
    method: str = "profile",
    level: float = 0.6827,
) -> str:
    """A single HTML page: tables (the confidence ``intervals`` when given) plus the given PNG
    figures inlined as data URIs."""
    esc = html.escape
    params = "".join(
        f"<tr><td>{esc(n)}</td><td>{v}</td><td>{e}</td><td>{r}</td><td>{esc(note)}</td></tr>"
        for n, v, e, r, note in parameter_rows(result)
    )
    stats = "".join(
        f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in statistic_rows(result)
    )
    corr = "".join(
        f"<tr><td>{esc(a)}</td><td>{esc(b)}</td><td>{c:+.4f}</td></tr>"
        for a, b, c in strong_correlations(result)
    )
    bounds = "".join(
        f"<tr><td>{esc(n)}</td><td>{lo:.6g}</td><td>{hi:.6g}</td></tr>"
        for n, (lo, hi) in (intervals or {}).items()
    )
    if bounds:
        bounds = (
            f"<h2>Confidence intervals ({esc(interval_title(method, level))})</h2><table>"
            f"<tr><th>name</th><th>lower</th><th>upper</th></tr>{bounds}</table>"
        )
    warnings = "".join(f"<li>{esc(w)}</li>" for w in result.warnings)
    warnings = f'<h2>Warnings</h2><ul class="warnings">{warnings}</ul>' if warnings else ""
    images = "".join(
        f'<figure><img alt="{esc(p.stem)}" src="data:image/png;base64,'
        f'{base64.b64encode(p.read_bytes()).decode("ascii")}"></figure>'
        for p in figures
        if p.exists()
    )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>gradfit report</title>
<style>body{{font-family:sans-serif;max-width:60em;margin:2em auto}}
table{{border-collapse:collapse;margin:1em 0}}td,th{{border:1px solid #ccc;padding:.3em .6em;
text-align:left}}img{{max-width:100%}}.warnings{{color:#a40000}}</style></head><body>
<h1>gradfit report</h1>
{warnings}
<h2>Parameters</h2><table><tr><th>name</th><th>value</th><th>stderr</th><th>relative</th>
<th></th></tr>{params}</table>
{bounds}
<h2>Strong correlations</h2><table>{corr or "<tr><td>none above 0.5</td></tr>"}</table>
<h2>Fit statistics</h2><table>{stats}</table>
<h2>Figures</h2>{images}
</body></html>
"""


def write_html_report(
    result: FitResult,
    path: Path,
    figures: list[Path],
    intervals: Intervals | None = None,
    *,
    method: str = "profile",
    level: float = 0.6827,
) -> Path:
    """Write ``html_report`` atomically."""
    page = html_report(result, figures, intervals, method=method, level=level)
    return write_text_atomic(path, page)
