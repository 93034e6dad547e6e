"""Atomic file writes: a temporary file (or folder) beside the target, then ``os.replace``.

A kill at any moment leaves either the old file or the complete new one, never half.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success move it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def write_text_atomic(path: Path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (fsynced before the rename)."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    return path


def write_with(path: Path, writer: Callable[[Path], None]) -> Path:
    """Let ``writer`` fill a temporary file, then move it to ``path``."""
    with atomic_path(path) as tmp:
        writer(tmp)
    return path


@contextlib.contextmanager
def atomic_dir(path: Path) -> Iterator[Path]:
    """Stage files in a hidden sibling folder and move them into ``path`` only on success.

    A writer that fails or is killed leaves no half-written ``path``. Into an existing
    ``path``, each staged file replaces its old version atomically.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent))
    try:
        yield staging
        if not path.exists():
            os.rename(staging, path)
            return
        for item in staging.iterdir():
            os.replace(item, path / item.name)
    finally:
        if staging.exists():
            for item in staging.iterdir():
                item.unlink()
            staging.rmdir()


def check_parent(path: Path, option: str) -> None:
    """Refuse a ``path`` whose nearest existing ancestor is a file: it could never be written."""
    from gradfit.errors import OptionError

    ancestor = path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise OptionError(f"{option} {path}: {ancestor} is not a folder")
