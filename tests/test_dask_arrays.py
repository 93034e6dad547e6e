"""``fit_batch`` on Dask arrays: lazy until computed, the same numbers as on NumPy arrays."""

import os
import threading

import numpy as np
import pytest
import torch

import gradfit as gf
from gradfit.batch import dask_arrays
from gradfit.errors import DataError, ModelError, OptionError

dask = pytest.importorskip("dask")
da = pytest.importorskip("dask.array")

FIELDS = ("params", "stderr", "loss", "reduced_chi2", "r2", "n_points", "n_iter", "status")


def _curves(K=240, N=30, seed=0):
    """Noisy Gaussians with missing points, one curve without data and one with too few."""
    rng = np.random.default_rng(seed)
    x = np.linspace(-3, 3, N)
    a, c, w = rng.uniform(1, 3, K), rng.uniform(-1, 1, K), rng.uniform(0.5, 1.2, K)
    Y = a[:, None] * np.exp(-((x - c[:, None]) ** 2) / (2 * w[:, None] ** 2))
    Y += 0.05 * rng.standard_normal((K, N))
    Y[rng.random((K, N)) < 0.1] = np.nan
    Y[7] = np.nan  # no_data
    Y[11, 3:] = np.nan  # 3 points for 4 parameters: too_few_points
    return x, Y


def _assert_same(got, want):
    """Every per-curve array bit for bit (NaN where NaN), and the same metadata."""
    for name in FIELDS:
        a, b = getattr(got, name), getattr(want, name)
        assert a.dtype == b.dtype, name
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=name)
    assert got.param_names == want.param_names
    assert (got.optimizer, got.loss_name, got.fixed) == (want.optimizer, want.loss_name, want.fixed)
    assert got.status_names == want.status_names
    assert list(got.warning_texts()) == list(want.warning_texts())


