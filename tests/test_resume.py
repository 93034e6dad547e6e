"""--resume continues only the same run, bit for bit; fit-many keeps groups with no data.

A resumed ``fit`` must end exactly where the uninterrupted run ends, for every first-order
optimizer and every kind of ``tol`` (0, None, > 0), from a stop request, from a kill between
checkpoints and from a run that had already finished. A resume with a different model, loss,
data or optimizer option is refused with one ``error:`` line naming what changed, and
nothing is written.
"""

import json
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
import pytest
import torch
from typer.testing import CliRunner

import gradfit as gf
from gradfit.batch.many import run_fit_many
from gradfit.cli.app import app
from gradfit.fitting.checkpoint import read_checkpoint

runner = CliRunner()
LINEAR = "a*x + b"
X = torch.linspace(0, 1, 12, dtype=torch.float64)
Y = 2 * X - 0.5 + 0.01 * torch.sin(17 * X)
#: each converges with tol 0 or 1e-10 in 3-490 epochs; tol None runs all 600
OPTIMIZERS = [("gd", 0.5), ("sgd", 0.3), ("adam", 0.1), ("lbfgs", 1.0)]
TOLS = [0.0, None, 1e-10]


class Killed(Exception):
    """Raised from a hook: the process dies between checkpoints, nothing more is saved."""


def fit_linear(optimizer, lr, tol, **options):
    return gf.fit(LINEAR, X, Y, p0=[1.0, 1.0], optimizer=optimizer, lr=lr, epochs=600, tol=tol,
                  **options)  # fmt: skip


def assert_same(one, two):
    assert one.params == two.params
    assert one.history == two.history
    assert one.loss == two.loss
    assert one.status == two.status


def kill_at(epoch):
    def hook(e, loss):
        if e + 1 >= epoch:
            raise Killed

    return hook


