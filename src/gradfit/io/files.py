"""Atomic file writes: a temporary file (or folder) beside the target, then ``os.replace``.

A kill at any moment leaves either the old file or the complete new one, never half. A write
that fails (a full or read-only disk) raises an ``OutputError`` naming the target, not the
temporary file, and leaves nothing behind: no temporary file, no folder it had to create.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from gradfit.errors import OutputError


@contextlib.contextmanager
def writing(path: Path, option: str | None = None) -> Iterator[None]:
    """Inside the block, an ``OSError`` becomes an ``OutputError`` naming ``path``.

    An ``OutputError`` raised inside keeps its own path; ``option`` (how the caller names the
    output, e.g. ``--out``) goes into its advice if it has none yet.
    """
    try:
        yield
    except OutputError as error:
        if error.option is None:
            error.option = option
        raise
    except OSError as error:
        raise OutputError(path, error, option) from error


def make_parents(path: Path) -> list[Path]:
    """Create ``path``'s missing parent folders; return those created, outermost first."""
    missing = []
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        missing.append(parent)
        parent = parent.parent
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
    return missing[::-1]


def remove_folders(folders: list[Path]) -> None:
    """Remove ``folders`` (from ``make_parents``) innermost first, as far as they are empty."""
    for folder in reversed(folders):
        try:
            folder.rmdir()
        except OSError:
            return


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success move it into place."""
    created = make_parents(path)
    done = False
    try:
        with writing(path):
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
            os.close(fd)
        try:
            with writing(path):
                yield Path(tmp)
                os.replace(tmp, path)
                done = True
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
    finally:
        if not done:
            remove_folders(created)


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
    ``path``, each staged file replaces its old version atomically. A failed write names the
    file as it would have been in ``path`` (``run/results.json``, not the staging folder's).
    """
    created = make_parents(path)
    done = False
    try:
        with writing(path):
            staging = Path(
                tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
            )
        try:
            try:
                yield staging
            except OutputError as error:  # written in staging: name the file in ``path``
                with contextlib.suppress(ValueError):
                    error.path = path / Path(str(error.path)).relative_to(staging)
                raise
            except OSError as error:
                raise OutputError(path, error) from error
            if not path.exists():
                with writing(path):
                    os.rename(staging, path)
            else:
                for item in staging.iterdir():
                    with writing(path / item.name):
                        os.replace(item, path / item.name)
            done = True
        finally:
            if staging.exists():
                for item in staging.iterdir():
                    item.unlink()
                staging.rmdir()
    finally:
        if not done:
            remove_folders(created)


def check_parent(path: Path, option: str) -> None:
    """Refuse a ``path`` whose nearest existing ancestor is a file: it could never be written."""
    from gradfit.errors import OptionError

    ancestor = path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise OptionError(f"{option} {path}: {ancestor} is not a folder")
