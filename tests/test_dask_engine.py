"""fit-many on Dask: the same rows as the local engine on a LocalCluster and on a scheduler
with worker processes started here; a worker killed mid-run; resume across engines; the
client's thread settings kept.

One LocalCluster of 2 single-thread workers (started by gradfit itself) serves the module.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

pytest.importorskip("distributed")

import gradfit as gf
from gradfit.batch.dask_engine import THREAD_VARIABLES, DaskEngine
from gradfit.batch.many import run_fit_many
from gradfit.cli.app import app

sys.path.insert(0, str(Path(__file__).parent))
from test_sources import gaussian_rows, reference, split_dataset

runner = CliRunner()


def thread_settings():
    import torch

    return {name: os.environ.get(name) for name in THREAD_VARIABLES}, torch.get_num_threads()


def stop_processes(processes):
    for process in processes:  # workers without a nanny: nothing is left behind
        process.kill()
    for process in processes:
        process.wait(timeout=30)


def scheduler_address(path, timeout):
    """The address a scheduler wrote to its ``--scheduler-file`` (once the file is whole)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            return json.loads(path.read_text())["address"]
        except (FileNotFoundError, json.JSONDecodeError, KeyError):
            time.sleep(0.05)
    raise AssertionError(f"no scheduler address in {path} after {timeout} s")


@pytest.fixture(scope="module")
def external(tmp_path_factory):
    """A ``dask scheduler`` and two ``dask worker`` processes (random port; the workers
    prepared at start by ``--preload gradfit.batch.dask_engine``), started before the
    LocalCluster so that their start-up overlaps the other tests; yields the address."""
    address_file = tmp_path_factory.mktemp("scheduler") / "scheduler.json"
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    scheduler = [
        sys.executable,
        "-m",
        "distributed.cli.dask_scheduler",
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--no-dashboard",
        "--scheduler-file",
        str(address_file),
    ]
    worker = [
        sys.executable,
        "-m",
        "distributed.cli.dask_worker",
        "--nthreads",
        "1",
        "--no-nanny",
        "--no-dashboard",
        "--preload",
        "gradfit.batch.dask_engine",
    ]
    processes = [subprocess.Popen(scheduler, **quiet)]  # fmt: skip
    try:
        address = scheduler_address(address_file, timeout=60)
        processes += [subprocess.Popen([*worker, address], **quiet) for _ in range(2)]
        yield address
    finally:
        stop_processes(processes[::-1])


@pytest.fixture(scope="module")
def client(external):
    before = thread_settings()
    with DaskEngine.open(workers=2, scheduler=None, client=None) as engine:
        assert thread_settings() == before  # put back as soon as the cluster has started
        yield engine.client
    assert thread_settings() == before


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """120 groups over 3 files, cut mid-group, row groups of 53 rows."""
    table = gaussian_rows(120, seed=3)
    folder = split_dataset(tmp_path_factory.mktemp("dask") / "data", table, [900, 1800], 53)
    return folder, table


def fit(data, out, **extra):
    return run_fit_many(data, model=gf.Model("gaussian"), group="key", x="x", y="y",
                        sigma=None, out=out, chunk_size=3, **extra)  # fmt: skip


def assert_same(one, two):
    assert list(one.keys) == list(two.keys)
    np.testing.assert_allclose(one.params.numpy(), two.params.numpy(), rtol=1e-12, atol=0)
    np.testing.assert_allclose(one.stderr.numpy(), two.stderr.numpy(), rtol=1e-12, atol=0)
    assert one.status_names == two.status_names


def test_local_cluster_equals_local_engine_and_reference(client, dataset, tmp_path):
    folder, table = dataset
    local = fit(folder, tmp_path / "local.parquet")
    on_dask = fit(folder, tmp_path / "dask.parquet", engine="dask", client=client)
    assert_same(on_dask, local)
    keys, expected = reference(table)
    assert list(local.keys) == keys
    np.testing.assert_allclose(local.params.numpy(), expected.params.numpy(), rtol=1e-12)
    written = pq.read_table(tmp_path / "dask.parquet")
    assert written.column("key").to_pylist() == keys


