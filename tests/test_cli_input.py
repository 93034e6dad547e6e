"""The CLI's input side end to end: text tables (TSV, whitespace, headerless, semicolons),
--delimiter and --header/--no-header, the --x/--y defaults, and usage errors as one line."""

import json
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from gradfit.cli.app import app
from gradfit.errors import OptionError
from gradfit.io.tables import WHITESPACE, TableOptions, parse_delimiter, read_table

runner = CliRunner()
T = np.linspace(0, 10, 40)
COUNTS = 80 * np.exp(-0.4 * T) + 5  # exact: every fit below lands on a=80, k=0.4, c=5


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args], prog_name="gradfit")


def write(path, rows, header=None, sep=","):
    lines = [sep.join(header)] if header else []
    lines += [sep.join(f"{v:.12g}" for v in row) for row in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def decay_rows():
    return list(zip(T, COUNTS, strict=True))


def fitted(result):
    assert result.exit_code == 0, result.output
    params = json.loads(result.stdout)["params"]
    assert params == pytest.approx({"a": 80, "k": 0.4, "c": 5}, rel=1e-6)
    return params


def one_error_line(result):
    """The bad-input contract: exit 2, one `error:` line on stderr, nothing on stdout."""
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert result.stdout == "" and "Traceback" not in result.output
    assert "╭" not in result.output  # no Rich box
    return lines[0]


# ---------------------------------------------------------------------------- text tables


def test_tsv_by_extension(tmp_path):
    path = write(tmp_path / "decay.tsv", decay_rows(), ["t", "counts"], sep="\t")
    fitted(invoke("fit", path, "--x", "t", "--y", "counts", "--model", "exponential", "--json"))


def test_tab_separated_csv_is_sniffed(tmp_path):
    path = write(tmp_path / "decay.csv", decay_rows(), ["t", "counts"], sep="\t")
    fitted(invoke("fit", path, "--x", "t", "--y", "counts", "--model", "exponential", "--json"))


def test_whitespace_headerless_with_comments_names_columns_by_position(tmp_path):
    path = tmp_path / "decay.txt"
    body = "".join(f"{a:12.8f}   {b:16.10f}\n" for a, b in decay_rows())
    path.write_text("# written by an instrument\n# t counts\n\n" + body)
    model = "a*exp(-k*c0) + c"
    result = invoke("fit", path, "--x", "c0", "--y", "c1", "--model", model, "--json",
                    "--p0", "a=50,k=0.1,c=0")  # fmt: skip
    assert fitted(result)


def test_whitespace_with_header_and_delimiter_given(tmp_path):
    path = write(tmp_path / "decay.dat", decay_rows(), ["t", "counts"], sep="  ")
    for delimiter in ("whitespace", " "):
        fitted(invoke("fit", path, "--x", "t", "--y", "counts", "--model", "exponential",
                      "--delimiter", delimiter, "--json"))  # fmt: skip


def test_headerless_csv_is_detected_and_defaults_point_at_c0(tmp_path):
    path = write(tmp_path / "decay.csv", decay_rows())
    fitted(invoke("fit", path, "--x", "c0", "--y", "c1", "--model", "exponential", "--json"))
    line = one_error_line(invoke("fit", path, "--model", "exponential"))
    assert "no column 'x'" in line and "columns are c0, c1" in line and "--header" in line


def test_header_flag_forces_a_numeric_first_row_to_be_names(tmp_path):
    path = write(tmp_path / "decay.csv", decay_rows(), ["1", "2"])
    result = invoke("fit", path, "--x", "1", "--y", "2", "--model", "exponential", "--json",
                    "--header")  # fmt: skip
    fitted(result)


def test_no_header_flag_reads_the_first_row_as_data(tmp_path):
    path = write(tmp_path / "decay.csv", decay_rows(), ["t", "counts"])
    line = one_error_line(invoke("fit", path, "--x", "c0", "--y", "c1", "--model", "linear",
                                 "--no-header"))  # fmt: skip
    assert "decay.csv: column 'c0': row 0 is not a number ('t')" in line


def test_semicolons_are_sniffed(tmp_path):
    path = write(tmp_path / "decay.csv", decay_rows(), ["x", "y"], sep=";")
    fitted(invoke("fit", path, "--model", "exponential", "--json"))  # --x x --y y by default


@pytest.mark.parametrize(
    ("name", "args", "shown"),
    [
        ("decay.tsv", [], "separated by tab"),  # .tsv means tab, but the file has semicolons
        ("decay.csv", ["--delimiter", ","], "separated by ','"),
    ],
)
def test_semicolons_read_as_one_column_get_a_delimiter_hint(tmp_path, name, args, shown):
    path = write(tmp_path / name, decay_rows(), ["x", "y"], sep=";")
    line = one_error_line(invoke("fit", path, "--model", "exponential", *args))
    assert f"{name}: read as one column 'x;y' {shown}" in line
    assert line.endswith("give --delimiter ';'")


def test_undetectable_delimiter_gets_a_hint(tmp_path):
    path = tmp_path / "odd.txt"
    path.write_text("a b,c\n1;2\n4\t5 6 7\n")  # no separator gives two lines alike
    line = one_error_line(invoke("fit", path, "--model", "linear"))
    assert "odd.txt: cannot tell how the columns are separated" in line and "--delimiter" in line


def test_a_ragged_row_names_the_separator_read(tmp_path):
    path = write(tmp_path / "ragged.csv", decay_rows(), ["x", "y"])
    path.write_text(path.read_text() + "1,2,3\n")
    line = one_error_line(invoke("fit", path, "--model", "linear"))
    assert "ragged.csv: cannot read as separated by ','" in line and "1,2,3" in line
    assert "--delimiter" in line


@pytest.mark.parametrize(("suffix", "sep"), [(".tsv", "\t"), (".txt", "   "), (".csv", ";")])
def test_bad_values_name_file_column_and_row(tmp_path, suffix, sep):
    rows = [[f"{a:.6g}", f"{b:.6g}"] for a, b in decay_rows()]
    rows[4][1] = "oops"
    path = tmp_path / f"decay{suffix}"
    path.write_text("\n".join(sep.join(r) for r in [["t", "counts"], *rows]) + "\n")
    line = one_error_line(invoke("fit", path, "--x", "t", "--y", "counts", "--model", "linear"))
    assert f"decay{suffix}: column 'counts': row 4 is not a number ('oops')" in line


def test_whitespace_row_with_a_missing_field_names_its_line(tmp_path):
    path = tmp_path / "short.txt"
    path.write_text("t counts\n0 1\n1\n2 3\n")
    line = one_error_line(invoke("fit", path, "--x", "t", "--y", "counts", "--model", "linear",
                                 "--delimiter", "whitespace"))  # fmt: skip
    assert "short.txt: line 3 has 1 fields, line 1 has 2" in line


@pytest.mark.parametrize("bad", ["xx", "ab", "1", ""])
def test_bad_delimiter_is_refused(tmp_path, bad):
    path = write(tmp_path / "decay.csv", decay_rows(), ["x", "y"])
    line = one_error_line(invoke("fit", path, "--model", "linear", "--delimiter", bad))
    assert "--delimiter must be one character" in line and repr(bad) in line


def test_text_options_on_parquet_are_refused(tmp_path):
    path = tmp_path / "decay.parquet"
    pq.write_table(pa.table({"x": T, "y": COUNTS}), path)
    for option in (["--delimiter", ","], ["--no-header"]):
        line = one_error_line(invoke("fit", path, "--model", "linear", *option))
        assert "decay.parquet: --delimiter and --header/--no-header apply to text" in line


def test_fit_x_and_y_default_to_columns_x_and_y(tmp_path):
    path = write(tmp_path / "decay.csv", decay_rows(), ["x", "y"])
    fitted(invoke("fit", path, "--model", "exponential", "--json"))
    line = one_error_line(invoke("fit", write(tmp_path / "other.csv", decay_rows(), ["t", "y"]),
                                 "--model", "exponential"))  # fmt: skip
    assert "no column 'x'" in line


def test_fit_many_reads_headerless_whitespace(tmp_path):
    rows = [(g, t, (1 + g) * c) for g in (0, 1, 2) for t, c in decay_rows()]
    path = write(tmp_path / "curves.txt", rows, sep=" ")
    out = tmp_path / "params.csv"
    result = invoke("fit-many", path, "--group", "c0", "--x", "c1", "--y", "c2",
                    "--model", "exponential", "--out", out)  # fmt: skip
    assert result.exit_code == 0, result.output
    table = np.genfromtxt(out, delimiter=",", names=True)
    assert table["a"] == pytest.approx([80, 160, 240], rel=1e-6)
    assert table["k"] == pytest.approx([0.4] * 3, rel=1e-6)


def test_fit_many_tsv_with_delimiter_option(tmp_path):
    rows = [(g, t, c) for g in (0, 1) for t, c in decay_rows()]
    path = write(tmp_path / "curves.data.txt", rows, ["pixel", "t", "signal"], sep="|")
    out = tmp_path / "params.csv"
    result = invoke("fit-many", path, "--group", "pixel", "--x", "t", "--y", "signal",
                    "--model", "exponential", "--out", out, "--delimiter", "|")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert out.exists()


def test_library_reader_takes_the_same_options(tmp_path):
    path = write(tmp_path / "decay.txt", decay_rows(), sep="\t")
    got = read_table(path, ["c0", "c1"], TableOptions(delimiter="tab", header=False))
    np.testing.assert_allclose(got["c1"], COUNTS, rtol=1e-11)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("tab", "\t"), ("\\t", "\t"), ("\t", "\t"), (",", ","), ("comma", ","), (";", ";"),
     ("whitespace", WHITESPACE), (" ", WHITESPACE), ("|", "|"), ("TAB", "\t")],
)  # fmt: skip
def test_parse_delimiter_spellings(text, expected):
    assert parse_delimiter(text) == expected


