"""Mini-batch training on Parquet streamed by row groups: the batches, a reference loop, the
statistics from accumulated sums against closed forms, mid-epoch resume, the CLI."""

import json
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from typer.testing import CliRunner

import gradfit as gf
from gradfit.cli.app import app
from gradfit.errors import DataError, OptionError
from gradfit.fitting import minibatch
from gradfit.fitting.checkpoint import read_checkpoint
from gradfit.fitting.streamed import Columns, StreamedBatches, fit_streamed
from gradfit.io.streamed import ParquetRows
from gradfit.options import FitOptions

MODEL = "a*exp(-k*x) + c"


def table(path, n=1000, group=170, seed=0, nan_row=None):
    rng = np.random.default_rng(seed)
    x = rng.uniform(0, 4, n)
    y = 2.5 * np.exp(-1.3 * x) + 0.4 + 0.02 * rng.standard_normal(n)
    if nan_row is not None:
        y[nan_row] = np.nan
    pq.write_table(pa.table({"x": x, "y": y}), path, row_group_size=group)
    return x, y


def batches(path, batch_size, shuffle=True, buffer_rows=300):
    source = ParquetRows(path, ["x", "y"])
    cols = Columns(["x"], "y", None, named=False)
    return StreamedBatches(source, cols, source.units, batch_size, shuffle, False,
                           torch.float64, torch.device("cpu"), None, buffer_rows)  # fmt: skip


def test_an_epoch_visits_every_row_once_in_a_new_order_and_resumes_exactly(tmp_path):
    path = tmp_path / "d.parquet"
    _, y = table(path)
    stream = batches(path, 64)
    gen = minibatch.new_generator(3)
    epochs = []
    for _ in range(2):
        position = minibatch.EpochPosition(gen.get_state())
        epochs.append([b.rows.y for b in stream.epoch(position, gen)])
    for found in epochs:
        assert len(found) == math.ceil(1000 / 64)
        assert sorted(torch.cat(found).tolist()) == sorted(y.tolist())
        assert max(len(b) for b in found) - min(len(b) for b in found) <= 1
    assert not torch.equal(torch.cat(epochs[0]), torch.cat(epochs[1]))
    gen2 = minibatch.new_generator(3)
    again = minibatch.EpochPosition(gen2.get_state(), step=5)
    rest = [b.rows.y for b in stream.epoch(again, gen2)]  # a resumed epoch: the same batches
    assert all(torch.equal(a, b) for a, b in zip(rest, epochs[0][5:], strict=True))


