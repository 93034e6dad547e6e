"""Bad input: one clear `error:` line, exit code 2, no traceback, nothing written.

Each CLI case runs `gradfit fit` on files in tmp_path and checks the whole contract; the
library cases check that `gradfit.fit` raises the matching `GradfitError` subclass.
"""

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import gradfit as gf
from gradfit.cli.app import app

runner = CliRunner()
MODEL = "a*exp(-k*t)+c"


def decay_rows(n=30):
    t = np.linspace(0, 10, n)
    return t, 80 * np.exp(-0.4 * t) + 5


def write_csv(path, rows, header="t,counts,err"):
    path.write_text(header + "\n" + "".join(",".join(map(str, r)) + "\n" for r in rows))
    return path


@pytest.fixture
def good_csv(tmp_path):
    t, counts = decay_rows()
    return write_csv(tmp_path / "decay.csv", [(a, b, 0.5) for a, b in zip(t, counts, strict=True)])


def with_cell(tmp_path, row, column, value):
    """decay.csv with one cell replaced (column: 0 t, 1 counts, 2 err)."""
    t, counts = decay_rows()
    rows = [[a, b, 0.5] for a, b in zip(t, counts, strict=True)]
    rows[row][column] = value
    return write_csv(tmp_path / "decay.csv", rows)


def make(kind):
    """Builders: tmp_path -> data file for each kind of bad file."""

    def build(tmp_path):
        if kind == "missing":
            return tmp_path / "nope.csv"
        if kind == "folder":
            (tmp_path / "folder.csv").mkdir()
            return tmp_path / "folder.csv"
        if kind == "empty":
            (tmp_path / "empty.csv").write_bytes(b"")
            return tmp_path / "empty.csv"
        if kind == "header":
            return write_csv(tmp_path / "header.csv", [])
        if kind == "binary":
            (tmp_path / "binary.csv").write_bytes(bytes(range(256)) * 8)
            return tmp_path / "binary.csv"
        if kind == "parquet":
            (tmp_path / "corrupt.parquet").write_bytes(b"PAR1" + os.urandom(200))
            return tmp_path / "corrupt.parquet"
        if kind == "xlsx":
            (tmp_path / "data.xlsx").write_bytes(b"PK\x03\x04 not really a spreadsheet")
            return tmp_path / "data.xlsx"
        if kind == "npy":
            np.save(tmp_path / "plain.npy", np.arange(10.0))
            return tmp_path / "plain.npy"
        if kind == "text":
            return with_cell(tmp_path, 2, 1, "oops")
        if kind == "nan_y":
            return with_cell(tmp_path, 3, 1, "nan")
        if kind == "inf_x":
            return with_cell(tmp_path, 4, 0, "inf")
        if kind == "nan_sigma":
            return with_cell(tmp_path, 5, 2, "")
        if kind == "sigma0":
            return with_cell(tmp_path, 6, 2, "0")
        if kind == "semicolon_tsv":
            t, counts = decay_rows()
            rows = [(a, b, 0.5) for a, b in zip(t, counts, strict=True)]
            path = tmp_path / "decay.tsv"
            path.write_text("t;counts;err\n" + "".join(f"{a};{b};{c}\n" for a, b, c in rows))
            return path
        if kind == "two_rows":
            return write_csv(tmp_path / "short.csv", [(0, 1, 1), (1, 2, 1)])
        t, counts = decay_rows()
        return write_csv(
            tmp_path / "decay.csv", [(a, b, 0.5) for a, b in zip(t, counts, strict=True)]
        )

    return build


