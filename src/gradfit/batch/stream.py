"""A batch's result rows written to one Parquet or CSV file chunk by chunk, as they come.

The rows go to a temporary file beside the target; the target appears, whole, only when
every chunk has been written (a run that fails or stops early leaves what was there before).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Any

from gradfit.errors import OptionError, OutputError
from gradfit.io.files import check_parent, make_parents, remove_folders, writing

SUFFIXES = (".parquet", ".pq", ".csv")


class ResultStream:
    """``write(table)`` per chunk, then ``finish(complete)``; usable as a context manager."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if self.path.suffix.lower() not in SUFFIXES:
            raise OptionError(f"out {self.path}: use a .parquet or .csv file")
        if self.path.is_dir():
            raise OptionError(f"out {self.path}: is a folder; give a .parquet or .csv file name")
        check_parent(self.path, "out")
        self._created = make_parents(self.path)  # removed again unless the rows are kept
        try:
            with writing(self.path):
                fd, tmp = tempfile.mkstemp(
                    prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent
                )
                os.close(fd)
        except OutputError:
            remove_folders(self._created)
            raise
        self._tmp = Path(tmp)
        self._writer: Any = None

    def write(self, table: Any) -> None:
        """Append ``table``'s rows (a full disk raises an ``OutputError`` naming ``path``)."""
        with writing(self.path):
            if self._writer is None:
                if self.path.suffix.lower() == ".csv":
                    import pyarrow.csv as pa_csv

                    self._writer = pa_csv.CSVWriter(str(self._tmp), table.schema)
                else:
                    import pyarrow.parquet as pq

                    self._writer = pq.ParquetWriter(str(self._tmp), table.schema)
            self._writer.write_table(table)

    def finish(self, complete: bool) -> None:
        """Move the rows into place if ``complete``, else drop them."""
        writer, self._writer = self._writer, None  # finishing twice does nothing more
        done = False
        try:
            with writing(self.path):
                if writer is not None:
                    writer.close()
                    if complete:
                        os.replace(self._tmp, self.path)
                        done = True
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._tmp)
            if not done:
                remove_folders(self._created)

    def __enter__(self) -> ResultStream:
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        if exc_type is not None:
            self.finish(complete=False)
