"""The CLI answers before torch has loaded: ``--help``, ``fit --help``, ``fit-many --help`` and
``models`` run in a fresh process without importing torch; a fit imports it where it starts.

Each command runs in a subprocess through a small wrapper that reports, on its last stderr
line, whether ``torch`` was in ``sys.modules`` when the command ended (no timings here:
benchmarks/bench_cli_startup.py measures them).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import gradfit as gf
from gradfit.model import catalog, models

MARKER = "torch imported at exit:"

#: how the wrapper starts the CLI: ``python -m gradfit.cli``, or the console script's entry
#: point (``gradfit = "gradfit.cli:app"`` in pyproject.toml) loaded as the script loads it
STARTS = {
    "module": "runpy.run_module('gradfit.cli', run_name='__main__', alter_sys=True)",
    "console_script": (
        "from importlib.metadata import entry_points; "
        "entry_points(group='console_scripts')['gradfit'].load()()"
    ),
}

WRAPPER = """
import runpy, sys
sys.argv = ['gradfit', *sys.argv[1:]]
code = 0
try:
    {start}
except SystemExit as stop:
    code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
sys.stdout.flush()
print({marker!r}, 'torch' in sys.modules, file=sys.stderr)
sys.exit(code)
"""


def run_cli(
    *args: str | Path, start: str = "module"
) -> tuple[subprocess.CompletedProcess[str], bool]:
    """Run ``gradfit ARGS`` in a fresh interpreter; return the process and whether torch was
    imported by the time it ended."""
    code = WRAPPER.format(start=STARTS[start], marker=MARKER)
    process = subprocess.run(
        [sys.executable, "-c", code, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "COLUMNS": "120"},
    )
    last = process.stderr.strip().splitlines()[-1] if process.stderr.strip() else ""
    assert last.startswith(MARKER), process.stderr
    return process, last.removeprefix(MARKER).strip() == "True"


@pytest.mark.parametrize("start", sorted(STARTS))
@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (("--help",), ["fit-many", "models", "demo"]),
        (("fit", "--help"), ["--model", "--optimizer", "--checkpoint"]),
        (("fit-many", "--help"), ["--group", "--chunk-size", "--resume"]),
    ],
    ids=["help", "fit-help", "fit-many-help"],
)
def test_help_answers_without_torch(start, args, expected):
    process, torch_imported = run_cli(*args, start=start)
    assert process.returncode == 0, process.stderr
    for word in expected:
        assert word in process.stdout
    assert not torch_imported


@pytest.mark.parametrize("start", sorted(STARTS))
def test_models_answers_without_torch(start):
    process, torch_imported = run_cli("models", start=start)
    assert process.returncode == 0, process.stderr
    for name in ("linear", "gaussian", "lorentzian", "power_law", "polynomial4"):
        assert name in process.stdout
    assert not torch_imported

    process, torch_imported = run_cli("models", "--json", start=start)
    assert process.returncode == 0, process.stderr
    assert not torch_imported
    listed = json.loads(process.stdout)
    assert [row["name"] for row in listed] == [n for n, _, _ in catalog.describe_builtins()]


def test_fit_still_works_and_imports_torch(tmp_path):
    t = np.linspace(0, 10, 40)
    counts = 80 * np.exp(-0.4 * t) + 5
    path = tmp_path / "decay.csv"
    path.write_text("t,counts\n" + "".join(f"{a},{b}\n" for a, b in zip(t, counts, strict=True)))
    process, torch_imported = run_cli(
        "fit", path, "--x", "t", "--y", "counts", "--model", "exponential", "--json"
    )
    assert process.returncode == 0, process.stderr
    assert torch_imported
    params = json.loads(process.stdout)["params"]
    assert params["a"] == pytest.approx(80, rel=1e-6)
    assert params["k"] == pytest.approx(0.4, rel=1e-6)
    assert params["c"] == pytest.approx(5, rel=1e-6)


def test_import_gradfit_is_lazy_but_complete():
    code = (
        "import sys, gradfit as gf; lazy = 'torch' not in sys.modules; "
        "names = set(dir(gf)); from gradfit import fit; "
        "print(lazy, set(gf.__all__) <= names, gf.fit is fit, 'torch' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300
    )
    assert out.stdout.split() == ["True", "True", "True", "True"]
    for name in gf.__all__:
        assert getattr(gf, name) is not None
    with pytest.raises(AttributeError, match="no_such_name"):
        gf.no_such_name  # noqa: B018


def test_builtins_are_built_from_the_catalog():
    # catalog.py is the one list: models.py adds only the guesses
    assert list(models.BUILTINS) == list(catalog.BUILTINS)
    for key, spec in catalog.BUILTINS.items():
        model = models.BUILTINS[key]()
        assert (model.name, model.formula, model.param_names, model.description) == (
            spec.name,
            spec.formula,
            spec.params,
            spec.description,
        )
        assert model.expression is not None and str(model.expression) == spec.formula
        assert model.guess_fn is not None
    poly5, spec5 = models.get_builtin("poly5"), catalog.find("poly5")
    assert poly5 is not None and spec5 is not None and poly5.param_names == spec5.params
    assert models.get_builtin("a*x + b") is None