def test_a_worker_killed_mid_run_costs_a_retry(client, tmp_path):
    table = gaussian_rows(400, seed=5)
    folder = split_dataset(tmp_path / "data", table, [3000, 6000], 61)
    out, parts = tmp_path / "killed.parquet", tmp_path / "killed.parquet.parts"
    pids = client.run(os.getpid)
    outcome = {}

    def run():
        outcome["result"] = fit(folder, out, engine="dask", client=client)

    thread = threading.Thread(target=run)
    thread.start()
    deadline = time.monotonic() + 60
    while not any(parts.glob("part-*")) and time.monotonic() < deadline and thread.is_alive():
        time.sleep(0.005)
    victim = sorted(pids.values())[0]
    os.kill(victim, signal.SIGKILL)
    thread.join(timeout=120)
    assert not thread.is_alive()
    result = outcome["result"]
    keys, expected = reference(table)
    assert list(result.keys) == keys  # every group once
    np.testing.assert_allclose(result.params.numpy(), expected.params.numpy(), rtol=1e-12)


def test_a_local_run_resumed_on_dask_equals_a_fresh_run(client, dataset, tmp_path):
    folder, _ = dataset
    parts = tmp_path / "run.parquet.parts"
    stopped = fit(folder, tmp_path / "run.parquet",
                  stop=lambda: len(list(parts.glob("part-*"))) >= 3)  # fmt: skip
    assert stopped is None
    kept = {p.name: p.stat().st_mtime_ns for p in parts.glob("part-*")}
    resumed = fit(folder, tmp_path / "run.parquet", resume=True, engine="dask", client=client)
    assert_same(resumed, fit(folder, tmp_path / "fresh.parquet"))
    # a changed run is refused on Dask as well
    stopped = fit(folder, tmp_path / "again.parquet",
                  stop=lambda: any((tmp_path / "again.parquet.parts").glob("part-*")))  # fmt: skip
    with pytest.raises(gf.OptionError, match="for loss 'mse', not 'huber'"):
        fit(folder, tmp_path / "again.parquet", resume=True, engine="dask", client=client,
            loss="huber")  # fmt: skip
    assert kept  # the finished parts were there to skip


def test_bad_input_on_a_worker_is_one_error_naming_the_file(client, dataset, tmp_path):
    _folder, table = dataset
    bad = split_dataset(tmp_path / "bad", table, [900, 1800], 53)
    pq.write_table(table.slice(1800).drop_columns(["x"]), bad / "part-2.parquet")
    with pytest.raises(gf.DataError, match=r"part-2\.parquet: no column 'x'; columns are key, y"):
        fit(bad, tmp_path / "o.parquet", engine="dask", client=client)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad"]


def test_fit_many_on_a_dask_data_frame(client, dataset):
    dd = pytest.importorskip("dask.dataframe")
    _, table = dataset
    frame = dd.from_pandas(table.to_pandas(), npartitions=4)  # partitions cut through groups
    keys, expected = reference(table)
    for engine, where in (("local", None), ("dask", client)):
        result = gf.fit_many(frame, group="key", x="x", y="y", model="gaussian", engine=engine,
                             client=where)  # fmt: skip
        assert list(result.keys) == keys
        np.testing.assert_allclose(result.params.numpy(), expected.params.numpy(), rtol=1e-12)


def test_a_scheduler_and_worker_processes_started_here(external, dataset, tmp_path):
    folder, _ = dataset
    out = tmp_path / "params"
    args = ["fit-many", str(folder), "--group", "key", "--model", "gaussian", "--chunk-size",
            "3", "--engine", "dask", "--scheduler", external, "--out", f"{out}/"]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "Dask workers ran the compiled (Numba) LM kernel" in result.stderr
    local = fit(folder, tmp_path / "local.parquet")
    # a folder output lists its parts in task order: compare group by group
    written = gf.BatchResult.from_table(ds.dataset(out).to_table(), "key")
    where = {key: i for i, key in enumerate(written.keys)}
    rows = [where[key] for key in local.keys]
    assert len(written) == len(local)
    np.testing.assert_allclose(written.params.numpy()[rows], local.params.numpy(), rtol=1e-12,
                               atol=0)  # fmt: skip


def test_a_worker_on_the_pytorch_kernel_is_a_warning(capsys):
    engine = DaskEngine(client=None)
    engine.kernels = {"tcp://a:1": "numba", "tcp://b:2": "pytorch"}
    engine._report_kernels()
    line = capsys.readouterr().err.strip()
    assert line.startswith("warning: 1 of 2 Dask workers ran the PyTorch LM kernel")
    assert line.endswith("tcp://b:2")
