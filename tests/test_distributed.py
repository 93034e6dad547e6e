"""Two processes (gloo on the CPU) give one process's answers: LM, mini-batch adam with an
expression and with an nn.Module, checkpoint and resume; a failing rank fails every rank."""

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import gradfit as gf

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available(), reason="torch without torch.distributed"
)
VENV_BIN = Path(sys.executable).parent
TIMEOUT = 90  # seconds for a whole launch: startup of two interpreters on a busy machine


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(code, tmp_path, world=2, env=None):
    """Run ``code`` in ``world`` processes as a launcher would (RANK, WORLD_SIZE, MASTER_*)."""
    script = tmp_path / "worker.py"
    script.write_text(textwrap.dedent(code))
    port = str(free_port())
    procs = []
    for rank in range(world):
        environ = os.environ | {"RANK": str(rank), "LOCAL_RANK": str(rank),
                                "WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1",
                                "MASTER_PORT": port, "OMP_NUM_THREADS": "1",
                                "GRADFIT_COLLECTIVE_TIMEOUT": "30"} | (env or {})  # fmt: skip
        command = [sys.executable, str(script), str(tmp_path)]
        pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True}
        procs.append(subprocess.Popen(command, env=environ, **pipes))
    outputs = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=TIMEOUT)
            outputs.append((proc.returncode, out, err))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    return outputs


COMMON = """
import sys
from pathlib import Path
import torch
from torch import nn
import gradfit as gf

out = Path(sys.argv[1])
torch.set_num_threads(1)
gen = torch.Generator().manual_seed(0)
x = torch.linspace(0, 4, 203, dtype=torch.float64)
y = 2.5 * torch.exp(-1.3 * x) + 0.4 + 0.02 * torch.randn(203, generator=gen, dtype=torch.float64)


def net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(1, 5), nn.Tanh(), nn.Linear(5, 1)).double()


def fits(checkpoint=None):
    found = {}
    found["lm"] = gf.fit("a*exp(-k*x) + c", x, y, p0=[1.0, 1.0, 0.0])
    adam = dict(optimizer="adam", lr=0.05, batch_size=16, seed=3)
    found["adam"] = gf.fit("a*exp(-k*x) + c", x, y, p0=[1.0, 1.0, 0.0], epochs=8, **adam)
    found["module"] = gf.fit(net(), x, y, epochs=4, **adam)
    found["validation"] = gf.fit("a*exp(-k*x) + c", x, y, p0=[1.0, 1.0, 0.0], epochs=6,
                                 validation=0.2, **adam)
    if checkpoint is not None:
        path = checkpoint / "fit.pt"
        found["first"] = gf.fit("a*exp(-k*x) + c", x, y, p0=[1.0, 1.0, 0.0], epochs=3,
                                checkpoint=path, checkpoint_every=5, **adam)
        found["resumed"] = gf.fit("a*exp(-k*x) + c", x, y, p0=[1.0, 1.0, 0.0], epochs=8,
                                  resume=path, **adam)
    if (out / "d.parquet").exists():  # streamed by row groups, each rank its own
        from gradfit.fitting.streamed import Columns, fit_streamed
        from gradfit.io.streamed import ParquetRows
        from gradfit.options import FitOptions

        options = FitOptions(p0=[1.0, 1.0, 0.0], epochs=3, validation=0.3, **adam)
        found["streamed"] = fit_streamed(gf.Model("a*exp(-k*x) + c"),
                                         ParquetRows(out / "d.parquet", ["x", "y"]),
                                         Columns(["x"], "y", None, False), options)
        found["streamed"].history.append(found["streamed"].chi2)
        found["streamed"].history.append(found["streamed"].n_points)
    return {k: (r.values, r.history, r.status, r.validation_history) for k, r in found.items()}
"""

WORKER = (
    COMMON
    + """
import torch.distributed as dist
results = fits(checkpoint=out)
torch.save(results, out / f"rank{dist.get_rank()}.pt")
try:  # every rank refuses, none hangs
    gf.fit("a*exp(-k*x) + c", x, y + dist.get_rank(), p0=[1.0, 1.0, 0.0])
except gf.errors.OptionError as error:
    print("refused:", error)
"""
)


def one_process(folder, monkeypatch):
    """The workers' ``fits``, defined in this process (no WORLD_SIZE) with ``folder`` as the
    folder they are given on their command line."""
    namespace = {}
    monkeypatch.setattr(sys, "argv", [sys.argv[0], str(folder)])  # pytest's own may be bare
    exec(COMMON, namespace)
    return namespace["fits"]


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("dist")
    rng = np.random.default_rng(5)
    xs = rng.uniform(0, 4, 700)
    ys = 2.5 * np.exp(-1.3 * xs) + 0.4 + 0.02 * rng.standard_normal(700)
    pq.write_table(pa.table({"x": xs, "y": ys}), tmp_path / "d.parquet", row_group_size=90)
    outputs = launch(WORKER, tmp_path)
    for code, _, err in outputs:
        assert code == 0, err[-3000:]
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)], outputs