@pytest.fixture
def no_compute(monkeypatch):
    """Any computation fails, and every block fitted is counted."""
    calls = []
    real = dask_arrays.fit_block

    def counted(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    def refuse(*args, **kwargs):
        raise AssertionError("something was computed")

    monkeypatch.setattr(dask_arrays, "fit_block", counted)
    with dask.config.set(scheduler=refuse):
        yield calls


def test_lazy_equals_fit_batch_on_numpy(no_compute):
    x, Y = _curves()
    want = gf.fit_batch("gaussian", x, Y)
    assert set(want.status_names) >= {"converged", "no_data", "too_few_points"}
    lazy = gf.fit_batch("gaussian", x, da.from_array(Y, chunks=(50, 10)))  # points joined
    assert isinstance(lazy, dask_arrays.LazyBatchResult) and len(lazy) == len(Y)
    assert lazy.table.numblocks == (5, 1)
    parts = (lazy.params, lazy.converged, lazy.status, lazy.stderr, lazy.n_iter)
    assert [p.shape for p in parts] == [(240, 4), (240,), (240,), (240, 4), (240,)]
    assert no_compute == []  # nothing fitted in the client, not even to learn the output type
    got = lazy.compute(scheduler="sync")
    assert sorted(no_compute) == [(40, 30)] + [(50, 30)] * 4
    _assert_same(got, want)
    converged, params = dask.compute(lazy.converged, lazy.params, scheduler="sync")
    np.testing.assert_array_equal(converged, want.converged.numpy())
    np.testing.assert_array_equal(params, want.params.numpy())


def test_per_curve_inputs_and_options_blocked_like_y():
    x, Y = _curves(K=90, N=25, seed=1)
    rng = np.random.default_rng(2)
    X = x + 0.01 * rng.standard_normal(Y.shape)  # per-curve x, lazy
    sigma = rng.uniform(0.04, 0.06, Y.shape)  # per-curve sigma, NumPy
    p0 = np.column_stack([np.full(90, 2.0), np.zeros(90), np.ones(90), np.zeros(90)])
    mask = rng.random(Y.shape) > 0.05
    options = dict(loss="huber", f_scale=0.1, fixed={"offset": 0.0}, bounds={"width": (0.1, 5)})
    want = gf.fit_batch("gaussian", X, Y, sigma=sigma, mask=mask, p0=p0, **options)
    lazy = gf.fit_batch(
        "gaussian", da.from_array(X, chunks=(40, 25)), da.from_array(Y, chunks=(30, 25)),
        sigma=sigma, mask=da.from_array(mask, chunks=(45, 25)), p0=p0, **options,
    )  # fmt: skip
    _assert_same(lazy.compute(scheduler="threads"), want)


def test_p0_mapping_ties_and_float32():
    x, Y = _curves(K=60, N=30, seed=3)
    options = dict(p0={"width": 1.0}, dtype=torch.float32, tol=1e-6)
    # float32 runs the PyTorch LM kernel, whose last bits depend on the curves it runs with
    # (fit_batch's own chunking changes them too): the same curves per chunk as per block
    want = gf.fit_batch("gaussian", x, Y, chunk_size=25, **options)
    got = gf.fit_batch("gaussian", x, da.from_array(Y, chunks=(25, 30)), **options)
    _assert_same(got.compute(scheduler="sync"), want)
    two = "a1*exp(-(x-c1)**2) + a2*exp(-(x-c2)**2)"
    tied = dict(ties={"a2": "a1"}, p0=[1.0, -0.5, 1.0, 0.5])
    want = gf.fit_batch(two, x, Y, chunk_size=25, **tied)  # batched delta-method stderr
    got = gf.fit_batch(two, x, da.from_array(Y, chunks=(25, 30)), **tied)
    _assert_same(got.compute(scheduler="sync"), want)


def _thread_count_in_new_thread():
    seen = []
    thread = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
    thread.start()
    thread.join()
    return seen[0]


def test_one_torch_thread_in_tasks_and_client_unchanged(monkeypatch):
    from gradfit.batch import fit_batch as module

    inside = []
    real = module.fit_batch

    def recording(*args, **kwargs):
        inside.append(torch.get_num_threads())
        return real(*args, **kwargs)

    monkeypatch.setattr(module, "fit_batch", recording)
    x, Y = _curves(K=120, N=20, seed=4)
    before = (torch.get_num_threads(), _thread_count_in_new_thread(), os.getenv("OMP_NUM_THREADS"))
    lazy = gf.fit_batch("gaussian", x, da.from_array(Y, chunks=(20, 20)))
    lazy.compute(scheduler="threads", num_workers=3)
    after = (torch.get_num_threads(), _thread_count_in_new_thread(), os.getenv("OMP_NUM_THREADS"))
    assert inside == [1] * 6
    assert after == before


@pytest.mark.parametrize(
    ("call", "error", "words"),
    [
        (lambda Y: gf.fit_batch("gaussian", np.arange(5.0), Y[0]), DataError, "[K, N]"),
        (lambda Y: gf.fit_batch("gaussian", np.arange(4.0), Y), DataError, "x must be [N]"),
        (lambda Y: gf.fit_batch("gausian", np.arange(5.0), Y), ModelError, "gausian"),
        (lambda Y: gf.fit_batch("gaussian", np.arange(5.0), Y, p0=[1, 2]), OptionError, "p0"),
        (
            lambda Y: gf.fit_batch("gaussian", np.arange(5.0), Y, p0={"centre": 1}),
            OptionError,
            "did you mean 'center'",
        ),
        (lambda Y: gf.fit_batch("gaussian", np.arange(5.0), Y, out="a.csv"), OptionError, "out"),
        (lambda Y: gf.fit_batch("gaussian", np.arange(5.0), Y, loss="chi2"), OptionError, "sigma"),
        (
            lambda Y: gf.fit_batch("gaussian", np.arange(5.0), Y, fixed={"wdth": 1}),
            OptionError,
            "wdth",
        ),
        (
            lambda Y: gf.fit_batch("gaussian", np.arange(5.0), Y[Y[:, 0] > 0]),
            DataError,
            "unknown length",
        ),
    ],
)
def test_bad_input_refused_before_anything_runs(no_compute, call, error, words):
    Y = da.from_array(np.ones((6, 5)), chunks=(3, 5))
    with pytest.raises(error) as raised:
        call(Y)
    assert words in str(raised.value)
    assert no_compute == []


def test_core_imports_no_optional_extra_at_import_time():
    """Read from the source (as test_imports.py reads the graph): neither ``import gradfit``
    nor fit_batch with its Dask dispatch load dask, distributed, xarray or pandas."""
    import ast

    from test_imports import _graph, _modules, _runtime_imports

    graph, modules = _graph(), _modules()
    todo, seen = ["gradfit", "gradfit.batch.fit_batch", "gradfit.batch.dask_arrays"], set()
    while todo:
        module = todo.pop()
        parents = [".".join(module.split(".")[:i]) for i in range(1, module.count(".") + 1)]
        for name in [module, *parents]:
            if name not in seen:
                seen.add(name)
                todo.extend(graph[name])
    extras = ("dask", "distributed", "xarray", "pandas")
    for module in sorted(seen):
        for node in _runtime_imports(ast.parse(modules[module].read_text()).body):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            assert not [n for n in names if n.split(".")[0] in extras], module
    assert "gradfit.optim.lm" in seen  # the closure was followed


def test_graph_survives_pickling_for_worker_processes():
    """What a process-based cluster ships: the tasks, pickled with their model and options."""
    cloudpickle = pytest.importorskip("cloudpickle")
    x, Y = _curves(K=50, N=20, seed=6)
    want = gf.fit_batch("gaussian", x, Y)
    lazy = gf.fit_batch("gaussian", x, da.from_array(Y, chunks=(20, 20)))
    shipped = cloudpickle.loads(cloudpickle.dumps(lazy))
    _assert_same(shipped.compute(scheduler="sync"), want)


def test_local_cluster_equals_numpy():
    """A distributed cluster (in-process workers: fast) gives the same numbers, one torch
    thread per worker thread, and the client's thread count is what it was. (Starting a
    LocalCluster sets OMP_NUM_THREADS=1 in the client's own environment, distributed's doing:
    this test puts it back.)"""
    distributed = pytest.importorskip("distributed")
    x, Y = _curves(K=80, N=20, seed=5)
    want = gf.fit_batch("gaussian", x, Y)
    env = os.environ.get("OMP_NUM_THREADS")
    try:
        with (
            distributed.LocalCluster(
                n_workers=1, threads_per_worker=2, processes=False, dashboard_address=":0"
            ) as cluster,
            distributed.Client(cluster),
        ):
            before = (torch.get_num_threads(), _thread_count_in_new_thread())
            lazy = gf.fit_batch("gaussian", x, da.from_array(Y, chunks=(20, 20))).persist()
            got = lazy.compute()
            assert (torch.get_num_threads(), _thread_count_in_new_thread()) == before
    finally:
        if env is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = env
    _assert_same(got, want)
