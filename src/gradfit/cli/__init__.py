"""The command line: ``app`` (Typer, parsing only), ``commands`` (what each command does)."""

from gradfit.cli.app import app

__all__ = ["app"]
