"""The CLI's ``--out`` folder: what it refuses (a file, a non-empty folder without
``--overwrite``) and how it is written (staged, moved into place only on success)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from gradfit.errors import OptionError
from gradfit.io.files import atomic_dir, check_parent, writing


def check_output_dir(path: Path, *, overwrite: bool = False) -> None:
    """Refuse an ``--out`` that is a file, or a non-empty folder unless ``overwrite``.

    Call it before a long fit, so the refusal comes before the work.
    """
    check_parent(path, "--out")
    if path.exists() and not path.is_dir():
        raise OptionError(f"--out {path}: exists and is not a folder")
    if path.exists() and any(path.iterdir()) and not overwrite:
        raise OptionError(f"--out {path}: folder exists and is not empty; use --overwrite")


@contextlib.contextmanager
def output_dir(path: Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Check ``path`` (``check_output_dir``), then yield a staging folder that becomes it
    only on success (``io.files.atomic_dir``): a failed or killed run leaves no half-written
    ``--out``; with ``overwrite``, each file replaces its old version atomically.
    """
    check_output_dir(path, overwrite=overwrite)
    with writing(path, "--out"), atomic_dir(path) as staging:  # a full disk names the file
        yield staging
