"""Shared parameters at scale: ``fit_shared``, ``fit_global``'s block path and
``gradfit fit-many --shared``, against SciPy on hand-written stacked residuals."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
import pytest
import torch
from numpy.typing import NDArray
from scipy.optimize import least_squares
from typer.testing import CliRunner

import gradfit as gf
from gradfit.cli.app import app
from gradfit.errors import OptionError

Array = NDArray[np.float64]
MODEL = "a*exp(-k*x) + c"


def _decays(seed: int, K: int = 5, N: int = 30) -> tuple[Array, Array, Array]:
    """K decays sharing k = 0.8, uneven lengths (NaN padding), per-point sigma."""
    rng = np.random.default_rng(seed)
    x = np.tile(np.linspace(0.0, 6.0, N), (K, 1)) + rng.uniform(0, 0.2, (K, 1))
    a, c = rng.uniform(1.0, 6.0, K), rng.uniform(-1.0, 1.0, K)
    sigma = rng.uniform(0.02, 0.1, (K, N))
    y = a[:, None] * np.exp(-0.8 * x) + c[:, None] + rng.normal(0, 1, (K, N)) * sigma
    lengths = rng.integers(N // 2, N + 1, K)
    y[np.arange(N)[None, :] >= lengths[:, None]] = np.nan
    return x, y, sigma


def _scipy(
    x: Array, y: Array, sigma: Array | None, start: Array, c_fixed: float | None = None
) -> tuple[Array, Array]:
    """SciPy on the stacked residuals; params (a_0..a_K-1, k, c_0..c_K-1) or without the c's
    when c is fixed. stderr = sqrt(diag(inv(JᵀJ)) · χ²ᵣ) from the J at SciPy's solution."""
    K = x.shape[0]

    def parts(p: Array) -> tuple[Array, Array]:
        res, jac = [], []
        k = p[K]
        for i in range(K):
            m = np.isfinite(y[i])
            xi, yi = x[i][m], y[i][m]
            si = sigma[i][m] if sigma is not None else np.ones_like(xi)
            c = c_fixed if c_fixed is not None else p[K + 1 + i]
            e = np.exp(-k * xi)
            res.append((p[i] * e + c - yi) / si)
            J = np.zeros((len(xi), len(p)))
            J[:, i], J[:, K] = e / si, -p[i] * xi * e / si
            if c_fixed is None:
                J[:, K + 1 + i] = 1 / si
            jac.append(J)
        return np.concatenate(res), np.vstack(jac)

    ref = least_squares(
        lambda p: parts(p)[0], start, jac=lambda p: parts(p)[1], method="lm",
        xtol=1e-15, ftol=1e-15, gtol=1e-15,
    )  # fmt: skip
    J = parts(ref.x)[1]
    s2 = float(ref.fun @ ref.fun) / (len(ref.fun) - len(ref.x))
    return ref.x, np.sqrt(np.diag(np.linalg.inv(J.T @ J)) * s2)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("c_fixed", [None, 0.25])
