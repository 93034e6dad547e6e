"""One small hierarchy: every error a user can cause is a ``GradfitError``.

The CLI turns these into one ``error: ...`` line on stderr and exit code 2.
"""

from __future__ import annotations

import difflib
import errno
import os
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


class OutputError(GradfitError, OSError):
    """An output that could not be written (a full or read-only disk, no permission).

    The message names the file or folder and what to do about it. It is an ``OSError`` too
    (``errno``, ``strerror`` and ``filename`` are the system's), so code that caught the
    system's error still catches it. ``option`` is how the caller named the output (``--out``),
    for the advice; ``io.files`` fills in ``path`` and ``option`` where it knows them.

    Example:
        >>> print(OutputError("r.json", OSError(errno.ENOSPC, "disk full"), "--out"))
        cannot write r.json: No space left on device; free some space or choose another --out
    """

    def __init__(self, path: object, cause: OSError, option: str | None = None) -> None:
        super().__init__(path, cause, option)
        self.path, self.option = path, option
        self.note: str | None = None  # what else the user should know (what was kept)
        self.errno = cause.errno
        if cause.errno:  # pyarrow's errors carry the errno inside a longer text
            self.strerror = os.strerror(cause.errno)
        else:
            self.strerror = (str(cause).strip().splitlines() or [type(cause).__name__])[0]

    @property
    def filename(self) -> str:
        return str(self.path)

    @filename.setter
    def filename(self, value: object) -> None:
        self.path = value

    def __str__(self) -> str:
        where = f"choose another {self.option}" if self.option else "write elsewhere"
        if self.errno in (errno.ENOSPC, errno.EDQUOT):
            advice = f"free some space or {where}"
        elif self.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            advice = f"{where} (a folder you may write to)"
        else:
            advice = where
        note = f"; {self.note}" if self.note else ""
        return f"cannot write {self.path}: {self.strerror}; {advice}{note}"


def unknown_name(kind: str, name: str, valid: Iterable[str]) -> OptionError:
    """An ``OptionError`` for an unknown ``name``, listing the valid ones and the closest match."""
    valid = sorted(valid)
    close = difflib.get_close_matches(name, valid, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return OptionError(f"unknown {kind} {name!r}{hint}; valid: {', '.join(valid)}")