good = make("good")
# (id, data builder, extra arguments, substrings the single error line must contain)
CLI_CASES = [
    ("missing file", make("missing"), [], ["nope.csv", "no such file"]),
    ("folder, not a file", make("folder"), [], ["folder.csv", "not a file"]),
    ("empty file", make("empty"), [], ["empty.csv", "empty"]),
    ("header only", make("header"), [], ["header.csv", "no data rows"]),
    ("binary named .csv", make("binary"), [], ["binary.csv", "not a text file"]),
    ("corrupt parquet", make("parquet"), [], ["corrupt.parquet", "cannot read as parquet"]),
    ("unsupported type", make("xlsx"), [], ["data.xlsx", "'.xlsx'", "CSV, Parquet or NumPy"]),
    ("npy without columns", make("npy"), [], ["plain.npy", "named columns"]),
    ("missing column", good, ["--y", "count"], ["no column 'count'", "did you mean 'counts'",
                                               "columns are t, counts, err"]),
    ("non-numeric cell", make("text"), [], ["column 'counts'", "row 2", "'oops'"]),
    ("NaN in y", make("nan_y"), [], ["column 'counts'", "nan", "row 3", "--nan-policy omit"]),
    ("inf in x", make("inf_x"), [], ["column 't'", "inf", "row 4", "--nan-policy omit"]),
    ("NaN in sigma", make("nan_sigma"), ["--sigma", "err"], ["column 'err'", "row 5"]),
    ("sigma <= 0", make("sigma0"), ["--sigma", "err"], ["column 'err'", "must be > 0", "row 6"]),
    ("fewer points than parameters", make("two_rows"), [], ["2 data points", "3 free"]),
    ("unknown model name", good, ["--model", "gausian"],
     ["unknown model 'gausian'", "did you mean 'gaussian'", "exponential"]),
    ("unknown function", good, ["--model", "a*foo(t)"],
     ["unknown function 'foo'", "exp", "sqrt"]),
    ("code in the model", good, ["--model", "__import__('os').system('echo hacked')"],
     ["not allowed"]),
    ("invalid expression", good, ["--model", "a*(t"], ["invalid syntax"]),
    ("unknown loss", good, ["--loss", "hubr"], ["unknown loss 'hubr'", "did you mean 'huber'"]),
    ("unknown optimizer", good, ["--optimizer", "adamw"],
     ["unknown optimizer 'adamw'", "did you mean 'adam'", "lbfgs"]),
    ("bad nan policy", good, ["--nan-policy", "drop"], ["nan_policy", "raise, omit", "'drop'"]),
    ("lm with a non-least-squares loss", good, ["--optimizer", "lm", "--loss", "mae"],
     ["'lm'", "least-squares", "'mae'"]),
    ("chi2 without sigma", good, ["--loss", "chi2"], ["chi2", "sigma"]),
    ("--p0 unknown parameter", good, ["--p0", "z=1"], ["'z'", "valid: a, c, k"]),
    ("--p0 not a number", good, ["--p0", "a=abc"], ["--p0 a", "'abc' is not a number"]),
    ("--p0 not name=value", good, ["--p0", "a"], ["--p0", "expected name=value"]),
    ("--bounds unknown parameter", good, ["--bounds", "q=0:1"], ["'q'", "valid: a, c, k"]),
    ("--bounds not a number", good, ["--bounds", "k=zero:1"], ["--bounds k lower", "'zero'"]),
    ("--bounds lower >= upper", good, ["--bounds", "k=1:0"], ["'k'", "1.0 must be < upper 0.0"]),
    ("--fix unknown parameter", good, ["--fix", "b=0"], ["'b'", "valid: a, c, k"]),
    ("--fix not a number", good, ["--fix", "c=none"], ["--fix c", "'none' is not a number"]),
    ("p0 outside bounds", good, ["--p0", "k=5", "--bounds", "k=0:1"],
     ["'k'", "5.0", "outside its bounds"]),
    ("model not finite at p0", good, ["--model", "a*log(t - b)", "--p0", "a=1,b=100"],
     ["not finite at p0", "a=1", "b=100", "row 0"]),
    ("built-in with two x columns", good, ["--model", "gaussian", "--x", "t,err"],
     ["'gaussian'", "one x column"]),
    ("lr <= 0", good, ["--optimizer", "adam", "--lr", "-1"], ["lr must be > 0", "-1"]),
    ("model not in the x column's name", good, ["--model", "a*exp(-k*x) + c"],
     ["does not use the independent variable 't'", "write it in t"]),
    ("resume from a missing checkpoint", good, ["--resume", "gone.pt"],
     ["gone.pt", "no such checkpoint"]),
    ("semicolons in a .tsv", make("semicolon_tsv"), [],
     ["decay.tsv: read as one column 't;counts;err'", "give --delimiter ';'"]),
    ("bad --delimiter", good, ["--delimiter", "xx"], ["--delimiter must be one character"]),
    ("headerless read by name", good, ["--no-header"],
     ["no column 't'", "columns are c0, c1, c2", "without a header row"]),
    ("unknown option", good, ["--modle", "gaussian"],
     ["no such option --modle (did you mean --model?)", "fit --help"]),
    ("bad option value", good, ["--epochs", "many"], ["invalid value for --epochs"]),
]  # fmt: skip


def run_cli(data, *args):
    base = {"--x": "t", "--y": "counts", "--model": MODEL}
    args = [str(a) for a in args]
    for option, value in base.items():
        if option not in args:
            args += [option, value]
    return runner.invoke(app, ["fit", str(data), *args])


@pytest.mark.parametrize(("build", "args", "expected"), [c[1:] for c in CLI_CASES],
                         ids=[c[0] for c in CLI_CASES])  # fmt: skip
