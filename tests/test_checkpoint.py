"""Checkpoints: resuming ends bit for bit where an uninterrupted run ends, even after SIGKILL."""

import json
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import gradfit as gf
from gradfit.cli.app import app
from gradfit.fitting import checkpoint as checkpoints
from gradfit.fitting.checkpoint import CheckpointError, read_checkpoint

QUADRATIC = "a*x**2 + b*x + c"
EXACT = [  # (optimizer, options): resuming these must reproduce the run exactly
    ("gd", {"lr": 0.3, "epochs": 1500}),
    ("sgd", {"lr": 0.05, "epochs": 1500}),
    ("adam", {"lr": 0.05, "epochs": 1500}),
    ("lbfgs", {"epochs": 12, "tol": -1.0}),
]


def stop_after(n):
    """A hook that stops the loop after n epochs, as Ctrl-C would."""
    return lambda epoch, loss: epoch + 1 >= n


def fit_quadratic(**options):
    x, y = gf.datasets.quadratic(seed=1)
    return gf.fit(QUADRATIC, x, y, p0=[1.0, 1.0, 1.0], **options)


@pytest.mark.parametrize(("optimizer", "options"), EXACT)
def test_resume_is_bit_for_bit(tmp_path, optimizer, options):
    path = tmp_path / "fit.pt"
    full = fit_quadratic(optimizer=optimizer, **options)
    stop = options["epochs"] // 3
    part = fit_quadratic(optimizer=optimizer, checkpoint=path, checkpoint_every=7,
                         hook=stop_after(stop), **options)  # fmt: skip
    assert part.status == "interrupted" and len(part.history) == stop
    assert read_checkpoint(path)["epoch"] == stop  # saved again where it stopped
    resumed = fit_quadratic(optimizer=optimizer, resume=path, **options)
    assert resumed.params == full.params
    assert resumed.history == full.history
    assert resumed.loss == full.loss
    assert resumed.status == full.status


def test_resume_from_a_periodic_checkpoint_and_with_more_epochs(tmp_path):
    path = tmp_path / "fit.pt"
    first = fit_quadratic(optimizer="adam", lr=0.05, epochs=700, checkpoint=path,
                          checkpoint_every=300)  # fmt: skip
    assert first.status == "max_iter" and read_checkpoint(path)["epoch"] == 700
    longer = fit_quadratic(optimizer="adam", lr=0.05, epochs=1200, resume=path)
    assert longer.history == fit_quadratic(optimizer="adam", lr=0.05, epochs=1200).history


def test_checkpoint_saves_only_every_n_epochs(tmp_path, monkeypatch):
    saved = []
    original = checkpoints.save_checkpoint
    monkeypatch.setattr(checkpoints, "save_checkpoint",
                        lambda path, state, identity: saved.append(state.epoch) or
                        original(path, state, identity))  # fmt: skip
    fit_quadratic(optimizer="gd", lr=0.3, epochs=1000, checkpoint=tmp_path / "f.pt",
                  checkpoint_every=300)  # fmt: skip
    assert saved == [300, 600, 900, 1000]  # and once at the end
    assert [p.name for p in tmp_path.iterdir()] == ["f.pt"]  # no temporary files left


def test_lm_resumes_from_its_best_parameters(tmp_path):
    t = torch.linspace(0, 10, 60, dtype=torch.float64)
    y = 80 * torch.exp(-0.4 * t) + 5 + 0.3 * torch.sin(7 * t)
    model = gf.Model("a*exp(-k*t) + c", independent="t")
    start = {"a": 1.0, "k": 3.0, "c": 0.0}
    full = gf.fit(model, t, y, p0=start, optimizer="lm")
    path = tmp_path / "lm.pt"
    part = gf.fit(model, t, y, p0=start, optimizer="lm", checkpoint=path, hook=stop_after(4))
    assert part.status == "interrupted" and len(part.history) == 4
    saved = read_checkpoint(path)
    assert saved["epoch"] == 4
    # the saved parameters are a point LM evaluated, and as good as the last reported cost
    params = model.param_names
    theta = dict(zip(params, saved["theta"].tolist(), strict=True))
    loss = float(((model(t, saved["theta"]) - y) ** 2).mean())
    assert loss == pytest.approx(saved["best_loss"], rel=1e-12)
    assert saved["best_loss"] <= part.history[-1] * (1 + 1e-12)
    assert theta == pytest.approx(part.params, rel=1e-12)
    resumed = gf.fit(model, t, y, p0=start, optimizer="lm", resume=path)
    assert resumed.converged
    assert resumed.history[:4] == part.history
    assert resumed.params == pytest.approx(full.params, rel=1e-7)


