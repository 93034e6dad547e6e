"""One place picks the LM kernel: the CLI and the library get the same one, and the same digits.

``optim/dispatch.py:lm_kernel`` decides for ``fit`` (and so ``gradfit fit``) and ``fit_batch``;
the CLI's Ctrl-C hook only asks "stop?" and keeps the compiled kernel.
"""

import json
import signal

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import gradfit as gf
from gradfit.cli.app import app
from gradfit.cli.signals import StopRequest
from gradfit.model.losses import get_loss
from gradfit.model.models import as_model
from gradfit.model.parameters import ParameterSpace
from gradfit.optim import compiled_lm
from gradfit.optim.dispatch import COMPILED_MAX_HISTORY, lm_kernel, stop_only
from gradfit.optim.problem import Problem, chain_hooks

runner = CliRunner()
MODEL = "a*exp(-k*t) + c"
P0 = {"a": 50.0, "k": 0.1, "c": 0.0}
needs_numba = pytest.mark.skipif(compiled_lm() is None, reason="no compiled kernel (Numba)")


@pytest.fixture
def decay():
    rng = np.random.default_rng(7)
    t = np.linspace(0, 10, 60)
    counts = 80 * np.exp(-0.4 * t) + 5 + rng.normal(0, 0.5, t.size)
    counts[[5, 40]] += 15.0  # outliers, so huber differs from mse
    return t, counts


@pytest.fixture
def decay_csv(tmp_path, decay):
    t, counts = decay
    path = tmp_path / "decay.csv"  # repr: the file holds the arrays' exact float64 values
    rows = "".join(f"{a!r},{b!r}\n" for a, b in zip(t.tolist(), counts.tolist(), strict=True))
    path.write_text("t,counts\n" + rows)
    return path


def cli_fit(path, *extra):
    p0 = ",".join(f"{k}={v!r}" for k, v in P0.items())
    args = ["fit", path, "--x", "t", "--y", "counts", "--model", MODEL, "--p0", p0, "--json"]
    return runner.invoke(app, [str(a) for a in [*args, *extra]])


def library_fit(decay, **options):
    t, counts = decay
    return gf.fit(MODEL.replace("t", "x"), t, counts, p0=[*P0.values()], **options)


@pytest.fixture
def kernel_calls(monkeypatch):
    """Counts the compiled kernel's fits (or, with ``forbid``, fails if it is called)."""
    bridge = compiled_lm()
    calls = []
    if bridge is not None:
        real = bridge.fit_curves

        def spy(*args, **kwargs):
            calls.append(1)
            return real(*args, **kwargs)

        monkeypatch.setattr(bridge, "fit_curves", spy)
    return calls


@needs_numba
@pytest.mark.parametrize("loss", ["mse", "huber"])
def test_cli_and_library_give_bit_identical_parameters(decay, decay_csv, kernel_calls, loss):
    cli = cli_fit(decay_csv, "--loss", loss)
    assert cli.exit_code == 0, cli.output
    assert len(kernel_calls) == 1  # the CLI's Ctrl-C hook did not force the PyTorch kernel
    data = json.loads(cli.stdout)
    library = library_fit(decay, loss=loss)
    assert len(kernel_calls) == 2
    assert data["params"] == {name: float(value) for name, value in library.params.items()}
    assert data["history"] == library.history and data["n_iter"] == library.n_iter
    assert data["status"] == library.status == "converged"


@pytest.mark.parametrize("loss", ["mse", "huber"])
def test_without_the_compiled_kernel_both_take_pytorch_and_agree(
    decay, decay_csv, monkeypatch, loss
):
    monkeypatch.setenv("GRADFIT_COMPILED", "0")
    bridge = compiled_lm()
    if bridge is not None:
        monkeypatch.setattr(bridge, "fit_curves", None)  # fails if called
    cli = cli_fit(decay_csv, "--loss", loss)
    assert cli.exit_code == 0, cli.output
    data = json.loads(cli.stdout)
    library = library_fit(decay, loss=loss)
    assert data["params"] == {name: float(value) for name, value in library.params.items()}
    assert data["history"] == library.history


@needs_numba
def test_the_kernels_agree_to_rounding(decay, monkeypatch):
    compiled = library_fit(decay, loss="huber")
    monkeypatch.setenv("GRADFIT_COMPILED", "0")
    reference = library_fit(decay, loss="huber")
    assert compiled.n_iter == reference.n_iter
    for name, value in reference.params.items():
        assert compiled.params[name] == pytest.approx(value, rel=1e-9)


