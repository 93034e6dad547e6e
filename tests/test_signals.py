"""Ctrl-C and SIGTERM stop a fit after the current step and keep the best result so far."""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

import gradfit as gf
from gradfit.cli.signals import stop_on_signals
from gradfit.fitting.checkpoint import read_checkpoint
from gradfit.optim.problem import chain_hooks


def raise_at(epoch_to_signal, signum=signal.SIGINT):
    """A hook that sends ``signum`` to this process after the given epoch, like a user."""

    def hook(epoch, loss):
        if epoch == epoch_to_signal:
            signal.raise_signal(signum)
        return False

    return hook


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_handlers_set_a_flag_and_are_restored(signum):
    before = signal.getsignal(signum)
    with stop_on_signals() as stop:
        assert signal.getsignal(signum) is not before
        signal.raise_signal(signum)
        assert stop.requested and stop.signum == signum
    assert signal.getsignal(signum) is before
    assert stop.exit_code == {signal.SIGINT: 130, signal.SIGTERM: 143}[signum]


def test_a_second_signal_stops_at_once():
    with pytest.raises(KeyboardInterrupt), stop_on_signals():
        signal.raise_signal(signal.SIGINT)
        signal.raise_signal(signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_outside_the_main_thread_nothing_is_installed():
    seen = []

    def worker():
        with stop_on_signals() as stop:
            seen.append((stop.requested, signal.getsignal(signal.SIGINT)))

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    assert seen == [(False, signal.default_int_handler)]


def test_library_fit_keeps_the_default_keyboard_interrupt():
    x, y = gf.datasets.quadratic(seed=0)
    with pytest.raises(KeyboardInterrupt):
        gf.fit("a*x**2 + b*x + c", x, y, optimizer="gd", epochs=1000, hook=raise_at(10))


@pytest.mark.parametrize("optimizer", ["gd", "lbfgs", "lm"])
def test_library_fit_stops_cleanly_when_asked(optimizer):
    x, y = gf.datasets.quadratic(seed=0)
    # the vertex form is not linear in its parameters: LM takes many iterations (it solves
    # a*x**2 + b*x + c in one)
    with stop_on_signals() as stop:
        signal_then_stop = chain_hooks(raise_at(2, signal.SIGTERM), stop.hook)
        result = gf.fit("a*(x - h)**2 + c", x, y, optimizer=optimizer, epochs=1000,
                        p0=[1.0, 1.0, 1.0], tol=-1.0, hook=signal_then_stop)  # fmt: skip
    assert result.status == "interrupted" and not result.converged
    assert len(result.history) == 3  # the step in progress finished, no more
    assert result.loss <= min(result.history)
    assert all(torch.isfinite(torch.tensor(list(result.params.values()))))


# ------------------------------------------------------------------ the CLI, signalled for real


def write_quadratic_csv(path):
    x, y = gf.datasets.quadratic(seed=0)
    rows = "".join(f"{a!r},{b!r}\n" for a, b in zip(x.tolist(), y.tolist(), strict=True))
    path.write_text("x,y\n" + rows)
    return path


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_cli_writes_the_best_result_and_exits_128_plus_signal(tmp_path, signum, code):
    data, out, path = write_quadratic_csv(tmp_path / "q.csv"), tmp_path / "out", tmp_path / "f.pt"
    args = [sys.executable, "-m", "gradfit.cli", "fit", data, "--x", "x", "--y", "y",
            "--model", "a*x**2 + b*x + c", "--optimizer", "gd", "--lr", "0.01",
            "--epochs", 10_000_000, "--checkpoint", path, "--checkpoint-every", 200,
            "--out", out]  # fmt: skip
    process = subprocess.Popen(list(map(str, args)), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)  # fmt: skip
    deadline = time.monotonic() + 60
    while not (path.exists() and read_checkpoint(path)["epoch"] >= 400):
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.01)
    os.kill(process.pid, signum)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == code, stderr
    assert "Traceback" not in stderr
    assert f"note: stopped by {signal.Signals(signum).name}" in stderr
    assert f"--resume {path}" in stderr
    assert "[[Parameters]]" in stdout  # the report is printed
    results = json.loads((out / "results.json").read_text())
    assert results["status"] == "interrupted" and not results["converged"]
    assert 400 <= results["n_iter"] < 10_000_000
    assert results["loss"] <= min(results["history"])
    assert {p.name for p in out.iterdir()} == {"results.json", "fit.png", "history.png"}
    assert read_checkpoint(path)["epoch"] == results["n_iter"]  # resumable where it stopped
