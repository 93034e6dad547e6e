"""fit-many's streamed input (local engine): folders of Parquet files, globs, hive partitions,
groups split across files and row groups, folder outputs, in-memory tables, bad inputs.

The reference is a hand-written loop: the rows of every file concatenated in path order,
grouped with a dict in first-seen order, each group fitted whole by ``fit_batch``.
"""

from __future__ import annotations

import itertools
import json

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

import gradfit as gf
from gradfit.batch.many import run_fit_many
from gradfit.batch.plan import build_index, plan_tasks, scan_unit
from gradfit.batch.sources import Spec, find_units
from gradfit.cli.app import app

runner = CliRunner()
PARAMS = ["amplitude", "center", "width", "offset"]


def gaussian_rows(n_groups, seed=0, prefix="g"):
    """Long-form Gaussian curves of 12-30 points each, keys ``g000``..."""
    rng = np.random.default_rng(seed)
    keys, xs, ys = [], [], []
    for i in range(n_groups):
        n = int(rng.integers(12, 30))
        x = np.sort(rng.uniform(-3, 3, n))
        center, amplitude = rng.uniform(-1, 1), rng.uniform(1, 3)
        y = amplitude * np.exp(-((x - center) ** 2) / 2) + 0.1 + rng.normal(0, 0.01, n)
        keys += [f"{prefix}{i:03d}"] * n
        xs += x.tolist()
        ys += y.tolist()
    return pa.table({"key": keys, "x": xs, "y": ys})


def split_dataset(folder, table, cuts, row_group_size=37):
    """``table`` cut at row ``cuts`` into files part-0, part-1, ... with small row groups:
    groups straddle both files and row groups."""
    folder.mkdir()
    bounds = [0, *cuts, table.num_rows]
    for i, (lo, hi) in enumerate(itertools.pairwise(bounds)):
        pq.write_table(table.slice(lo, hi - lo), folder / f"part-{i}.parquet",
                       row_group_size=row_group_size)  # fmt: skip
    return folder


def reference(table):
    """Every group (first-seen order) fitted whole: a plain dict loop, then fit_batch."""
    groups: dict[str, list[tuple[float, float]]] = {}
    for key, x, y in zip(*(table.column(c).to_pylist() for c in ("key", "x", "y")), strict=True):
        groups.setdefault(key, []).append((x, y))
    width = max(len(rows) for rows in groups.values())
    X = np.full((len(groups), width), np.nan)
    Y = np.full((len(groups), width), np.nan)
    for i, rows in enumerate(groups.values()):
        X[i, : len(rows)], Y[i, : len(rows)] = np.array(rows).T
    return list(groups), gf.fit_batch("gaussian", X, Y)


def assert_matches(result, keys, expected):
    assert list(result.keys) == keys  # every group once, in first-seen order
    np.testing.assert_allclose(result.params.numpy(), expected.params.numpy(), rtol=1e-12)
    np.testing.assert_allclose(result.stderr.numpy(), expected.stderr.numpy(), rtol=1e-9)
    assert result.status_names == expected.status_names


def fit(data, out, **extra):
    return run_fit_many(data, model=gf.Model("gaussian"), group="key", x="x", y="y",
                        sigma=None, out=out, **extra)  # fmt: skip


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    """40 groups over 3 files (cut mid-group), row groups of 37 rows, and group g005 coming
    back at the end of the last file (a group that re-appears)."""
    base = gaussian_rows(40)
    keys = base.column("key").to_numpy(zero_copy_only=False)
    back = np.flatnonzero(keys == "g005")[-4:]  # its last 4 rows move to the very end
    order = np.r_[np.setdiff1d(np.arange(len(keys)), back), back]
    table = base.take(pa.array(order))
    folder = split_dataset(tmp_path_factory.mktemp("split") / "data", table, [301, 655])
    return folder, table


def test_a_split_dataset_fits_each_group_once_whole(split, tmp_path):
    folder, table = split
    result = fit(folder, tmp_path / "out.parquet", chunk_size=6)
    keys, expected = reference(table)
    assert_matches(result, keys, expected)
    written = gf.BatchResult.load(tmp_path / "out.parquet")
    assert list(written.keys) == keys and not (tmp_path / "out.parquet.parts").exists()


def test_only_the_straddling_groups_are_gathered(split):
    folder, table = split
    units = find_units(folder)
    assert len(units) > 3  # several row groups per file
    spec = Spec("key", "x", "y")
    index = build_index([scan_unit(u, spec) for u in units], "key")
    straddlers = set(index.keys[index.straddles])
    # a group straddles only where a row group or file boundary cuts it, or it comes back
    keys = table.column("key").to_numpy(zero_copy_only=False)
    cut_at = np.cumsum([u.n_rows for u in units])[:-1]
    cut = {keys[i] for i in cut_at if keys[i - 1] == keys[i]}
    assert straddlers == cut | {"g005"}
    tasks = plan_tasks(index, units, chunk_size=6)
    fitted = np.concatenate([t.keys for t in tasks])
    assert sorted(fitted) == sorted(index.keys)  # every group in exactly one task