def test_cli_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, build, args, expected):
    data = build(tmp_path)
    before = set(tmp_path.iterdir())
    out, checkpoint = tmp_path / "runs" / "out", tmp_path / "fit.pt"
    if "--resume" not in args:
        args = [*args, "--checkpoint", checkpoint]
    result = run_cli(data, *args, "--out", out)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    for text in expected:
        assert text in lines[0]
    assert "Traceback" not in result.output
    assert result.stdout == ""
    assert not out.exists() and not out.parent.exists()  # not even the parent folder
    assert set(tmp_path.iterdir()) == before  # no staging folder, no checkpoint


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their permissions")
def test_cli_unreadable_file(good_csv, tmp_path):
    good_csv.chmod(0)
    try:
        result = run_cli(good_csv, "--out", tmp_path / "out")
    finally:
        good_csv.chmod(0o644)
    assert result.exit_code == 2
    assert result.stderr.startswith("error: ") and "decay.csv" in result.stderr
    assert not (tmp_path / "out").exists()


def test_cli_usage_errors_follow_click(good_csv, tmp_path):
    for args in (["--epochs", "many"], ["--checkpoint-every", "0"], ["--no-such-option"]):
        result = run_cli(good_csv, *args, "--out", tmp_path / "out")
        assert result.exit_code == 2, args
        assert "Traceback" not in result.output
        assert not (tmp_path / "out").exists()


