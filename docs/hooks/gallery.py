"""MkDocs hook: the gallery's figures, drawn by the build from the gallery page's own code.

Every ```python block of ``gallery.md`` runs in order in one namespace (as tests/test_docs.py
runs it). A block whose first line is ``# figure: NAME.png`` must leave a matplotlib
``Figure`` in ``fig``; it is rendered to PNG in memory and added to the build as
``gallery/NAME.png``. Nothing is written into the source tree: the images exist only in the
built site, and the code shown next to each image is the code that drew it.
"""

from __future__ import annotations

import io
import logging
import os
import re
import time
from pathlib import Path
from typing import Any

from code_blocks import code_blocks  # a sibling module: MkDocs puts this folder on sys.path

PAGE = "gallery.md"
FOLDER = "gallery"
log = logging.getLogger("mkdocs.hooks.gallery")
_TAG = re.compile(r"^#\s*figure:\s*(?P<name>[\w.-]+\.png)\s*$")


def figure_name(code: str) -> str | None:
    """``NAME.png`` from a block's ``# figure: NAME.png`` first line, else None."""
    first = code.lstrip("\n").split("\n", 1)[0].strip()
    match = _TAG.match(first)
    return match["name"] if match else None


def render_figures(page: Path) -> dict[str, bytes]:
    """Run the page's python blocks in order; PNG bytes for each ``# figure:`` block."""
    os.environ.setdefault("MPLBACKEND", "Agg")  # no display on a build machine
    namespace: dict[str, Any] = {"__name__": "__gallery__"}
    images: dict[str, bytes] = {}
    for block in code_blocks(page.read_text(encoding="utf-8")):
        if block.language != "python":
            continue
        namespace.pop("fig", None)
        code = compile(block.code, f"{page}:{block.line}", "exec")
        exec(code, namespace)  # noqa: S102  # our own page's examples, as the tests run them
        name = figure_name(block.code)
        if name is None:
            continue
        figure = namespace.get("fig")
        if figure is None or not hasattr(figure, "savefig"):
            raise RuntimeError(f"{page}:{block.line}: '# figure: {name}' left no Figure in fig")
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", dpi=80, bbox_inches="tight")
        images[name] = buffer.getvalue()
    return images


def on_files(files: Any, config: Any) -> Any:
    from mkdocs.structure.files import File

    page = Path(config["docs_dir"]) / PAGE
    if not page.exists():
        return files
    started = time.perf_counter()
    for name, content in render_figures(page).items():
        files.append(File.generated(config, f"{FOLDER}/{name}", content=content))
    log.info("gallery: figures drawn in %.1f s", time.perf_counter() - started)
    return files
