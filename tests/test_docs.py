"""Every code example of the documentation runs: one test per page, named after the page.

A page's ```python blocks run in order in one namespace, in a fresh temporary folder; its
```console blocks run their ``$ gradfit ...`` lines at their place in the page (through the
Typer app in this process, as tests/test_cli.py does), each of which must exit 0. The
examples check their own claims with ``assert``: a page whose numbers stop being true fails
here, with the page and line named.
"""

from __future__ import annotations

import importlib.util
import re
import shlex
import sys
import traceback
from pathlib import Path

import pytest
from typer.testing import CliRunner

DOCS = Path(__file__).resolve().parents[1] / "docs"


def _load_code_blocks():  # the same reader the gallery hook uses, loaded from its file
    spec = importlib.util.spec_from_file_location("code_blocks", DOCS / "hooks" / "code_blocks.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("code_blocks", module)
    spec.loader.exec_module(module)
    return module


blocks = _load_code_blocks()
PAGES = sorted(p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md"))


def runnable(page: str) -> bool:
    found = blocks.code_blocks((DOCS / page).read_text(encoding="utf-8"))
    return any(b.language == "python" or blocks.console_commands(b) for b in found)


def run_command(command: str, where: str) -> None:
    from gradfit.cli.app import app

    result = CliRunner().invoke(app, shlex.split(command)[1:])
    if result.exit_code != 0:
        pytest.fail(f"{where}: `{command}` exited {result.exit_code}:\n{result.output}")


# optional extras a page may use: without them its examples are skipped, not failed
OPTIONAL = ("dask", "distributed", "xarray", "pandas", "scipy")
_IMPORT = re.compile(r"^\s*(?:import|from)\s+(\w+)", re.MULTILINE)


def needs(code: str) -> set[str]:
    found = {name for name in _IMPORT.findall(code) if name in OPTIONAL}
    return found | {name for name in ("pandas", "xarray") if f".to_{name}(" in code}


@pytest.mark.parametrize("page", [p for p in PAGES if runnable(p)])
def test_page_examples_run(page: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    found = blocks.code_blocks((DOCS / page).read_text(encoding="utf-8"))
    for name in sorted(needs("".join(b.code for b in found if b.language == "python"))):
        pytest.importorskip(name)
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {"__name__": "__docs__"}
    for block in found:
        where = f"docs/{page}:{block.line}"
        if block.language == "python":
            try:
                exec(compile(block.code, where, "exec"), namespace)
            except Exception:
                pytest.fail(f"{where}: the example failed:\n{traceback.format_exc(limit=-3)}")
        for command in blocks.console_commands(block):
            run_command(command, where)


def test_every_page_is_found() -> None:
    # the parametrisation above is not empty by accident (a moved docs folder, a bad glob)
    assert {"index.md", "tutorial.md", "gallery.md"} <= {p for p in PAGES if runnable(p)}


def test_code_blocks_reader() -> None:
    text = (
        "intro\n```python\nx = 1\n```\n\n!!! note\n    ```python\n    y = 2\n    ```\n"
        "```console\n$ gradfit fit a.csv \\\n    --model linear\nsome output\n$ ls\n```\n"
    )
    found = blocks.code_blocks(text)
    assert [(b.language, b.code, b.line) for b in found[:2]] == [
        ("python", "x = 1\n", 2),
        ("python", "y = 2\n", 7),
    ]
    assert blocks.console_commands(found[2]) == ["gradfit fit a.csv --model linear"]


def _load_hook(name: str):
    path = DOCS / "hooks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"docs_hook_{name}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_reference_has_every_command_and_option() -> None:
    import typer.main

    from gradfit.cli.app import app

    text = _load_hook("cli_reference").cli_reference()
    for name, command in typer.main.get_command(app).commands.items():
        assert f"## gradfit {name}\n" in text
        for param in command.params:
            for option in param.opts:
                if option.startswith("--"):
                    assert option in text, f"{option} of gradfit {name} missing"
    assert not set("╭╮╰╯│─") & set(text) and "[bold" not in text  # plain text, no Rich


def test_gallery_renders_tagged_blocks(tmp_path: Path) -> None:
    gallery = _load_hook("gallery")
    page = tmp_path / "gallery.md"
    page.write_text(
        "```python\nfrom matplotlib.figure import Figure\n```\n"
        "```python\n# figure: one.png\nfig = Figure()\nfig.subplots().plot([0, 1])\n```\n"
        "```python\nunrelated = 1\n```\n"
    )
    images = gallery.render_figures(page)
    assert list(images) == ["one.png"] and images["one.png"].startswith(b"\x89PNG")
    page.write_text("```python\n# figure: none.png\nx = 1\n```\n")
    with pytest.raises(RuntimeError, match=r"none\.png.*left no Figure"):
        gallery.render_figures(page)
