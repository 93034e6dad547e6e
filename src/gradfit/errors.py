"""One small hierarchy: every error a user can cause is a ``GradfitError``.

The CLI turns these into one ``error: ...`` line on stderr and exit code 2.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class GradfitError(ValueError):
    """Base class for errors caused by user input (data, model, options)."""


class DataError(GradfitError):
    """Bad data: missing file or column, non-numeric or non-finite values, mismatched lengths."""


class ExpressionError(GradfitError):
    """A model expression that is not in the safe expression language."""


class ModelError(GradfitError):
    """A model that cannot be built or evaluated (wrong shape, non-finite output)."""


class OptionError(GradfitError):
    """A bad option: unknown name, unparsable number, inconsistent bounds."""


class CheckpointError(GradfitError):
    """A checkpoint that cannot be read, or that belongs to another fit."""


def unknown_name(kind: str, name: str, valid: Iterable[str]) -> OptionError:
    """An ``OptionError`` for an unknown ``name``, listing the valid ones and the closest match."""
    valid = sorted(valid)
    close = difflib.get_close_matches(name, valid, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return OptionError(f"unknown {kind} {name!r}{hint}; valid: {', '.join(valid)}")