def test_fit_shared_matches_scipy(seed: int, c_fixed: float | None) -> None:
    x, y, sigma = _decays(seed)
    K = x.shape[0]
    fixed = None if c_fixed is None else {"c": c_fixed}
    rows, common = gf.fit_shared(
        MODEL, x, y, sigma=sigma, shared=["k"], p0={"a": 2.0, "k": 0.5, "c": 0.0}, fixed=fixed
    )
    start = np.r_[np.full(K, 2.0), 0.5, [] if c_fixed is not None else np.zeros(K)]
    ref, ref_sd = _scipy(x, y, sigma, start, c_fixed)
    assert common.converged and rows.status_names == ["converged"] * K
    got = np.r_[rows.params[:, 0].numpy(), common.values["k"]]
    sd = np.r_[rows.stderr[:, 0].numpy(), common.stderr["k"]]
    if c_fixed is None:
        got, sd = np.r_[got, rows.params[:, 2].numpy()], np.r_[sd, rows.stderr[:, 2].numpy()]
    else:
        assert (rows.params[:, 2] == c_fixed).all() and rows.stderr[:, 2].isnan().all()
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(sd, ref_sd, rtol=1e-3)
    # the shared column repeats the shared value and its error in every row
    assert (rows.params[:, 1] == common.values["k"]).all()
    assert (rows.stderr[:, 1] == common.stderr["k"]).all()
    assert common.n_points == int(np.isfinite(y).sum())
    # each group's own goodness of fit, at SciPy's solution
    k = ref[K]
    for i in range(K):
        m = np.isfinite(y[i])
        c = c_fixed if c_fixed is not None else ref[K + 1 + i]
        fitted = ref[i] * np.exp(-k * x[i][m]) + c
        chi2 = float((((fitted - y[i][m]) / sigma[i][m]) ** 2).sum())
        n_local = 1 if c_fixed is not None else 2
        assert float(rows.reduced_chi2[i]) == pytest.approx(chi2 / (m.sum() - n_local), rel=1e-6)
        ss_tot = float(((y[i][m] - y[i][m].mean()) ** 2).sum())
        r2 = 1 - float(((fitted - y[i][m]) ** 2).sum()) / ss_tot
        assert float(rows.r2[i]) == pytest.approx(r2, rel=1e-6)
        assert int(rows.n_points[i]) == m.sum()


def test_every_parameter_shared_is_one_fit_of_the_pooled_data() -> None:
    x, y, _ = _decays(9, K=3)
    m = np.isfinite(y)
    rows, common = gf.fit_shared(MODEL, x, y, shared=["a", "k", "c"], p0=[2.0, 0.5, 0.0])
    xs, ys = x[m], y[m]
    ref = least_squares(
        lambda p: p[0] * np.exp(-p[1] * xs) + p[2] - ys, [2.0, 0.5, 0.0], method="lm",
        xtol=1e-15, ftol=1e-15, gtol=1e-15,
    )  # fmt: skip
    assert common.converged
    got = [common.values[n] for n in ("a", "k", "c")]
    np.testing.assert_allclose(got, ref.x, rtol=1e-6)
    J = ref.jac
    sd = np.sqrt(np.diag(np.linalg.inv(J.T @ J)) * (ref.fun @ ref.fun) / (len(ys) - 3))
    np.testing.assert_allclose([common.stderr[n] for n in ("a", "k", "c")], sd, rtol=1e-3)
    assert (rows.params == rows.params[0]).all()


def test_interior_bounds_give_the_unbounded_answer() -> None:
    x, y, sigma = _decays(7)
    p0 = {"a": 2.0, "k": 0.5, "c": 0.0}
    free, _ = gf.fit_shared(MODEL, x, y, sigma=sigma, shared="k", p0=p0)
    bounded, common = gf.fit_shared(
        MODEL, x, y, sigma=sigma, shared="k", p0=p0, bounds={"k": (0.1, 3.0), "a": (0, None)}
    )
    assert common.converged
    np.testing.assert_allclose(bounded.params.numpy(), free.params.numpy(), rtol=1e-6)
    np.testing.assert_allclose(bounded.stderr.numpy(), free.stderr.numpy(), rtol=1e-6)


def test_a_group_with_too_few_points_is_left_out() -> None:
    x, y, _ = _decays(8)
    y[2, 2:] = np.nan  # 2 points for 2 local parameters: still fitted
    y[3, 1:] = np.nan  # 1 point: not fitted
    y[4, :] = np.nan  # none
    rows, common = gf.fit_shared(MODEL, x, y, shared="k", p0={"a": 2, "k": 0.5, "c": 0})
    assert rows.status_names[2:] == ["converged", "too_few_points", "no_data"]
    assert rows.params[3:].isnan().all() and rows.stderr[3:].isnan().all()
    assert common.n_groups == 3
    ref, _ = _scipy(x[:3], y[:3], None, np.r_[np.full(3, 2.0), 0.5, np.zeros(3)])
    np.testing.assert_allclose(common.values["k"], ref[3], rtol=1e-6)


