"""MkDocs hook: tables rendered at build time from the data the code itself uses.

``<!-- gradfit-builtin-models -->``: the built-in models (the catalog ``gradfit models``
prints); ``<!-- gradfit-statuses -->``: the status vocabulary of ``optim/status.py``, shared by
``fit``, ``fit_batch`` and ``fit-many``. Neither list can drift from the code.
"""

from __future__ import annotations

from typing import Any


def builtin_models() -> str:
    """Markdown table: name, formula and parameters of every built-in model."""
    from gradfit.model.catalog import describe_builtins

    rows = ["| name | formula | parameters |", "| --- | --- | --- |"]
    for name, formula, params in describe_builtins():
        rows.append(f"| `{name}` | `{formula}` | {', '.join(params)} |")
    return "\n".join(rows)


def statuses() -> str:
    """Markdown table: every status, what it means, and whether the CLI counts it failed."""
    from gradfit.optim.status import FAILED, STATUSES

    rows = ["| status | meaning |", "| --- | --- |"]
    for name, meaning in STATUSES.items():
        failed = " (a failed fit: the CLI exits 3)" if name in FAILED else ""
        rows.append(f"| `{name}` | {meaning.replace('|', '/')}{failed} |")
    return "\n".join(rows)


TABLES = {"<!-- gradfit-builtin-models -->": builtin_models, "<!-- gradfit-statuses -->": statuses}


def on_page_markdown(markdown: str, **kwargs: Any) -> str:
    for marker, render in TABLES.items():
        if marker in markdown:
            markdown = markdown.replace(marker, render())
    return markdown