@pytest.mark.parametrize(
    ("change", "key"),
    [
        ({"optimizer": "sgd"}, "optimizer"),
        ({"lr": 0.2}, "lr"),
        ({"loss": "huber", "optimizer": "gd"}, "loss"),
        ({"model": "a*x**2 + b*x + d"}, "model"),
        ({"y_shift": 1e-3}, "data"),
        ({"bounds": {"a": (0, 100)}}, "bounds"),
        ({"dtype": torch.float32}, "dtype"),
    ],
)
def test_resume_refuses_a_different_problem(tmp_path, change, key):
    path = tmp_path / "fit.pt"
    x, y = gf.datasets.quadratic(seed=1)
    base = {"optimizer": "gd", "lr": 0.3, "epochs": 50, "p0": [1.0, 1.0, 1.0]}
    gf.fit(QUADRATIC, x, y, checkpoint=path, **base)
    options = {**base, **change}
    model, shift = options.pop("model", QUADRATIC), options.pop("y_shift", 0.0)
    with pytest.raises(CheckpointError) as info:
        gf.fit(model, x, y + shift, resume=path, **options)
    message = str(info.value)
    named = "different data (y changed)" if key == "data" else f"written for {key} "
    assert named in message and str(path) in message and "drop --resume" in message


def test_unreadable_or_foreign_checkpoints_are_refused(tmp_path):
    x, y = gf.datasets.quadratic(seed=1)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00not a checkpoint")
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.ones(3)}, other)
    empty = tmp_path / "empty.pt"
    torch.save({"format": "gradfit-checkpoint", "version": checkpoints.VERSION}, empty)
    old = tmp_path / "old.pt"
    torch.save({"format": "gradfit-checkpoint", "version": 1}, old)
    for path, text in [(tmp_path / "gone.pt", "no such checkpoint"),
                       (garbage, "not a readable gradfit checkpoint"),
                       (other, "not a gradfit checkpoint"),
                       (old, "checkpoint version 1, this gradfit reads"),
                       (empty, "written for a fit that did not record model")]:  # fmt: skip
        with pytest.raises(CheckpointError, match=text):
            gf.fit(QUADRATIC, x, y, optimizer="gd", resume=path)


class Exploit:
    def __reduce__(self):
        return (print, ("pickled code ran",))


def test_a_checkpoint_cannot_run_pickled_code(tmp_path, capsys):
    path = tmp_path / "evil.pt"
    torch.save({"format": "gradfit-checkpoint", "payload": Exploit()}, path)
    capsys.readouterr()
    with pytest.raises(CheckpointError, match="not a readable gradfit checkpoint"):
        read_checkpoint(path)
    assert "pickled code ran" not in capsys.readouterr().out


# ------------------------------------------------------------------- the CLI, killed for real


def write_quadratic_csv(path):
    x, y = gf.datasets.quadratic(seed=0)
    rows = "".join(f"{a!r},{b!r}\n" for a, b in zip(x.tolist(), y.tolist(), strict=True))
    path.write_text("x,y\n" + rows)
    return path


def wait_for_progress(path, process, at_least, timeout=60.0):
    """Wait until the checkpoint at ``path`` records ``at_least`` epochs; return its epoch."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()
        if path.exists():
            epoch = read_checkpoint(path)["epoch"]  # always whole: written atomically
            if epoch >= at_least:
                return epoch
        time.sleep(0.01)
    raise AssertionError(f"no checkpoint with {at_least} epochs after {timeout} s")


def fit_args(data, out, epochs, *extra):
    return [sys.executable, "-m", "gradfit.cli", "fit", str(data), "--x", "x", "--y", "y",
            "--model", QUADRATIC, "--optimizer", "gd", "--lr", "0.01", "--epochs", str(epochs),
            "--out", str(out), "--json", *map(str, extra)]  # fmt: skip


def test_sigkill_then_resume_equals_an_uninterrupted_run(tmp_path):
    data = write_quadratic_csv(tmp_path / "q.csv")
    path, epochs = tmp_path / "fit.pt", 20_000
    killed = subprocess.Popen(
        fit_args(data, tmp_path / "killed", epochs, "--checkpoint", path, "--checkpoint-every",
                 200),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    wait_for_progress(path, killed, at_least=600)
    killed.send_signal(signal.SIGKILL)
    killed.communicate()
    assert killed.returncode == -signal.SIGKILL
    saved = read_checkpoint(path)["epoch"]
    assert 600 <= saved < epochs and saved % 200 == 0
    assert not (tmp_path / "killed").exists()  # nothing half-written

    # resume in a subprocess while the uninterrupted reference runs here, in parallel
    args = fit_args(data, tmp_path / "resumed", epochs, "--resume", path)
    resumed = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    fresh = CliRunner().invoke(app, fit_args(data, tmp_path / "fresh", epochs)[3:])
    assert fresh.exit_code == 0, fresh.output
    _, errors = resumed.communicate(timeout=120)
    assert resumed.returncode == 0, errors
    one, two = (
        json.loads((tmp_path / n / "results.json").read_text()) for n in ("resumed", "fresh")
    )
    assert one["params"] == two["params"]
    # a history this long is kept beside results.json (<stem>.history.npz): compare it loaded
    histories = [gf.FitResult.load(tmp_path / n / "results.json").history
                 for n in ("resumed", "fresh")]  # fmt: skip
    assert histories[0] == histories[1] and len(histories[0]) == epochs
    assert one["loss"] == two["loss"]
    assert read_checkpoint(path)["epoch"] == epochs  # the resumed run kept saving
    assert np.isfinite(one["loss"])
