"""`gradfit fit-many` end to end: long-form CSV/Parquet and wide .npz, keys, statuses, resume."""

import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

import gradfit as gf
from gradfit.batch.many import run_fit_many
from gradfit.cli.app import app

runner = CliRunner()


def long_table(keys):
    """Decays of unequal length per key; the last key has 2 points (too few for 3 params)."""
    rng = np.random.default_rng(0)
    rows = {"key": [], "t": [], "counts": []}
    for i, key in enumerate(keys):
        n = 2 if i == len(keys) - 1 else int(rng.integers(8, 40))
        t = np.sort(rng.uniform(0, 6, n))
        y = (3 + i) * np.exp(-0.5 * t) + 1 + rng.normal(0, 0.01, n)
        rows["key"] += [key] * n
        rows["t"] += t.tolist()
        rows["counts"] += y.tolist()
    return pa.table(rows)


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.mark.parametrize("keys", [[10, 3, 7, 42, 5], ["well-A1", "well-B2", "x", "é", "zz"]])
@pytest.mark.parametrize("fmt", ["parquet", "csv"])
def test_one_row_per_group_with_keys_preserved(tmp_path, keys, fmt):
    table = long_table(keys)
    data = tmp_path / f"long.{fmt}"
    if fmt == "parquet":
        pq.write_table(table, data)
    else:
        pa_csv.write_csv(table, data)
    out = tmp_path / "params.parquet"
    result = invoke(
        "fit-many",
        data,
        "--group",
        "key",
        "--x",
        "t",
        "--y",
        "counts",
        "--model",
        "a*exp(-k*t) + c",
        "--p0",
        "a=1,k=1,c=0",
        "--out",
        out,
    )
    assert result.exit_code == 0, result.output
    rows = pq.read_table(out).to_pylist()
    assert [r["key"] for r in rows] == keys
    assert [r["status"] for r in rows][-1] == "too_few_points"
    assert all(r["status"].startswith("converged") for r in rows[:-1])
    for i, row in enumerate(rows[:-1]):
        assert row["a"] == pytest.approx(3 + i, rel=0.02)
        assert row["k"] == pytest.approx(0.5, rel=0.02)
        assert row["a_stderr"] > 0
    assert "too_few_points 1" in result.output
    assert not (tmp_path / "params.parquet.parts").exists()


def test_wide_npz_input_and_csv_output(tmp_path):
    x = np.linspace(-3, 3, 50)
    y = np.stack([2 * np.exp(-((x - c) ** 2) / 2) + 0.1 for c in (-1.0, 0.0, 1.0)])
    data = tmp_path / "wide.npz"
    np.savez(data, x=x, y=y)
    out = tmp_path / "out.csv"
    result = invoke("fit-many", data, "--model", "gaussian", "--out", out, "--dtype", "float32")
    assert result.exit_code == 0, result.output
    rows = pa_csv.read_csv(out).to_pylist()
    assert [r["center"] for r in rows] == pytest.approx([-1, 0, 1], abs=1e-4)


def test_nan_policy_and_existing_output(tmp_path):
    table = long_table([1, 2, 3])
    counts = table.column("counts").to_numpy().copy()
    counts[4] = np.nan
    table = table.set_column(2, "counts", pa.array(counts))
    data = tmp_path / "long.parquet"
    pq.write_table(table, data)
    out = tmp_path / "p.parquet"
    args = [
        "fit-many",
        data,
        "--group",
        "key",
        "--x",
        "t",
        "--y",
        "counts",
        "--model",
        "a*exp(-k*t)+c",
        "--out",
        out,
    ]
    bad = invoke(*args)
    assert bad.exit_code == 2 and "row 4" in bad.stderr and not out.exists()
    good = invoke(*args, "--nan-policy", "omit")
    assert good.exit_code == 0, good.output
    again = invoke(*args, "--nan-policy", "omit")
    assert again.exit_code == 2 and "--overwrite" in again.stderr


def test_an_interrupted_run_resumes_and_skips_finished_chunks(tmp_path):
    keys = list(range(30))
    data = tmp_path / "long.parquet"
    pq.write_table(long_table(keys), data)
    model = gf.Model("a*exp(-k*t) + c", independent="t")
    common = dict(
        model=model,
        group="key",
        x="t",
        y="counts",
        sigma=None,
        chunk_size=4,
        p0={"a": 1, "k": 1, "c": 0},
    )
    reference = run_fit_many(data, out=tmp_path / "ref.parquet", **common)

    def stop_after_two_chunks():
        return len(list((tmp_path / "run.parquet.parts").glob("part-*"))) >= 2

    out = tmp_path / "run.parquet"
    assert run_fit_many(data, out=out, stop=stop_after_two_chunks, **common) is None
    assert not out.exists()
    assert len(list((tmp_path / "run.parquet.parts").glob("part-*"))) == 2
    resumed = run_fit_many(data, out=out, resume=True, **common)
    got, expected = pq.read_table(out), pq.read_table(tmp_path / "ref.parquet")
    assert got.column_names == expected.column_names
    for name in got.column_names:  # NaN-aware: the too-few-points row has NaN errors
        np.testing.assert_array_equal(got.column(name).to_numpy(), expected.column(name).to_numpy())
    assert len(resumed) == len(reference) == 30


def test_first_order_optimizers_from_the_command_line(tmp_path):
    data = tmp_path / "long.parquet"
    pq.write_table(long_table([1, 2, 3, 4]), data)
    out = tmp_path / "params.csv"
    args = ["--group", "key", "--x", "t", "--y", "counts", "--model", "a*exp(-k*t) + c"]
    options = ["--p0", "a=3,k=1,c=1", "--optimizer", "adam", "--lr", "0.05", "--epochs", "300"]
    result = invoke("fit-many", data, *args, *options, "--loss", "mae", "--out", out)
    assert result.exit_code == 0, result.output
    rows = pa_csv.read_csv(out).to_pylist()
    assert [r["status"] for r in rows] == ["max_iter"] * 3 + ["too_few_points"]
    assert all(r["n_iter"] == 300 for r in rows[:-1])
    assert "quantiles over converged or max_iter curves" in result.output
    refused = invoke("fit-many", data, *args, "--optimizer", "lbfgs", "--out", tmp_path / "x.csv")
    assert refused.exit_code == 2 and "does not batch lbfgs" in refused.output


def test_a_model_refused_by_fit_batch_leaves_no_parts_folder(tmp_path):
    data = tmp_path / "long.parquet"
    pq.write_table(long_table([1, 2, 3]), data)
    out = tmp_path / "p.parquet"
    args = ["fit-many", data, "--group", "key", "--x", "t", "--y", "counts", "--out", out]
    result = invoke(*args, "--model", "a*exp(-k*x)+c")  # written in x, the data's x is t
    assert result.exit_code == 2
    assert "does not use the independent variable 't'" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["long.parquet"]
