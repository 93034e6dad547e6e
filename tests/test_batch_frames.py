"""``BatchResult.to_pandas()`` and ``BatchResult.to_xarray()``: the same numbers, keyed."""

import sys

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import gradfit as gf
from gradfit.cli.app import app
from gradfit.results.batch_result import BatchResult

pd = pytest.importorskip("pandas")

STATS = ("loss", "reduced_chi2", "r2", "n_points", "n_iter")


def _batch():
    x = torch.linspace(0, 1, 20, dtype=torch.float64)
    slopes = torch.tensor([1.0, 2.0, -1.0, 0.5], dtype=torch.float64)
    Y = slopes[:, None] * x + 0.3 + 0.01 * torch.sin(17 * x * (1 + slopes[:, None]))
    Y[3] = float("nan")  # no data: another status, NaN stderr, a warning
    return gf.fit_batch("a*x + b", x, Y, fixed={"b": 0.3})


@pytest.fixture(scope="module")
def fit_many_output(tmp_path_factory):
    """A fit-many Parquet with string group keys, loaded back."""
    folder = tmp_path_factory.mktemp("many")
    rng = np.random.default_rng(0)
    lines = ["pixel,x,y"]
    for g, name in enumerate(["px_b", "px_a", "px_c"]):  # keys kept in first-seen order
        for t in np.linspace(0, 1, 15):
            y = (g + 1) * t + 0.2 + rng.normal(0, 0.01)
            lines.append(f"{name},{float(t)!r},{float(y)!r}")
    table = folder / "long.csv"
    table.write_text("\n".join(lines) + "\n")
    out = folder / "params.parquet"
    outcome = CliRunner().invoke(
        app, ["fit-many", str(table), "--group", "pixel", "--model", "linear", "--out", str(out)]
    )
    assert outcome.exit_code == 0, outcome.output
    return BatchResult.load(out)


def _assert_same_numbers(get, result):
    """``get(column)`` (a NumPy array) equals the result's tensors exactly, NaN for NaN."""
    for j, name in enumerate(result.param_names):
        np.testing.assert_array_equal(get(name), result.params[:, j].numpy())
        np.testing.assert_array_equal(get(f"{name}_stderr"), result.stderr[:, j].numpy())
    for name in STATS:
        np.testing.assert_array_equal(get(name), getattr(result, name).numpy())
    assert list(get("status")) == result.status_names
    assert list(get("warnings")) == list(result.warning_texts())


def test_to_pandas_fit_many_keys(fit_many_output):
    result = fit_many_output
    frame = result.to_pandas()
    assert frame.index.name == "pixel" and list(frame.index) == ["px_b", "px_a", "px_c"]
    assert list(result.keys) == list(frame.index)
    names = result.param_names
    assert list(frame.columns) == [
        *names, *(f"{n}_stderr" for n in names), *STATS[:3], "n_points", "n_iter", "status",
        "warnings",
    ]  # fmt: skip
    _assert_same_numbers(lambda c: frame[c].to_numpy(), result)
    assert frame.loc["px_c", names[0]] == result.params[2, 0].item()


def test_to_pandas_keys_set_by_hand_and_no_keys():
    result = _batch()
    plain = result.to_pandas()
    assert plain.index.name == "curve" and list(plain.index) == [0, 1, 2, 3]
    _assert_same_numbers(lambda c: plain[c].to_numpy(), result)
    assert plain["status"].iloc[3] == "no_data" and plain["warnings"].iloc[3]
    result.keys, result.key_name = np.array([10, 20, 30, 40]), "pixel"
    keyed = result.to_pandas()
    assert keyed.index.name == "pixel" and list(keyed.index) == [10, 20, 30, 40]
    assert "pixel" not in keyed.columns
    _assert_same_numbers(lambda c: keyed[c].to_numpy(), result)


def test_to_xarray_fit_many_keys(fit_many_output):
    pytest.importorskip("xarray")
    result = fit_many_output
    ds = result.to_xarray()
    assert list(ds.dims) == ["pixel"] and list(ds["pixel"].values) == ["px_b", "px_a", "px_c"]
    _assert_same_numbers(lambda c: ds[c].values, result)
    assert ds.attrs["optimizer"] == result.optimizer and ds.attrs["loss_name"] == "mse"
    assert float(ds["a"].sel(pixel="px_c")) == result.params[2, 0].item()
    frame = ds.to_dataframe()  # the same table as to_pandas()
    pd.testing.assert_frame_equal(
        frame, result.to_pandas(), check_dtype=False, check_index_type=False
    )


def test_to_xarray_without_keys():
    pytest.importorskip("xarray")
    result = _batch()
    ds = result.to_xarray()
    assert list(ds.dims) == ["curve"] and list(ds["curve"].values) == [0, 1, 2, 3]
    assert set(ds.data_vars) == set(result.columns())
    _assert_same_numbers(lambda c: ds[c].values, result)
    assert ds.attrs["fixed"] == "b"


@pytest.mark.parametrize(("method", "module"), [("to_pandas", "pandas"), ("to_xarray", "xarray")])
def test_missing_library_names_the_extra(monkeypatch, method, module):
    monkeypatch.setitem(sys.modules, module, None)  # import raises ImportError
    with pytest.raises(ImportError, match=rf"pip install gradfit\[{module}\]"):
        getattr(_batch(), method)()