def test_every_rank_ends_with_the_same_answer(two_processes):
    (rank0, rank1), _ = two_processes
    for name in rank0:
        assert torch.equal(rank0[name][0], rank1[name][0]), name
        assert rank0[name][1] == rank1[name][1], name


def test_two_processes_equal_one(two_processes, tmp_path, one_thread, monkeypatch):
    (rank0, _), _ = two_processes
    single = one_process(tmp_path, monkeypatch)(checkpoint=tmp_path)
    # LM: the normal equations summed over the ranks, to rounding
    torch.testing.assert_close(rank0["lm"][0], single["lm"][0], rtol=1e-10, atol=0)
    assert rank0["lm"][2] == single["lm"][2] == "converged"
    # mini-batch adam: the same global batches, the gradients summed over the ranks
    for name in ("adam", "module", "validation", "first", "resumed"):
        torch.testing.assert_close(rank0[name][0], single[name][0], rtol=1e-8, atol=1e-10)
        torch.testing.assert_close(torch.tensor(rank0[name][1]), torch.tensor(single[name][1]),
                                   rtol=1e-8, atol=0)  # fmt: skip
    assert len(rank0["validation"][3]) == 6
    validation = [torch.tensor(found["validation"][3]) for found in (rank0, single)]
    torch.testing.assert_close(*validation, rtol=1e-8, atol=0)
    # resumed from the two processes' checkpoint: as the uninterrupted run of 8 epochs
    torch.testing.assert_close(rank0["resumed"][0], single["adam"][0], rtol=1e-8, atol=1e-10)


def test_streamed_rows_split_by_row_group_give_one_answer(two_processes):
    (rank0, rank1), _ = two_processes
    values, history, status, validation = rank0["streamed"]
    assert torch.equal(values, rank1["streamed"][0]) and len(validation) == 3
    *_, chi2, n_points = history
    # 8 row groups (7 of 90 rows, one of 70): round(0.3 * 8) = 2 held out for validation
    assert n_points in (700 - 180, 700 - 160)
    assert chi2 > 0 and status == "max_iter"


def test_a_failing_rank_fails_every_rank_without_hanging(tmp_path):
    code = (
        COMMON
        + """
import os
import torch.distributed as dist
rank = int(os.environ["RANK"])
model = gf.Model(lambda x, p: p[0] * torch.exp(-p[1] * x) + p[2], params=["a", "k", "c"])
calls = [0]

def loss(pred, true):
    calls[0] += 1
    if rank == 1 and calls[0] > 5:
        raise RuntimeError("rank 1 broke")
    return ((pred - true) ** 2).mean()

gf.fit(model, x, y, loss=loss, p0=[1.0, 1.0, 0.0], optimizer="adam", batch_size=8, seed=1,
       epochs=50)
"""
    )
    outputs = launch(code, tmp_path)
    assert [code != 0 for code, _, _ in outputs] == [True, True]
    assert "rank 1 broke" in outputs[1][2]
    assert "PeerFailed: rank 0: another rank of the torchrun group failed" in outputs[0][2]


def test_ranks_given_different_data_are_refused_alike(two_processes):
    _, outputs = two_processes
    for _, out, _ in outputs:
        assert "refused: the ranks were given different data (y)" in out


def test_torchrun_runs_the_cli_and_rank_0_alone_prints(tmp_path):
    torchrun = VENV_BIN / "torchrun"
    gradfit = VENV_BIN / "gradfit"
    if not torchrun.exists() or not gradfit.exists():
        pytest.skip("torchrun or the gradfit script is not installed beside this python")
    x = np.linspace(0, 4, 150)
    y = 2.0 * np.exp(-0.7 * x) + 0.1 + 0.01 * np.sin(17 * x)
    table = tmp_path / "decay.csv"
    table.write_text(
        "x,y\n" + "\n".join(f"{float(a)!r},{float(b)!r}" for a, b in zip(x, y, strict=True))
    )
    command = [str(torchrun), "--nproc-per-node", "2", "--no-python", str(gradfit), "fit",
               str(table), "--model", "a*exp(-k*x) + c", "--p0", "a=1,k=1,c=0", "--json",
               "--out", str(tmp_path / "run")]  # fmt: skip
    environ = os.environ | {"OMP_NUM_THREADS": "1", "GRADFIT_COLLECTIVE_TIMEOUT": "30"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT, env=environ)
    assert done.returncode == 0, done.stderr[-3000:]
    printed = json.loads(done.stdout)  # one JSON document: rank 1 printed nothing
    single = gf.fit("a*exp(-k*x) + c", x, y, p0=[1.0, 1.0, 0.0])
    for name, value in single.params.items():
        assert printed["params"][name] == pytest.approx(value, rel=1e-10)
    assert json.loads((tmp_path / "run" / "results.json").read_text())["status"] == "converged"