def test_a_user_hook_is_called_every_iteration_on_the_pytorch_kernel(decay, monkeypatch):
    bridge = compiled_lm()
    if bridge is not None:
        monkeypatch.setattr(bridge, "fit_curves", None)  # a user hook never takes it
    seen = []
    result = library_fit(decay, hook=lambda epoch, loss: seen.append((epoch, loss)))
    assert result.status == "converged"
    assert [epoch for epoch, _ in seen] == list(range(result.n_iter))
    assert [loss for _, loss in seen] == result.history


def test_a_checkpoint_takes_the_pytorch_kernel(decay, monkeypatch, tmp_path):
    bridge = compiled_lm()
    if bridge is not None:
        monkeypatch.setattr(bridge, "fit_curves", None)
    result = library_fit(decay, checkpoint=tmp_path / "lm.pt")
    assert result.status == "converged" and (tmp_path / "lm.pt").exists()


@needs_numba
def test_a_signal_during_the_compiled_kernel_is_handled_when_it_returns(
    decay, decay_csv, monkeypatch
):
    bridge = compiled_lm()
    real = bridge.fit_curves

    def signalled(*args, **kwargs):  # SIGTERM arrives as the kernel starts
        signal.raise_signal(signal.SIGTERM)
        return real(*args, **kwargs)

    monkeypatch.setattr(bridge, "fit_curves", signalled)
    cli = cli_fit(decay_csv)
    assert cli.exit_code == 143, cli.output
    data = json.loads(cli.stdout)
    assert data["status"] == "interrupted" and not data["converged"]
    monkeypatch.setattr(bridge, "fit_curves", real)
    finished = library_fit(decay)  # the kernel ran to the end: the same parameters
    assert data["params"] == {name: float(value) for name, value in finished.params.items()}
    assert data["n_iter"] == finished.n_iter


def test_stop_only_hooks():
    stop = StopRequest()
    assert stop_only(None) and stop_only(stop.hook)
    assert not stop_only(lambda epoch, loss: False)
    assert not stop_only(chain_hooks(stop.hook, lambda epoch, loss: False))
    assert chain_hooks(stop.hook, None) == stop.hook  # alone, it stays stop-only


def problem(model="a*exp(-k*x) + c", loss="mse", dtype=torch.float64):
    model = as_model(model)
    x = torch.linspace(0, 1, 10, dtype=dtype)
    y = torch.exp(-x).to(dtype)
    space = ParameterSpace.build(model.param_names, None, None)
    theta0 = torch.ones(1, len(space.free), dtype=dtype)
    return Problem(model, x, y, get_loss(loss), space), get_loss(loss).rho, theta0


@needs_numba
def test_lm_kernel_rule(monkeypatch):
    def kernel(*args, per_iteration=False, history=0, **options):
        p, rho, theta0 = problem(*args, **options)
        robust = None if p.loss.name in ("mse", "sse", "chi2") else rho
        chosen = lm_kernel(p, robust, theta0, per_iteration=per_iteration, history=history)
        return "torch" if chosen is None else "compiled"

    assert kernel() == kernel(loss="huber") == kernel(loss="cauchy") == "compiled"
    assert kernel(history=COMPILED_MAX_HISTORY) == "compiled"
    assert kernel(history=COMPILED_MAX_HISTORY + 1) == "torch"
    assert kernel(per_iteration=True) == "torch"
    assert kernel(dtype=torch.float32) == "torch"
    f = gf.Model(lambda x, p: p[0] * torch.exp(-p[1] * x) + p[2], params=["a", "k", "c"])
    assert kernel(f) == "torch"  # a Python function: no program to interpret
    monkeypatch.setenv("GRADFIT_COMPILED", "0")
    assert kernel() == "torch"


@needs_numba
def test_fit_batch_asks_the_same_rule(decay, kernel_calls):
    t, counts = decay
    batch = gf.fit_batch(MODEL.replace("t", "x"), t, counts[None], p0=[*P0.values()])
    assert len(kernel_calls) == 1
    single = library_fit(decay)
    assert batch.params[0].tolist() == [float(v) for v in single.params.values()]