def test_cli_existing_out_is_refused_unless_overwrite(good_csv, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = run_cli(good_csv, "--out", out)
    assert result.exit_code == 2
    assert result.stderr.strip() == f"error: --out {out}: folder exists and is not empty; " \
                                    "use --overwrite"  # fmt: skip
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    result = run_cli(good_csv, "--out", out, "--overwrite")
    assert result.exit_code == 0, result.output
    assert {"keep.txt", "results.json", "fit.png", "history.png"} <= {p.name for p in out.iterdir()}
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging


def test_cli_existing_checkpoint_is_refused_unless_resume_or_overwrite(good_csv, tmp_path):
    checkpoint = tmp_path / "fit.pt"
    checkpoint.write_bytes(b"an earlier run")
    result = run_cli(good_csv, "--checkpoint", checkpoint)
    assert result.exit_code == 2
    assert "file exists" in result.stderr and "--resume" in result.stderr
    assert checkpoint.read_bytes() == b"an earlier run"


def test_cli_nan_policy_omit_drops_rows_with_a_note(tmp_path):
    data = make("nan_y")(tmp_path)
    result = run_cli(data, "--nan-policy", "omit", "--json")
    assert result.exit_code == 0, result.output
    assert result.stderr.strip() == "note: --nan-policy omit dropped 1 rows with NaN or inf"
    assert '"n_omitted": 1' in result.stdout


# ---------------------------------------------------------------------------- the library


def quadratic():
    return gf.datasets.quadratic(seed=0)


def wrong_shape(x, params):
    return params[0] * torch.ones(3, dtype=params.dtype)


LIBRARY_CASES = [
    ("x, y lengths", lambda x, y: gf.fit("a*x + b", x[:-1], y), gf.DataError,
     ["x and y must have the same length", "99 and 100"]),
    ("NaN in y", lambda x, y: gf.fit("a*x + b", x, torch.where(torch.arange(100) == 7,
                                                              torch.nan, y)),
     gf.DataError, ["y has a non-finite value", "row 7", "nan_policy='omit'"]),
    ("inf in x", lambda x, y: gf.fit("a*x + b", torch.where(torch.arange(100) == 3,
                                                           torch.inf, x), y),
     gf.DataError, ["x has a non-finite value (inf) at row 3"]),
    ("x not numeric", lambda x, y: gf.fit("a*x + b", ["a"] * 100, y), gf.DataError,
     ["x must be numeric"]),
    ("x not 1-D", lambda x, y: gf.fit("a*x + b", x.reshape(10, 10), y), gf.DataError,
     ["one-dimensional", "(10, 10)"]),
    ("sigma <= 0", lambda x, y: gf.fit("a*x + b", x, y, sigma=np.r_[np.ones(99), -1.0]),
     gf.DataError, ["sigma must be > 0", "-1.0", "row 99"]),
    ("sigma length", lambda x, y: gf.fit("a*x + b", x, y, sigma=np.ones(5)), gf.DataError,
     ["sigma and y must have the same length", "5 and 100"]),
    ("fewer points", lambda x, y: gf.fit("a*x**2 + b*x + c", x[:2], y[:2]), gf.OptionError,
     ["2 data points cannot determine 3 free parameters"]),
    ("unknown model", lambda x, y: gf.fit("gausian", x, y), gf.OptionError,
     ["unknown model 'gausian'", "did you mean 'gaussian'", "'a*x + b'"]),
    ("unknown function", lambda x, y: gf.fit("a*foo(x)", x, y), gf.ExpressionError,
     ["unknown function 'foo'", "exp"]),
    ("unknown loss", lambda x, y: gf.fit("a*x", x, y, loss="hubr"), gf.OptionError,
     ["did you mean 'huber'"]),
    ("unknown optimizer", lambda x, y: gf.fit("a*x", x, y, optimizer="lbgfs"), gf.OptionError,
     ["did you mean 'lbfgs'"]),
    ("p0 unknown", lambda x, y: gf.fit("a*x", x, y, p0={"b": 1}), gf.OptionError,
     ["'b'", "valid: a"]),
    ("p0 length", lambda x, y: gf.fit("a*x + b", x, y, p0=[1, 2, 3]), gf.OptionError,
     ["p0 has 3 values", "2"]),
    ("bounds unknown", lambda x, y: gf.fit("a*x", x, y, bounds={"b": (0, 1)}), gf.OptionError,
     ["'b'", "valid: a"]),
    ("bounds order", lambda x, y: gf.fit("a*x", x, y, bounds={"a": (2, 1)}), gf.OptionError,
     ["lower 2.0 must be < upper 1.0"]),
    ("p0 outside", lambda x, y: gf.fit("a*x", x, y, p0={"a": 5}, bounds={"a": (0, 1)}),
     gf.OptionError, ["p0 of 'a' (5.0) lies outside its bounds [0.0, 1.0]"]),
    ("wrong shape", lambda x, y: gf.fit(gf.Model(wrong_shape, params=["a"]), x, y),
     gf.ModelError, ["shape (3,)", "expected (100,)"]),
    ("not finite at p0", lambda x, y: gf.fit("a/(x - b)", x, y, p0={"a": 1, "b": 0}),
     gf.ModelError, ["not finite at p0 (a=1, b=0)", "row 0"]),
    ("nan policy", lambda x, y: gf.fit("a*x", x, y, nan_policy="drop"), gf.OptionError,
     ["raise, omit"]),
    ("checkpoint_every", lambda x, y: gf.fit("a*x", x, y, checkpoint=Path("never.pt"),
                                             checkpoint_every=0),
     gf.OptionError, ["checkpoint_every must be >= 1"]),
    ("epochs 0", lambda x, y: gf.fit("a*x", x, y, optimizer="gd", epochs=0), gf.OptionError,
     ["epochs must be >= 1", "got 0"]),
    ("batch epochs", lambda x, y: gf.fit_batch("a*x", x, torch.stack([y, y]), epochs=-2),
     gf.OptionError, ["epochs must be >= 1", "got -2"]),
    ("no independent variable", lambda x, y: gf.fit(gf.Model("a*x + b", independent="t"), x, y),
     gf.ModelError, ["a*x + b does not use the independent variable 't'"]),
    ("batch without it", lambda x, y: gf.fit_batch("a*t + b", x, torch.stack([y, y])),
     gf.ModelError, ["does not use the independent variable 'x'", "write it in x"]),
]  # fmt: skip


@pytest.mark.parametrize(("call", "error", "expected"), [c[1:] for c in LIBRARY_CASES],
                         ids=[c[0] for c in LIBRARY_CASES])  # fmt: skip
def test_library_raises_the_specific_error(call, error, expected, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    x, y = quadratic()
    with pytest.raises(error) as info:
        call(x, y)
    assert isinstance(info.value, gf.GradfitError)
    for text in expected:
        assert text in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_library_nan_policy_omit_counts_the_dropped_rows():
    x, y = quadratic()
    y = y.clone()
    y[[3, 50]] = torch.nan
    result = gf.fit("a*x**2 + b*x + c", x, y, nan_policy="omit")
    assert result.n_omitted == 2 and result.n_points == 98


def test_an_x_variable_named_y_is_not_confused_with_y():
    t = np.linspace(0, 1, 20)
    model = gf.Model("a*y + b", independent=["y"])
    result = gf.fit(model, {"y": t}, 3 * t + 1)
    assert result.params == pytest.approx({"a": 3, "b": 1})


@pytest.mark.parametrize(
    ("option", "target", "expected"),
    [
        ("--checkpoint", "a_folder", "is a folder"),
        ("--checkpoint", "decay.csv/deeper/fit.pt", "decay.csv is not a folder"),
        ("--out", "decay.csv/run", "decay.csv is not a folder"),
        ("--out", "decay.csv", "exists and is not a folder"),
    ],
)
def test_cli_outputs_that_cannot_be_written(good_csv, tmp_path, option, target, expected):
    (tmp_path / "a_folder").mkdir()
    before = set(tmp_path.iterdir())
    result = run_cli(good_csv, option, tmp_path / target)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {option} "), result.stderr
    assert expected in lines[0]
    assert set(tmp_path.iterdir()) == before
