"""MkDocs hook: the CLI reference, rendered at build time from the Typer app itself.

A page holding the marker ``<!-- gradfit-cli-reference -->`` gets, in its place, one section
per command with its ``--help`` as plain text (click's formatter, not Rich's: no markup or
box drawing leaks into the page). The help therefore cannot drift from the code.
"""

from __future__ import annotations

from typing import Any

MARKER = "<!-- gradfit-cli-reference -->"
WIDTH = 88  # the width of a code block on the page, more or less


def plain_help(command: Any, path: str, parent: Any = None) -> str:
    """``command``'s help as click prints it without Rich (Typer's plain fallback)."""
    command.rich_markup_mode = None  # Typer: format with click's HelpFormatter
    ctx = command.make_context(
        path.rsplit(" ", 1)[-1],
        [],
        parent=parent,
        resilient_parsing=True,  # no "missing option" errors: we only want the help
        max_content_width=WIDTH,
        terminal_width=WIDTH,
    )
    ctx.info_name = path
    return str(ctx.get_help())


def cli_reference() -> str:
    """Markdown: the top-level help, then one section per command, in the app's order."""
    import typer.main

    from gradfit.cli.app import app

    group = typer.main.get_command(app)
    parts = ["```text", plain_help(group, "gradfit"), "```", ""]
    for name, command in group.commands.items():  # type: ignore[attr-defined]
        parts += [f"## gradfit {name}", "", "```text"]
        parts += [plain_help(command, f"gradfit {name}"), "```", ""]
    return "\n".join(parts)


def on_page_markdown(markdown: str, **kwargs: Any) -> str:
    if MARKER not in markdown:
        return markdown
    return markdown.replace(MARKER, cli_reference())