def test_refusals_are_option_errors() -> None:
    x, y, _ = _decays(0)
    with pytest.raises(OptionError, match=r"unknown shared parameter 'kk'"):
        gf.fit_shared(MODEL, x, y, shared="kk")
    with pytest.raises(OptionError, match=r"plain least squares.*'huber'"):
        gf.fit_shared(MODEL, x, y, shared="k", loss="huber")
    with pytest.raises(OptionError, match=r"not 'adam'"):
        gf.fit_shared(MODEL, x, y, shared="k", optimizer="adam")


def test_fit_global_block_path_equals_the_dense_path() -> None:
    """An expression model takes the block solver; the same model as a Python function the
    dense one: the same parameters, errors, full covariance and statistics."""
    x, y, sigma = _decays(4, K=3, N=20)
    datasets: list[Any] = [
        (x[i][np.isfinite(y[i])], y[i][np.isfinite(y[i])], sigma[i][np.isfinite(y[i])])
        for i in range(3)
    ]

    def decay(x: torch.Tensor, a: torch.Tensor, k: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return a * torch.exp(-k * x) + c

    p0 = {"a": 2.0, "k": 0.5, "c": 0.0}
    blocks = gf.fit_global(MODEL, datasets, shared=["k"], p0=p0, bounds={"k": (0, 5)})
    dense = gf.fit_global(decay, datasets, shared=["k"], p0=p0, bounds={"k": (0, 5)})
    assert blocks.converged and blocks.warnings == []
    assert blocks.model.formula.endswith("(shared: k)")
    assert list(blocks.params) == list(dense.params)
    for name, value in dense.params.items():
        assert blocks.params[name] == pytest.approx(value, rel=1e-6, abs=1e-9)
    np.testing.assert_allclose(blocks.covariance.numpy(), dense.covariance.numpy(), rtol=1e-4)
    assert blocks.dof == dense.dof and blocks.chi2 == pytest.approx(dense.chi2, rel=1e-9)
    assert blocks.loss == pytest.approx(dense.loss, rel=1e-9)
    assert blocks.r2 == pytest.approx(dense.r2, rel=1e-9)


def _csv(tmp_path: Path) -> tuple[Path, Array, Array]:
    x, y, _ = _decays(11, K=4, N=20)
    rows: dict[str, list[Any]] = {"well": [], "t": [], "signal": []}
    for i in range(4):
        m = np.isfinite(y[i])
        rows["well"] += [f"w{i}"] * int(m.sum())
        rows["t"] += x[i][m].tolist()
        rows["signal"] += y[i][m].tolist()
    path = tmp_path / "long.csv"
    pa_csv.write_csv(pa.table(rows), path)
    return path, x, y


def test_cli_shared_matches_scipy_and_loads_back(tmp_path: Path) -> None:
    data, x, y = _csv(tmp_path)
    out = tmp_path / "fits.parquet"
    args = [str(data), "--model", "a*exp(-k*t) + c", "--group", "well", "--x", "t", "--y",
            "signal", "--shared", "k", "--p0", "a=2,k=0.5,c=0", "--out", str(out)]  # fmt: skip
    ran = CliRunner().invoke(app, ["fit-many", *args])
    assert ran.exit_code == 0, ran.output
    assert "shared k = " in ran.output
    result = gf.BatchResult.load(out)
    assert result.keys.tolist() == ["w0", "w1", "w2", "w3"]
    assert result.param_names == ("a", "k", "c")
    ref, ref_sd = _scipy(x, y, None, np.r_[np.full(4, 2.0), 0.5, np.zeros(4)])
    got = np.r_[result.params[:, 0].numpy(), result.params[0, 1], result.params[:, 2].numpy()]
    sd = np.r_[result.stderr[:, 0].numpy(), result.stderr[0, 1], result.stderr[:, 2].numpy()]
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(sd, ref_sd, rtol=1e-3)
    assert len(set(result.params[:, 1].tolist())) == 1


def test_cli_shared_reads_a_parquet_folder_as_fit_many_does(tmp_path: Path) -> None:
    """The CSV's rows, in order, as a Parquet folder of two files of small row groups: group
    w1 is split across the files (and w2 across row groups); the same fit, to the bit."""
    data, _, _ = _csv(tmp_path)
    table = pa_csv.read_csv(data)
    wells = table.column("well").to_pylist()
    cut = wells.index("w1") + 3  # inside w1
    folder = tmp_path / "parts"
    folder.mkdir()
    pq.write_table(table.slice(0, cut), folder / "a.parquet", row_group_size=7)
    pq.write_table(table.slice(cut), folder / "b.parquet", row_group_size=7)
    assert "w1" in pq.read_table(folder / "a.parquet").column("well").to_pylist()
    assert "w1" in pq.read_table(folder / "b.parquet").column("well").to_pylist()
    results = []
    for source, out in ((data, "csv.parquet"), (folder, "folder.parquet")):
        args = [str(source), "--model", "a*exp(-k*t) + c", "--group", "well", "--x", "t",
                "--y", "signal", "--shared", "k", "--p0", "a=2,k=0.5,c=0",
                "--out", str(tmp_path / out)]  # fmt: skip
        ran = CliRunner().invoke(app, ["fit-many", *args])
        assert ran.exit_code == 0, ran.output
        results.append(gf.BatchResult.load(tmp_path / out))
    from_csv, from_folder = results
    assert from_folder.keys.tolist() == from_csv.keys.tolist() == ["w0", "w1", "w2", "w3"]
    assert from_folder.status_names == from_csv.status_names == ["converged"] * 4
    assert (from_folder.n_points == from_csv.n_points).all()
    for name in ("params", "stderr", "reduced_chi2", "r2"):
        np.testing.assert_array_equal(
            getattr(from_folder, name).numpy(), getattr(from_csv, name).numpy(), err_msg=name
        )


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--shared", "kk"], "error: --shared: unknown parameter 'kk'; the model's parameters"),
        (["--shared", "k", "--resume"], "error: --resume does not apply to --shared"),
        (["--shared", "k", "--loss", "huber"], "error: fit_shared minimises plain least squares"),
    ],
)
def test_cli_shared_refusals_are_one_line(tmp_path: Path, extra: list[str], message: str) -> None:
    data, _, _ = _csv(tmp_path)
    out = tmp_path / "fits.csv"
    args = [str(data), "--model", "a*exp(-k*t)+c", "--group", "well", "--x", "t", "--y",
            "signal", "--out", str(out), *extra]  # fmt: skip
    ran = CliRunner().invoke(app, ["fit-many", *args])
    assert ran.exit_code == 2
    lines = ran.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message), ran.output
    assert not out.exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fit_shared_on_a_gpu_matches_the_cpu() -> None:
    x, y, sigma = _decays(12)
    p0 = {"a": 2.0, "k": 0.5, "c": 0.0}
    cpu, _ = gf.fit_shared(MODEL, x, y, sigma=sigma, shared="k", p0=p0)
    gpu, common_gpu = gf.fit_shared(MODEL, x, y, sigma=sigma, shared="k", p0=p0, device="cuda")
    assert common_gpu.converged
    np.testing.assert_allclose(gpu.params.cpu().numpy(), cpu.params.numpy(), rtol=1e-6)
    np.testing.assert_allclose(gpu.stderr.cpu().numpy(), cpu.stderr.numpy(), rtol=1e-6)