def test_glob_and_folder_and_one_file_agree(split, tmp_path):
    folder, table = split
    one = tmp_path / "one.parquet"
    pq.write_table(table, one, row_group_size=50)
    results = [fit(data, tmp_path / f"{i}.parquet")
               for i, data in enumerate([folder, str(folder / "part-*.parquet"), one])]  # fmt: skip
    for other in results[1:]:
        assert list(other.keys) == list(results[0].keys)
        np.testing.assert_array_equal(other.params.numpy(), results[0].params.numpy())


def test_folder_output_is_a_parquet_dataset_one_row_per_group(split, tmp_path):
    folder, table = split
    out = tmp_path / "params"
    args = ["fit-many", str(folder), "--group", "key", "--model", "gaussian",
            "--chunk-size", "7", "--out", f"{out}/"]  # fmt: skip
    done = runner.invoke(app, args)
    assert done.exit_code == 0, done.output
    read = ds.dataset(out).to_table()  # the manifest (_manifest.json) is not read as data
    keys, expected = reference(table)
    assert sorted(read.column("key").to_pylist()) == sorted(keys)
    by_key = dict(zip(read.column("key").to_pylist(), read.column("center").to_pylist(),
                      strict=True))  # fmt: skip
    np.testing.assert_allclose([by_key[k] for k in keys], expected.params[:, 1].numpy(),
                               rtol=1e-12)  # fmt: skip
    assert json.loads((out / "_manifest.json").read_text())["chunk_size"] == 7
    assert not (tmp_path / "params.parts").exists()
    again = runner.invoke(app, args)
    assert again.exit_code == 2 and "folder exists; use --overwrite" in again.stderr
    assert runner.invoke(app, [*args, "--overwrite"]).exit_code == 0


def test_hive_partitions_become_columns(tmp_path):
    table = gaussian_rows(4)
    site = np.repeat(
        ["s-a", "s-b", "s-c", "s-d"],
        np.unique(table.column("key").to_numpy(zero_copy_only=False), return_counts=True)[1],
    )
    pq.write_to_dataset(table.append_column("site", pa.array(site)), tmp_path / "hive",
                        partition_cols=["site"])  # fmt: skip
    result = run_fit_many(tmp_path / "hive", model=gf.Model("gaussian"), group="site", x="x",
                          y="y", sigma=None, out=tmp_path / "o.parquet")  # fmt: skip
    _keys, expected = reference(table)
    assert list(result.keys) == ["s-a", "s-b", "s-c", "s-d"]
    np.testing.assert_allclose(result.params.numpy(), expected.params.numpy(), rtol=1e-12)


