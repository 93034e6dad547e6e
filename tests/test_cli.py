"""The CLI end to end on files in tmp_path: exit codes, files written, JSON keys."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_fit import assert_dict_matches_result  # tests/ is on sys.path (conftest)
from typer.testing import CliRunner

import gradfit as gf
from gradfit.cli.app import app

runner = CliRunner()


@pytest.fixture
def decay_csv(tmp_path):
    rng = np.random.default_rng(3)
    t = np.linspace(0, 10, 60)
    counts = 80 * np.exp(-0.4 * t) + 5 + rng.normal(0, 0.5, t.size)
    path = tmp_path / "decay.csv"
    lines = ["t,counts,err"] + [f"{a},{b},0.5" for a, b in zip(t, counts, strict=True)]
    path.write_text("\n".join(lines) + "\n")
    return path


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_fit_writes_results_plots_and_report(decay_csv, tmp_path):
    out = tmp_path / "run"
    result = invoke(
        "fit",
        decay_csv,
        "--x",
        "t",
        "--y",
        "counts",
        "--sigma",
        "err",
        "--model",
        "a*exp(-k*t)+c",
        "--p0",
        "a=50,k=0.1,c=0",
        "--out",
        out,
        "--report",
    )
    assert result.exit_code == 0, result.output
    assert {p.name for p in out.iterdir()} == {
        "results.json",
        "fit.png",
        "history.png",
        "report.html",
    }
    data = json.loads((out / "results.json").read_text())
    # the same fit through the library: results.json holds its values, each one
    table = np.loadtxt(decay_csv, delimiter=",", skiprows=1)
    t, counts, err = table.T
    model = gf.Model("a*exp(-k*t)+c", independent=["t"])
    p0 = {"a": 50.0, "k": 0.1, "c": 0.0}
    same = gf.fit(model, {"t": t}, counts, sigma=err, p0=p0, progress=True)
    assert_dict_matches_result(data, same, rel=1e-9)
    # and the values computable from the table alone
    a, k, c = (data["params"][name] for name in "akc")
    weighted = (counts - (a * np.exp(-k * t) + c)) / err
    chi2, n = float(weighted @ weighted), t.size
    assert data["n_points"] == n and data["dof"] == n - 3
    assert data["chi2"] == pytest.approx(chi2, rel=1e-10)
    assert data["reduced_chi2"] == pytest.approx(chi2 / (n - 3), rel=1e-10)
    assert data["loss"] == pytest.approx(chi2 / n, rel=1e-10)
    assert data["model"] == model.formula and data["param_names"] == ["a", "k", "c"]
    assert (data["loss_name"], data["optimizer"]) == ("mse", "lm")
    assert data["n_iter"] == len(data["history"]) and data["warnings"] == []
    assert data["params"]["k"] == pytest.approx(0.4, rel=0.05)
    assert data["converged"] is True and data["status"] == "converged"
    html = (out / "report.html").read_text()
    assert "data:image/png;base64," in html and "http" not in html.split("<body>")[1]
    assert "[[Parameters]]" in result.output


def test_fit_json_on_stdout_with_a_builtin_and_parquet(tmp_path):
    x = np.linspace(-3, 3, 80)
    y = 2 * np.exp(-((x - 0.5) ** 2) / (2 * 0.7**2)) + 0.1
    path = tmp_path / "peak.parquet"
    pq.write_table(pa.table({"pos": x, "signal": y}), path)
    result = invoke("fit", path, "--x", "pos", "--y", "signal", "--model", "gaussian", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["params"]["center"] == pytest.approx(0.5, abs=1e-6)
    assert data["optimizer"] == "lm"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "a*exp(-k*t)+c", "--x", "time"], "no column 'time'"),
        (["--model", "a*exp(-k*t)+c", "--x", "t", "--p0", "z=1"], "'z'"),
        (["--model", "a*exp(-k*t)+c", "--x", "t", "--p0", "a=abc"], "not a number"),
        (["--model", "a*exp(-k*t)+c", "--x", "t", "--loss", "hubr"], "did you mean 'huber'"),
        (["--model", "a*exp(-k*t)+c", "--x", "t", "--optimizer", "bfgs"], "lbfgs"),
        (["--model", "__import__('os').system('echo hacked')", "--x", "t"], "error"),
        (["--model", "nosuchmodel(t)", "--x", "t"], "nosuchmodel"),
        (["--model", "a*exp(-k*t)+c", "--x", "t", "--bounds", "k=1:0"], "must be <"),
    ],
)
def test_bad_input_gives_one_line_and_exit_2(decay_csv, tmp_path, args, message):
    out = tmp_path / "never"
    result = invoke("fit", decay_csv, "--y", "counts", "--out", out, *args)
    assert result.exit_code == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert message in lines[0]
    assert "Traceback" not in result.output
    assert not out.exists()


def test_missing_file_and_unsupported_type(tmp_path):
    result = invoke("fit", tmp_path / "nope.csv", "--x", "x", "--y", "y", "--model", "linear")
    assert result.exit_code == 2 and "no such file" in result.stderr
    other = tmp_path / "data.xlsx"
    other.write_text("x")
    result = invoke("fit", other, "--x", "x", "--y", "y", "--model", "linear")
    assert result.exit_code == 2 and "unsupported file type" in result.stderr


def test_non_numeric_cell_names_column_and_row(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("x,y\n0,1\n1,2\n2,oops\n3,4\n")
    result = invoke("fit", path, "--x", "x", "--y", "y", "--model", "linear")
    assert result.exit_code == 2
    assert "'y'" in result.stderr and "row 2" in result.stderr


def test_models_lists_the_builtins():
    result = invoke("models", "--json")
    assert result.exit_code == 0
    names = {m["name"] for m in json.loads(result.stdout)}
    assert {
        "linear",
        "exponential",
        "gaussian",
        "lorentzian",
        "logistic",
        "power_law",
        "sine",
    } <= names


def test_installed_console_script_runs(decay_csv):
    # the `gradfit` entry point that installing the package put beside this interpreter
    name = "gradfit.exe" if sys.platform == "win32" else "gradfit"
    script = Path(sys.executable).parent / name
    if not script.is_file():
        pytest.skip(f"no installed gradfit console script beside {sys.executable}")
    result = subprocess.run([script, "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "demo" in result.stdout and "fit-many" in result.stdout
    args = ["fit", decay_csv, "--x", "t", "--y", "counts", "--model", "linear", "--json"]
    result = subprocess.run([script, *args], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["param_names"] == ["a", "b"]
    result = subprocess.run([script, "fit", decay_csv, "--model", "linear"], capture_output=True,
                            text=True, timeout=120)  # fmt: skip
    assert result.returncode == 2 and result.stderr.startswith("error: "), result.stderr


def test_a_diverging_fit_exits_3_and_still_writes_its_results(decay_csv, tmp_path):
    out = tmp_path / "run"
    args = ["--x", "t", "--y", "counts", "--model", "a*exp(-k*t)+c", "--p0", "a=50,k=0.1,c=0"]
    result = invoke("fit", decay_csv, *args, "--optimizer", "gd", "--lr", "10", "--out", out)
    assert result.exit_code == 3
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: loss became"), result.stderr
    assert "at epoch" in lines[0] and "smaller learning rate" in lines[0]
    assert "[[Parameters]]" in result.stdout
    data = json.loads((out / "results.json").read_text())
    assert data["status"] == "diverged" and data["converged"] is False
    assert data["loss"] is not None and data["loss"] <= data["history"][0]
    assert all(v is not None for v in data["params"].values())
    assert {p.name for p in out.iterdir()} == {"results.json", "fit.png", "history.png"}


def test_outputs_are_all_or_nothing(tmp_path):
    from gradfit.cli.outputs import output_dir
    from gradfit.io.files import write_text_atomic, write_with

    target = write_text_atomic(tmp_path / "results.json", "old")

    def half_then_fail(tmp):
        tmp.write_text("half")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        write_with(target, half_then_fail)
    assert target.read_text() == "old"
    out = tmp_path / "run"
    with pytest.raises(RuntimeError), output_dir(out) as staging:
        write_text_atomic(staging / "results.json", "{}")
        raise RuntimeError("killed while writing plots")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]  # no run, no temp