def _both_paths(monkeypatch: pytest.MonkeyPatch, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
    """``fit_shared`` with the compiled blocks (checked to be taken) and with PyTorch's rows
    (``GRADFIT_COMPILED=0``)."""
    from gradfit.optim import shared_lm

    taken: list[bool] = []
    original = shared_lm._compiled_evaluator

    def spy(*a: Any, **k: Any) -> Any:
        found = original(*a, **k)
        taken.append(found is not None)
        return found

    monkeypatch.setattr(shared_lm, "_compiled_evaluator", spy)
    compiled = gf.fit_shared(*args, **kwargs)
    assert taken and all(taken)
    monkeypatch.setenv("GRADFIT_COMPILED", "0")
    taken.clear()
    torch_path = gf.fit_shared(*args, **kwargs)
    assert taken and not any(taken)
    return compiled, torch_path


def _assert_same(got: Any, want: Any) -> None:
    (rows, common), (ref_rows, ref_common) = got, want
    for name in ("params", "stderr", "reduced_chi2", "r2", "loss"):
        np.testing.assert_allclose(
            getattr(rows, name).numpy(), getattr(ref_rows, name).numpy(), rtol=1e-10,
            atol=1e-13, err_msg=name,
        )  # fmt: skip
    assert rows.status_names == ref_rows.status_names
    assert (rows.n_iter == ref_rows.n_iter).all() and common.status == ref_common.status
    for name, value in ref_common.values.items():
        assert common.values[name] == pytest.approx(value, rel=1e-10)
        sd = ref_common.stderr[name]
        assert common.stderr[name] == (None if sd is None else pytest.approx(sd, rel=1e-10))
    assert common.chi2 == pytest.approx(ref_common.chi2, rel=1e-10)


@pytest.mark.parametrize("seed", [0, 1])
def test_compiled_blocks_give_the_torch_answer(monkeypatch: pytest.MonkeyPatch, seed: int) -> None:
    """Bounds (one- and two-sided), sigma, NaN padding and uneven lengths, a group too short
    to fit: the compiled evaluator and PyTorch's rows agree to rounding."""
    x, y, sigma = _decays(seed, K=6)
    y[4, 1:] = np.nan  # one point for two local parameters: left out
    bounds = {"a": (0.0, None), "k": (0.05, 3.0), "c": (None, 2.0)}
    got = _both_paths(
        monkeypatch, MODEL, x, y, sigma=sigma, shared="k", p0={"a": 2.0, "k": 0.5, "c": 0.0},
        bounds=bounds,
    )  # fmt: skip
    assert got[1][1].converged and got[1][0].status_names[4] == "too_few_points"
    _assert_same(*got)


def test_compiled_blocks_with_a_fixed_parameter_and_a_common_x(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    x, y, _ = _decays(5, K=4)
    y = np.nan_to_num(y, nan=0.1)  # every point valid, one x for all groups
    got = _both_paths(
        monkeypatch, "a*exp(-k*x) + c*x", x[0], y, shared=["k"], fixed={"c": 0.0},
        p0={"a": 2.0, "k": 0.5, "c": 0.0},
    )  # fmt: skip
    assert got[1][1].converged
    _assert_same(*got)


def test_compiled_blocks_with_two_shared_parameters(monkeypatch: pytest.MonkeyPatch) -> None:
    x, y, sigma = _decays(6, K=5)
    got = _both_paths(
        monkeypatch, MODEL, x, y, sigma=sigma, shared=["k", "c"], p0={"a": 2.0, "k": 0.5, "c": 0}
    )
    _assert_same(*got)


def test_compiled_blocks_over_chunks_side_by_side(monkeypatch: pytest.MonkeyPatch) -> None:
    """More groups than one chunk holds (2048): chunks in threads on either path."""
    rng = np.random.default_rng(13)
    K, N = 2100, 8
    x = np.linspace(0.0, 4.0, N)
    a = rng.uniform(1.0, 3.0, (K, 1))
    y = a * np.exp(-0.6 * x) + rng.normal(0, 0.02, (K, N))
    y[::7, -2:] = np.nan  # uneven lengths in some groups
    got = _both_paths(monkeypatch, "a*exp(-k*x)", x, y, shared="k", p0={"a": 2.0, "k": 1.0})
    assert got[0][1].converged and got[0][1].values["k"] == pytest.approx(0.6, rel=1e-2)
    _assert_same(*got)