def test_a_missing_column_in_one_file_names_that_file(split, tmp_path):
    _folder, table = split
    bad = tmp_path / "bad"
    split_dataset(bad, table, [301, 655])
    pq.write_table(table.slice(655).drop_columns(["y"]), bad / "part-2.parquet")
    out = tmp_path / "o.parquet"
    result = runner.invoke(app, ["fit-many", str(bad), "--group", "key", "--model", "gaussian",
                                 "--out", str(out)])  # fmt: skip
    assert result.exit_code == 2
    assert result.stderr.strip() == (
        f"error: {bad / 'part-2.parquet'}: no column 'y'; columns are key, x"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad"]  # nothing written


def test_a_bad_value_is_named_by_its_row_in_its_file(tmp_path):
    table = gaussian_rows(6)
    y = table.column("y").to_numpy().copy()
    y[90] = np.nan
    data = tmp_path / "d.parquet"
    pq.write_table(table.set_column(2, "y", pa.array(y)), data, row_group_size=40)
    result = runner.invoke(app, ["fit-many", str(data), "--group", "key", "--model",
                                 "gaussian", "--out", str(tmp_path / "o.parquet")])  # fmt: skip
    assert result.exit_code == 2
    assert f"{data}: column 'y' has a non-finite value (nan) at row 90;" in result.stderr
    keys = table.column("key").to_pylist()
    keys[50] = None
    pq.write_table(table.set_column(0, "key", pa.array(keys)), data, row_group_size=40)
    result = runner.invoke(app, ["fit-many", str(data), "--group", "key", "--model",
                                 "gaussian", "--out", str(tmp_path / "o.parquet")])  # fmt: skip
    assert result.exit_code == 2 and f"{data}: column 'key' is empty at row 50" in result.stderr


def test_omitted_rows_across_files_and_a_group_left_without_data(tmp_path):
    table = gaussian_rows(8)
    keys = table.column("key").to_numpy(zero_copy_only=False)
    y = table.column("y").to_numpy().copy()
    y[keys == "g003"] = np.nan  # g003: no valid point left
    y[5] = np.inf
    table = table.set_column(2, "y", pa.array(y))
    folder = split_dataset(tmp_path / "d", table, [int(np.flatnonzero(keys == "g003")[3])])
    result = fit(folder, tmp_path / "o.parquet", nan_policy="omit")
    kept = table.filter(pa.array(np.isfinite(y)))
    ref_keys, expected = reference(kept)
    row = list(result.keys).index("g003")
    assert result.status_names[row] == "no_data" and int(result.n_points[row]) == 0
    others = [i for i in range(len(result)) if i != row]
    assert [result.keys[i] for i in others] == ref_keys
    np.testing.assert_allclose(result.params.numpy()[others], expected.params.numpy(),
                               rtol=1e-12)  # fmt: skip


def test_fit_many_takes_tables_and_data_frames(split):
    pytest.importorskip("pandas")
    _, table = split
    keys, expected = reference(table)
    for data in (table, table.to_pandas()):
        result = gf.fit_many(data, group="key", x="x", y="y", model="gaussian")
        assert_matches(result, keys, expected)


def test_a_stopped_folder_run_resumes_to_the_same_rows(split, tmp_path):
    folder, _ = split
    parts = tmp_path / "run.parquet.parts"
    stopped = fit(folder, tmp_path / "run.parquet", chunk_size=3,
                  stop=lambda: len(list(parts.glob("part-*"))) >= 2)  # fmt: skip
    assert stopped is None and len(list(parts.glob("part-*"))) == 2
    resumed = fit(folder, tmp_path / "run.parquet", chunk_size=3, resume=True)
    fresh = fit(folder, tmp_path / "fresh.parquet", chunk_size=3)
    assert list(resumed.keys) == list(fresh.keys)
    np.testing.assert_array_equal(resumed.params.numpy(), fresh.params.numpy())


def test_a_large_csv_is_read_in_ranges_with_rows_counted_from_its_start(split, tmp_path,
                                                                        monkeypatch):  # fmt: skip
    import pyarrow.csv as pa_csv

    from gradfit.batch import text_units

    _, table = split
    data = tmp_path / "long.csv"
    pa_csv.write_csv(table, data)
    whole = fit(data, tmp_path / "whole.parquet")
    monkeypatch.setattr(text_units, "SPLIT_BYTES", 2000)  # "large": ranges of ~2 kB
    units = find_units(data, group="key")
    assert len(units) > 5 and {u.kind for u in units} == {"text"}
    assert sum(u.n_rows for u in units) == table.num_rows
    ranged = fit(data, tmp_path / "ranged.parquet", chunk_size=5)
    keys, expected = reference(table)
    assert_matches(ranged, keys, expected)
    np.testing.assert_array_equal(ranged.params.numpy(), whole.params.numpy())
    lines = data.read_text().splitlines()
    row = table.num_rows - 7  # in the last range
    fields = lines[row + 1].split(",")
    lines[row + 1] = ",".join([*fields[:2], "seven"])
    data.write_text("\n".join(lines) + "\n")
    with pytest.raises(gf.DataError, match=rf"long.csv: column 'y': row {row} is not a number"):
        fit(data, tmp_path / "bad.parquet")


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--workers", "2"], "error: --workers, --scheduler and client= need --engine dask"),
        (["--engine", "spark"], "error: --engine must be one of local, dask, got 'spark'"),
        (["--engine", "dask", "--workers", "2", "--scheduler", "tcp://127.0.0.1:1"],
         "error: give one of --workers, --scheduler and client=, not several"),
    ],
)  # fmt: skip
def test_engine_options_are_checked_first(split, tmp_path, extra, message):
    folder, _ = split
    args = ["fit-many", str(folder), "--group", "key", "--model", "gaussian"]
    result = runner.invoke(app, [*args, "--out", str(tmp_path / "o.parquet"), *extra])
    assert result.exit_code == 2 and result.stderr.strip() == message
    assert list(tmp_path.iterdir()) == []


def test_fit_many_writes_out_and_returns_the_same_rows(split, tmp_path):
    folder, table = split
    keys, expected = reference(table)
    result = gf.fit_many(str(folder / "*.parquet"), group="key", x="x", y="y",
                         model="gaussian", out=tmp_path / "o.csv")  # fmt: skip
    assert_matches(result, keys, expected)
    written = gf.BatchResult.load(tmp_path / "o.csv")
    assert [str(k) for k in written.keys] == keys
    np.testing.assert_allclose(written.params.numpy(), result.params.numpy(), rtol=1e-12)


def test_scattered_groups_are_gathered_correctly_and_the_cost_is_said(tmp_path, capsys):
    table = gaussian_rows(30, seed=7)
    shuffled = table.take(pa.array(np.random.default_rng(1).permutation(table.num_rows)))
    folder = split_dataset(tmp_path / "d", shuffled, [200, 400], 50)
    result = fit(folder, tmp_path / "o.parquet", chunk_size=1)
    keys, _ = reference(shuffled)  # a group's rows in file order: the reference's order too
    assert_matches(result, keys, reference(shuffled)[1])
    assert "groups are spread over many row groups or files" in capsys.readouterr().err


def test_a_wrong_column_name_lists_every_column_of_the_file(split, tmp_path):
    folder, _table = split
    result = runner.invoke(app, ["fit-many", str(folder), "--group", "kee", "--model",
                                 "gaussian", "--out", str(tmp_path / "o.parquet")])  # fmt: skip
    assert result.exit_code == 2
    assert result.stderr.strip().endswith("no column 'kee'; columns are key, x, y")