@pytest.mark.parametrize("tol", TOLS)
@pytest.mark.parametrize(("optimizer", "lr"), OPTIMIZERS)
def test_resume_is_bit_for_bit_for_every_optimizer_and_tol(tmp_path, one_thread, optimizer, lr,
                                                           tol):  # fmt: skip
    full = fit_linear(optimizer, lr, tol)
    n = len(full.history)
    every = 1 if optimizer == "lbfgs" else 7

    stopped = tmp_path / "stopped.pt"  # a stop request (Ctrl-C) halfway: saved where it stopped
    fit_linear(optimizer, lr, tol, checkpoint=stopped, hook=lambda e, loss: e + 1 >= n // 2)
    assert_same(fit_linear(optimizer, lr, tol, resume=stopped), full)

    killed = tmp_path / "killed.pt"  # a kill between checkpoints: the last periodic one stays
    with pytest.raises(Killed):
        fit_linear(optimizer, lr, tol, checkpoint=killed, checkpoint_every=every,
                   hook=kill_at(max(2, n - 3)))  # fmt: skip
    assert read_checkpoint(killed)["epoch"] < n
    assert_same(fit_linear(optimizer, lr, tol, resume=killed), full)

    finished = tmp_path / "finished.pt"  # the run had ended (converged or at its limit)
    fit_linear(optimizer, lr, tol, checkpoint=finished)
    assert read_checkpoint(finished)["epoch"] == n
    assert_same(fit_linear(optimizer, lr, tol, resume=finished), full)


def test_a_converged_run_stays_converged_when_resumed_with_more_epochs(tmp_path):
    path = tmp_path / "fit.pt"
    done = fit_linear("adam", 0.1, 0.0, checkpoint=path)
    assert done.converged
    more = gf.fit(LINEAR, X, Y, p0=[1.0, 1.0], optimizer="adam", lr=0.1, epochs=5000, tol=0.0,
                  resume=path)  # fmt: skip
    assert_same(more, done)


# ------------------------------------------------------------------ fit: the CLI, killed for real


def write_csv(path, x, y):
    rows = "".join(f"{a!r},{b!r}\n" for a, b in zip(x.tolist(), y.tolist(), strict=True))
    path.write_text("x,y\n" + rows)
    return path


def cli_fit(data, out, optimizer, *extra, model="a*x**2 + b*x + c", lr="0.01", epochs=20_000):
    return [sys.executable, "-m", "gradfit.cli", "fit", str(data), "--x", "x", "--y", "y",
            "--model", model, "--optimizer", optimizer, "--lr", lr, "--epochs", str(epochs),
            "--out", str(out), "--json", *map(str, extra)]  # fmt: skip


def wait_for_checkpoint(path, process, at_least, timeout=60.0):
    """Wait until ``path`` records ``at_least`` epochs, or the process has ended."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and read_checkpoint(path)["epoch"] >= at_least:
            return
        if process.poll() is not None:
            assert process.returncode == 0, process.communicate()
            return
        time.sleep(0.01)
    raise AssertionError(f"no checkpoint with {at_least} epochs after {timeout} s")


@pytest.mark.parametrize(
    ("optimizer", "extra", "at_least"),
    [
        ("adam", ["--tol", "0"], 2000),  # killed mid-run; converges at epoch 12,627 with tol 0
        ("lbfgs", [], 1),  # done in 3 epochs: SIGKILL finds it finished or exiting
    ],
)
def test_sigkill_then_resume_equals_an_uninterrupted_run(tmp_path, optimizer, extra, at_least):
    x, y = gf.datasets.quadratic(seed=0)
    data, path = write_csv(tmp_path / "q.csv", x, y), tmp_path / "run.ckpt"
    killed = subprocess.Popen(
        cli_fit(data, tmp_path / "killed", optimizer, *extra, "--checkpoint", path,
                "--checkpoint-every", 500 if optimizer == "adam" else 1),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    wait_for_checkpoint(path, killed, at_least)
    killed.send_signal(signal.SIGKILL)
    killed.communicate()
    saved = read_checkpoint(path)["epoch"]
    assert saved >= at_least

    # the resumed run in a subprocess, the uninterrupted reference here, side by side
    resumed = subprocess.Popen(cli_fit(data, tmp_path / "resumed", optimizer, *extra, "--resume",
                                       path), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)  # fmt: skip
    fresh = runner.invoke(app, cli_fit(data, tmp_path / "fresh", optimizer, *extra)[3:])
    assert fresh.exit_code == 0, fresh.output
    _, errors = resumed.communicate(timeout=120)
    assert resumed.returncode == 0, errors
    one, two = (
        json.loads((tmp_path / n / "results.json").read_text()) for n in ("resumed", "fresh")
    )
    assert one["params"] == two["params"]
    # a long history lies in results.history.npz beside the JSON: compare what load reads
    histories = [gf.FitResult.load(tmp_path / n / "results.json").history
                 for n in ("resumed", "fresh")]  # fmt: skip
    assert histories[0] == histories[1]
    assert one["status"] == two["status"]
    if optimizer == "adam":
        assert saved < len(histories[1]) and two["status"] == "converged"


# ------------------------------------------------------------------ fit: what may change


@pytest.fixture
def fit_run(tmp_path):
    """A 60-epoch adam fit checkpointed to run.ckpt; yields (args, checkpoint path)."""
    data = write_csv(tmp_path / "line.csv", X, Y)
    path = tmp_path / "run.ckpt"
    args = ["fit", str(data), "--x", "x", "--y", "y", "--model", LINEAR, "--p0", "a=1,b=1",
            "--optimizer", "adam", "--lr", "0.1", "--tol", "0"]  # fmt: skip
    first = runner.invoke(app, [*args, "--epochs", "60", "--checkpoint", str(path)])
    assert first.exit_code == 0, first.output
    return args, path


def replace_option(args, option, value):
    i = args.index(option)
    return [*args[:i], option, value, *args[i + 2 :]]


@pytest.mark.parametrize(
    ("option", "value", "named"),
    [
        ("--model", "a*x - b", "for model 'a*x + b', not 'a*x - b'"),
        ("--optimizer", "sgd", "for optimizer 'adam', not 'sgd'"),
        ("--lr", "0.2", "for lr 0.1, not 0.2"),
        ("--loss", "huber", "for loss 'mse', not 'huber'"),
        ("--bounds", "a=0:10", "for bounds {}, not {'a': [0.0, 10.0]}"),
        ("--fix", "b=0.5", "for fixed {}, not {'b': 0.5}"),
        ("--tol", "1e-9", "for tol 0.0, not 1e-09"),
        ("--p0", "a=2,b=1", "for p0 [1.0, 1.0], not [2.0, 1.0]"),
        ("data", None, "for different data (y changed)"),
    ],
)
def test_fit_resume_refuses_a_changed_run(tmp_path, fit_run, option, value, named):
    args, path = fit_run
    before = path.read_bytes()
    if option == "data":  # the same file, one value changed
        write_csv(tmp_path / "line.csv", X, Y + 1e-9 * (torch.arange(12) == 3))
    elif option in args:
        args = replace_option(args, option, value)
    else:
        args = [*args, option, value]
    out = tmp_path / "out"
    result = runner.invoke(app, [*args, "--epochs", "90", "--resume", str(path), "--out", str(out)])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and named in lines[0], lines
    assert str(path) in lines[0] and "drop --resume" in lines[0]
    assert path.read_bytes() == before  # the checkpoint is left as it was
    assert not out.exists()


def test_fit_resume_may_raise_epochs_and_change_where_it_saves(tmp_path, fit_run):
    args, path = fit_run
    out = tmp_path / "out"
    resumed = runner.invoke(app, [*args, "--epochs", "150", "--resume", str(path),
                                  "--checkpoint-every", "13", "--out", str(out)])  # fmt: skip
    assert resumed.exit_code == 0, resumed.output
    fresh = runner.invoke(app, [*args, "--epochs", "150", "--out", str(tmp_path / "fresh")])
    assert fresh.exit_code == 0, fresh.output
    one, two = (json.loads((tmp_path / n / "results.json").read_text()) for n in ("out", "fresh"))
    assert one["params"] == two["params"] and one["history"] == two["history"]
    assert read_checkpoint(path)["epoch"] == len(one["history"])  # and it kept saving


# ------------------------------------------------------------------ fit-many


def gaussian_table(path, n_groups=12, n_points=15):
    rng = np.random.default_rng(1)
    x = np.linspace(-3, 3, n_points)
    keys, xs, ys = [], [], []
    for i in range(n_groups):
        center = rng.uniform(-1, 1)
        y = (2 + i / 4) * np.exp(-((x - center) ** 2) / 2) + 0.1 + rng.normal(0, 0.01, n_points)
        keys += [f"g{i:02d}"] * n_points
        xs += x.tolist()
        ys += y.tolist()
    pq.write_table(pa.table({"key": keys, "x": xs, "y": ys}), path)
    return path


def many_args(data, out, *extra, chunk_size=4):
    return ["fit-many", str(data), "--group", "key", "--model", "gaussian", "--out", str(out),
            "--chunk-size", str(chunk_size), *map(str, extra)]  # fmt: skip


@pytest.fixture
def partial_run(tmp_path):
    """fit-many of 12 groups in chunks of 4, stopped after its first chunk(s)."""
    data, out = gaussian_table(tmp_path / "long.parquet"), tmp_path / "params.parquet"
    parts = tmp_path / "params.parquet.parts"
    stopped = run_fit_many(data, model=gf.Model("gaussian"), group="key", x="x", y="y",
                           sigma=None, out=out, chunk_size=4,
                           stop=lambda: len(list(parts.glob("part-*"))) >= 1)  # fmt: skip
    assert stopped is None and not out.exists()
    assert 1 <= len(list(parts.glob("part-*"))) < 3
    return data, out, parts


def snapshot(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize(
    ("change", "named"),
    [
        (["--model", "lorentzian"], "for model 'gaussian', not 'lorentzian'"),
        (["--loss", "huber"], "for loss 'mse', not 'huber'"),
        (["--optimizer", "adam"], "for optimizer 'lm', not 'adam'"),
        (["--epochs", "5"], "for epochs None, not 5"),
        (["--tol", "1e-6"], "for tol None, not 1e-06"),
        (["--p0", "width=2"], "for p0 None, not {'width': 2.0}"),
        (["--fix", "offset=0"], "for fixed {}, not {'offset': 0.0}"),
        (["--dtype", "float32"], "for dtype 'torch.float64', not 'torch.float32'"),
        (["data"], "for different data (y changed)"),
    ],
)
def test_fit_many_resume_refuses_a_changed_run(tmp_path, partial_run, change, named):
    data, out, parts = partial_run
    before = snapshot(parts)
    if change == ["data"]:
        table = pq.read_table(data)
        y = table.column("y").to_numpy().copy()
        y[-1] += 1e-9
        pq.write_table(table.set_column(2, "y", pa.array(y)), data)
        change = []
    if change[:1] == ["--model"]:
        args = [a if a != "gaussian" else change[1] for a in many_args(data, out, "--resume")]
    else:
        args = many_args(data, out, "--resume", *change)
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --resume: ") and named in lines[0]
    assert snapshot(parts) == before  # the finished chunks and the manifest are untouched
    assert not out.exists()


def test_fit_many_resume_may_change_the_chunk_size_and_equals_a_fresh_run(tmp_path, partial_run):
    data, out, parts = partial_run
    resumed = runner.invoke(app, many_args(data, out, "--resume", chunk_size=5))
    assert resumed.exit_code == 0, resumed.output
    assert not parts.exists()
    fresh = tmp_path / "fresh.parquet"
    assert runner.invoke(app, many_args(data, fresh)).exit_code == 0
    got, expected = pq.read_table(out), pq.read_table(fresh)
    assert got.column_names == expected.column_names
    for name in got.column_names:
        np.testing.assert_array_equal(got.column(name).to_numpy(), expected.column(name).to_numpy())


def test_fit_many_resume_of_a_complete_output_is_refused(tmp_path):
    data, out = gaussian_table(tmp_path / "long.parquet", n_groups=3), tmp_path / "p.parquet"
    assert runner.invoke(app, many_args(data, out)).exit_code == 0
    before = out.read_bytes()
    again = runner.invoke(app, [*many_args(data, out, "--resume"), "--model", "lorentzian"])
    assert again.exit_code == 2 and "is complete" in again.stderr and "--overwrite" in again.stderr
    assert out.read_bytes() == before
    redo = runner.invoke(app, [*many_args(data, out, "--resume", "--overwrite")])
    assert redo.exit_code == 0, redo.output


def test_fit_many_keeps_groups_without_valid_points_as_no_data(tmp_path):
    data = gaussian_table(tmp_path / "long.parquet", n_groups=4)
    table = pq.read_table(data)
    y = table.column("y").to_numpy().copy()
    y[15:30] = np.nan  # g01: every point NaN
    y[45] = np.inf  # g03: one point dropped, still fitted
    pq.write_table(table.set_column(2, "y", pa.array(y)), data)
    out = tmp_path / "p.csv"
    result = runner.invoke(app, [*many_args(data, out, "--nan-policy", "omit")])
    assert result.exit_code == 0, result.output
    assert "dropped 16 rows" in result.stderr and "1 group has no valid point" in result.stderr
    rows = {r["key"]: r for r in pa_csv.read_csv(out).to_pylist()}
    assert list(rows) == ["g00", "g01", "g02", "g03"]
    empty = rows["g01"]
    assert empty["status"] == "no_data" and empty["n_points"] == 0 and empty["n_iter"] == 0
    for name in ("amplitude", "center", "width", "offset", "amplitude_stderr", "loss"):
        assert empty[name] is None or np.isnan(empty[name])
    assert rows["g03"]["n_points"] == 14 and rows["g03"]["status"] == "converged"
    assert "no_data 1" in result.output