def test_parse_delimiter_refuses_letters_and_digits():
    for text in ("a", "7", "tabs", "."):
        with pytest.raises(OptionError, match="--delimiter must be one character"):
            parse_delimiter(text)


# ---------------------------------------------------------------------------- usage errors


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["fit", "data.csv", "--modle", "linear"],
         "error: no such option --modle (did you mean --model?); see gradfit fit --help"),
        (["fit", "data.csv"], "error: missing option --model; see gradfit fit --help"),
        (["fit", "--model", "linear"], "error: missing argument DATA; see gradfit fit --help"),
        (["fit", "data.csv", "--model", "linear", "--epochs", "many"],
         "error: invalid value for --epochs: "),
        (["fit", "data.csv", "--model", "linear", "--checkpoint-every", "0"],
         "error: invalid value for --checkpoint-every: "),
        (["fit", "data.csv", "--model"],
         "error: option '--model' requires an argument; see gradfit fit --help"),
        (["fit", "data.csv", "more.csv", "--model", "linear"],
         "error: got unexpected extra argument"),
        (["fitt", "data.csv"], "error: no such command 'fitt' (did you mean 'fit'?); "
                               "see gradfit --help"),
        (["fit-many", "data.csv", "--model", "linear", "--out", "o.csv", "--chunk-size", "0"],
         "error: invalid value for --chunk-size: "),
        (["fit-many", "data.csv", "--model", "linear"],
         "error: missing option --out; see gradfit fit-many --help"),
        (["models", "--jsn"], "error: no such option --jsn (did you mean --json?)"),
    ],
)  # fmt: skip
def test_usage_errors_are_one_line_and_exit_2(tmp_path, monkeypatch, args, expected):
    monkeypatch.chdir(tmp_path)
    line = one_error_line(invoke(*args))
    assert line.startswith(expected), line
    assert line.endswith(" --help")
    assert list(tmp_path.iterdir()) == []


def test_help_is_unchanged_and_exits_0():
    result = invoke("fit", "--help")
    assert result.exit_code == 0 and result.stderr == ""
    for text in ("Usage: gradfit fit", "--delimiter", "--no-header", "c0, c1", "[default: x]"):
        assert text in result.stdout
    result = invoke()  # bare `gradfit`: the help, as before
    assert "Usage: gradfit" in result.output and "fit-many" in result.output


def test_the_console_entry_point_prints_one_line():
    result = subprocess.run(
        [sys.executable, "-m", "gradfit.cli", "fit", "data.csv", "--modle", "x"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2 and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: no such option --modle (did you mean --model?); see ")
