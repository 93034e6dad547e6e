"""``python -m gradfit.cli``."""

from gradfit.cli.app import app

app()