def test_unshuffled_stream_equals_a_reference_loop(tmp_path):
    path = tmp_path / "d.parquet"
    x, y = table(path)
    cols = Columns(["x"], "y", None, named=False)
    options = FitOptions(optimizer="adam", lr=0.05, epochs=3, batch_size=100, shuffle=False,
                         seed=0, p0=[1.0, 1.0, 0.0])  # fmt: skip
    result = fit_streamed(gf.Model(MODEL), ParquetRows(path, ["x", "y"]), cols, options)
    theta = torch.tensor([1.0, 1.0, 0.0], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([theta], lr=0.05)
    xt, yt = torch.as_tensor(x), torch.as_tensor(y)
    history = []
    for _ in range(3):
        total = 0.0
        for idx in torch.arange(1000).tensor_split(10):  # ceil(1000 / 100) nearly equal parts
            loss = ((theta[0] * torch.exp(-theta[1] * xt[idx]) + theta[2] - yt[idx]) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        history.append(total / 1000)
    torch.testing.assert_close(result.values, theta.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(torch.tensor(result.history), torch.tensor(history), rtol=1e-12,
                               atol=0)  # fmt: skip


def test_statistics_from_sums_equal_the_closed_form(tmp_path):
    path = tmp_path / "d.parquet"
    x, y = table(path)
    cols = Columns(["x"], "y", None, named=False)
    options = FitOptions(optimizer="adam", lr=0.05, epochs=4, batch_size=50, seed=1,
                         p0=[2.0, 1.0, 0.3])  # fmt: skip
    result = fit_streamed(gf.Model(MODEL), ParquetRows(path, ["x", "y"]), cols, options)
    a, k, c = (result.params[n] for n in "akc")
    pred = a * np.exp(-k * x) + c
    r = pred - y
    J = np.stack([np.exp(-k * x), -a * x * np.exp(-k * x), np.ones_like(x)], axis=1)
    chi2 = float(r @ r)
    cov = np.linalg.inv(J.T @ J) * chi2 / (1000 - 3)
    assert result.n_points == 1000 and result.dof == 997
    assert result.chi2 == pytest.approx(chi2, rel=1e-10)
    assert result.r2 == pytest.approx(1 - chi2 / ((y - y.mean()) ** 2).sum(), rel=1e-10)
    np.testing.assert_allclose(result.covariance.numpy(), cov, rtol=1e-7)
    assert result.loss == pytest.approx(chi2 / 1000, rel=1e-10)


class Killed(RuntimeError):
    pass


def killing_mse(after):
    calls = [0]

    def mse_loss(pred, true):
        calls[0] += pred.numel() <= 64
        if calls[0] > after:
            raise Killed
        return ((pred - true) ** 2).mean()

    return mse_loss


def test_resume_mid_epoch_rereads_to_the_same_place(tmp_path):
    path, state = tmp_path / "d.parquet", tmp_path / "fit.pt"
    table(path)
    cols = Columns(["x"], "y", None, named=False)

    def run(after, **more):
        options = FitOptions(optimizer="adam", lr=0.05, epochs=3, batch_size=64, seed=4,
                             loss=killing_mse(after), p0=[1.0, 1.0, 0.0],
                             validation=0.25)  # fmt: skip
        source = ParquetRows(path, ["x", "y"])
        return fit_streamed(gf.Model(MODEL), source, cols, options, buffer_rows=200, **more)

    full = run(10**9)
    with pytest.raises(Killed):
        run(20, checkpoint=state, checkpoint_every=7)
    assert read_checkpoint(state)["extra"]["minibatch"]["steps"] == 14
    resumed = run(10**9, resume=state)
    assert resumed.values.tolist() == full.values.tolist()
    assert resumed.history == full.history
    assert resumed.validation_history == full.validation_history
    assert len(full.validation_history) == 3


def test_bad_streamed_inputs_are_named(tmp_path):
    path = tmp_path / "d.parquet"
    table(path, nan_row=444)
    cols = Columns(["x"], "y", None, named=False)
    options = FitOptions(optimizer="adam", epochs=1, batch_size=64, p0=[1.0, 1.0, 0.0])
    with pytest.raises(DataError, match=r"d.parquet: column 'y' has a non-finite value .* row 444"):
        fit_streamed(gf.Model(MODEL), ParquetRows(path, ["x", "y"]), cols, options)
    omitted = fit_streamed(gf.Model(MODEL), ParquetRows(path, ["x", "y"]), cols,
                           options.replace(nan_policy="omit"))  # fmt: skip
    assert omitted.n_omitted == 1 and omitted.n_points == 999
    with pytest.raises(DataError, match="no column 'z'"):
        ParquetRows(path, ["x", "z"])
    one = tmp_path / "one.parquet"
    table(one, group=5000)
    with pytest.raises(OptionError, match="holds out row groups"):
        fit_streamed(gf.Model(MODEL), ParquetRows(one, ["x", "y"]), cols,
                     options.replace(validation=0.2))  # fmt: skip


def test_cli_streams_a_parquet_folder_with_batch_size(tmp_path):
    folder = tmp_path / "parts"
    folder.mkdir()
    table(folder / "a.parquet", n=600, seed=1)
    table(folder / "b.parquet", n=400, seed=2)
    out = tmp_path / "run"
    args = ["fit", str(folder), "--model", MODEL, "--p0", "a=1,k=1,c=0", "--batch-size", "64",
            "--epochs", "6", "--lr", "0.05", "--seed", "2", "--validation", "0.3",
            "--patience", "3", "--json", "--out", str(out)]  # fmt: skip
    done = CliRunner().invoke(app, args)
    assert done.exit_code == 0, done.output
    printed = json.loads(done.stdout)
    assert printed["n_points"] + 0 < 1000 and len(printed["validation_history"]) >= 1
    assert json.loads((out / "results.json").read_text())["params"] == printed["params"]
    refused = CliRunner().invoke(app, [*args[:-3], "--optimizer", "lm"])
    assert refused.exit_code == 2 and "batch_size needs a first-order optimizer" in refused.output


def test_lm_over_row_groups_reaches_the_in_memory_optimum(tmp_path):
    path = tmp_path / "d.parquet"
    x, y = table(path, n=1500, group=400)
    cols = Columns(["x"], "y", None, named=False)
    options = FitOptions(optimizer="lm", p0=[2.0, 1.0, 0.2])
    streamed = fit_streamed(gf.Model(MODEL), ParquetRows(path, ["x", "y"]), cols, options)
    whole = gf.fit(MODEL, x, y, p0=[2.0, 1.0, 0.2])
    assert streamed.status == whole.status == "converged"
    # two LM runs (the streamed one has no geodesic step) each stop once the relative step is
    # below xtol = 3e-9: they agree to about that, not to rounding
    torch.testing.assert_close(streamed.values, whole.values, rtol=1e-8, atol=0)
    assert streamed.loss == pytest.approx(whole.loss, rel=1e-12)
    for name in "akc":
        assert streamed.stderr[name] == pytest.approx(whole.stderr[name], rel=1e-7)
    fn = gf.Model(lambda x, p: p[0] * torch.exp(-p[1] * x) + p[2], params=["a", "k", "c"])
    autodiff = fit_streamed(fn, ParquetRows(path, ["x", "y"]), cols, options)
    torch.testing.assert_close(autodiff.values, whole.values, rtol=1e-8, atol=0)
