"""`fit_batch` equals `fit` curve by curve; statuses; output tables; long-form packing."""

import math
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

import gradfit as gf
from gradfit.batch.many import pack_groups

GAUSSIAN = "amplitude*exp(-(x - center)**2/(2*width**2)) + offset"


def ragged_gaussians(K, N, seed):
    """K noisy Gaussian peaks on a shared grid, some rows NaN-padded to unequal lengths."""
    rng = np.random.default_rng(seed)
    x = np.linspace(-4, 4, N)
    truth = np.column_stack(
        [
            rng.uniform(1, 3, K),
            rng.uniform(-1, 1, K),
            rng.uniform(0.5, 1.5, K),
            rng.uniform(-0.2, 0.2, K),
        ]
    )
    y = truth[:, :1] * np.exp(-((x - truth[:, 1:2]) ** 2) / (2 * truth[:, 2:3] ** 2))
    y = y + truth[:, 3:] + rng.normal(0, 0.05, (K, N))
    lengths = rng.integers(N // 2, N + 1, K)
    y[np.arange(N)[None, :] >= lengths[:, None]] = np.nan  # padding at the end
    return x, y, truth


def assert_same_fit(batch_row, single, rtol=1e-7):
    for name, value in single.params.items():
        assert batch_row["params"][name] == pytest.approx(value, rel=rtol, abs=1e-10), name
        err = single.stderr[name]
        assert batch_row["stderr"][name] == pytest.approx(err, rel=1e-5), name
    assert batch_row["loss"] == pytest.approx(single.loss, rel=1e-9)


@pytest.mark.parametrize("model", ["gaussian", GAUSSIAN])
def test_each_curve_equals_fit_on_that_curve_alone(model):
    x, y, _ = ragged_gaussians(K=40, N=60, seed=1)
    p0 = None if model == "gaussian" else [2.0, 0.0, 1.0, 0.0]
    batch = gf.fit_batch(model, x, y, p0=p0)
    assert batch.params.shape == (40, 4)
    for i in np.random.default_rng(0).choice(40, 8, replace=False):
        single = gf.fit(model, x, y[i], p0=p0, nan_policy="omit")
        assert_same_fit(batch[i], single)
        assert batch[i]["n_points"] == single.n_points


def test_per_curve_x_mask_and_sigma():
    rng = np.random.default_rng(5)
    K, N = 12, 30
    x = np.sort(rng.uniform(0, 5, (K, N)), axis=1)
    y = 3 * np.exp(-0.7 * x) + 0.5 + rng.normal(0, 0.02, (K, N))
    sigma = rng.uniform(0.01, 0.05, (K, N))
    mask = rng.uniform(size=(K, N)) > 0.2
    batch = gf.fit_batch("a*exp(-k*x) + c", x, y, sigma=sigma, mask=mask, p0=[1.0, 1.0, 0.0])
    for i in range(0, K, 3):
        keep = mask[i]
        single = gf.fit(
            "a*exp(-k*x) + c", x[i][keep], y[i][keep], sigma=sigma[i][keep], p0=[1.0, 1.0, 0.0]
        )
        assert_same_fit(batch[i], single)


def test_statuses_for_degenerate_and_diverging_curves():
    x = np.linspace(0, 1, 20)
    good = 2 * x**2 - x + 1
    flat = np.full(20, 3.0)  # all-constant y: a quadratic still fits it exactly
    few = np.full(20, np.nan)
    few[:2] = [1.0, 2.0]  # 2 points for 3 parameters
    bad = good.copy()
    y = np.stack([good, flat, few, bad])
    p0 = np.array([[1.0, 0, 0], [1.0, 0, 0], [1.0, 0, 0], [np.nan, 0, 0]])  # NaN start
    result = gf.fit_batch("a*x**2 + b*x + c", x, y, p0=p0)
    names = result.status_names
    assert names[0].startswith("converged") and names[1].startswith("converged")
    assert names[2] == "too_few_points"
    assert names[3] == "non_finite"
    assert result.params[1].tolist() == pytest.approx([0, 0, 3], abs=1e-9)
    # a parameter the model ignores: the others are fitted, its stderr cannot be estimated
    singular = gf.fit_batch(gf.Model("a*x + 0*b"), x, np.stack([good, good]))
    assert all(name.startswith("converged") for name in singular.status_names)
    assert torch.isnan(singular.stderr[:, 1]).all()


def test_a_converged_curve_stops_changing():
    x = np.linspace(0, 1, 30)
    y = np.stack([2 * x + 1, np.sin(7 * x) * 5])  # easy line, awkward wave
    result = gf.fit_batch("a*x + b", x, y)
    alone = gf.fit_batch("a*x + b", x, y[:1])
    assert result.n_iter[0] == alone.n_iter[0]
    torch.testing.assert_close(result.params[0], alone.params[0], rtol=0, atol=0)


def test_bounds_fixed_and_robust_loss_in_batch():
    x, y, _ = ragged_gaussians(K=6, N=50, seed=3)
    batch = gf.fit_batch(
        "gaussian",
        x,
        y,
        bounds={"width": (0, 5)},
        fixed={"offset": 0.0},
        loss="soft_l1",
        f_scale=0.1,
    )
    assert (batch.params[:, 3] == 0).all()
    assert torch.isnan(batch.stderr[:, 3]).all()
    for i in (0, 4):
        single = gf.fit(
            "gaussian",
            x,
            y[i],
            bounds={"width": (0, 5)},
            fixed={"offset": 0.0},
            loss="soft_l1",
            f_scale=0.1,
            nan_policy="omit",
        )
        for name in ("amplitude", "center", "width"):
            assert batch[i]["params"][name] == pytest.approx(single.params[name], rel=1e-7)


def test_chunking_does_not_change_results(tmp_path):
    x, y, _ = ragged_gaussians(K=50, N=40, seed=4)
    whole = gf.fit_batch("gaussian", x, y)
    chunks = []
    chunked = gf.fit_batch("gaussian", x, y, chunk_size=7, on_chunk=lambda s, r: chunks.append(s))
    assert chunks == list(range(0, 50, 7))
    torch.testing.assert_close(chunked.params, whole.params, rtol=1e-12, atol=1e-12)
    path = chunked.to_parquet(tmp_path / "out.parquet")
    table = pq.read_table(path)
    assert table.num_rows == 50
    assert {"amplitude", "amplitude_stderr", "loss", "reduced_chi2", "n_iter", "status"} <= set(
        table.column_names
    )
    assert "50 curves" in chunked.summary()


def test_chunks_side_by_side_on_several_cores_give_the_same_results():
    x, y, _ = ragged_gaussians(K=60, N=40, seed=6)
    threads = torch.get_num_threads()
    torch.set_num_threads(3)  # three chunks at a time, whatever this machine has
    try:
        seen: list[str] = []
        record = lambda s, r: seen.append(threading.current_thread().name)  # noqa: E731
        asked: set[str] = set()
        ask = lambda s, e: asked.add(threading.current_thread().name)  # noqa: E731
        side_by_side = gf.fit_batch("gaussian", x, y, chunk_size=6, on_chunk=record, skip_chunk=ask)
        assert any(name.startswith("gradfit-chunk") for name in asked)  # chunks ran on workers
        assert torch.get_num_threads() == 3  # restored after the run
        assert seen == [threading.main_thread().name] * 10  # results arrive in the caller's thread
        torch.set_num_threads(1)
        one_by_one = gf.fit_batch("gaussian", x, y, chunk_size=6)
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(side_by_side.params, one_by_one.params, rtol=1e-12, atol=1e-12)
    assert torch.equal(side_by_side.status, one_by_one.status)


def test_pack_groups_keeps_keys_and_order():
    keys = np.array([7, 3, 7, 9, 3, 7])
    y = np.arange(6.0)
    unique, packed = pack_groups(keys, {"y": y})
    assert unique.tolist() == [7, 3, 9]
    expected = [[0, 2, 5], [1, 4, math.nan], [3, math.nan, math.nan]]
    np.testing.assert_array_equal(packed["y"], np.array(expected))


@pytest.mark.parametrize("layout", ["contiguous", "equal lengths", "shuffled"])
def test_pack_groups_equals_a_plain_loop(layout):
    rng = np.random.default_rng(3)
    lengths = 6 if layout == "equal lengths" else rng.integers(1, 9, 25)
    keys = np.repeat(rng.permutation(40)[:25].astype(str), lengths)
    if layout == "shuffled":
        keys = keys[rng.permutation(len(keys))]
    y = rng.normal(size=len(keys))
    unique, packed = pack_groups(keys, {"y": y})
    order = list(dict.fromkeys(keys.tolist()))  # first-seen order
    assert unique.tolist() == order
    for row, key in enumerate(order):
        values = y[keys == key]
        np.testing.assert_array_equal(packed["y"][row, : len(values)], values)
        assert np.isnan(packed["y"][row, len(values) :]).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fit_batch_on_cuda_matches_cpu():
    x, y, _ = ragged_gaussians(K=64, N=50, seed=6)
    cpu = gf.fit_batch("gaussian", x, y)
    gpu = gf.fit_batch("gaussian", x, y, device="cuda")
    torch.testing.assert_close(gpu.params.cpu(), cpu.params, rtol=1e-6, atol=1e-8)


def test_heap_reuse_nests_and_unwinds_on_errors():
    from gradfit.batch import malloc as _malloc

    with pytest.raises(RuntimeError), _malloc.reuse_freed_memory():
        with _malloc.reuse_freed_memory():
            assert _malloc._depth == (2 if _malloc._LIBC is not None else 0)
        raise RuntimeError("a failing fit")
    assert _malloc._depth == 0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"mask": np.ones((3, 10), dtype=int)}, r"mask must be a bool array .* int64 \(3, 10\)"),
        ({"mask": np.ones((3, 9), dtype=bool)}, r"mask must be a bool array of shape \(3, 10\)"),
        ({"sigma": np.ones((2, 10))}, r"sigma must be \[K, N\], \[N\] or a number, got \(2, 10\)"),
        ({"p0": np.ones((4, 2))}, r"p0 has 4 rows for 3 curves"),
        ({"x": np.linspace(0, 1, 9)}, r"x must be \[N\] or \[K, N\] like y \(3, 10\)"),
    ],
)
def test_bad_batch_inputs_are_named_before_any_fit(kwargs, message):
    x = np.linspace(0, 1, 10)
    y = np.vstack([2 * x + 1, 3 * x - 1, x])
    fitted: list[int] = []
    with pytest.raises(gf.errors.GradfitError, match=message):
        gf.fit_batch("a*x + b", kwargs.pop("x", x), y, on_chunk=lambda s, r: fitted.append(s),
                     chunk_size=1, **kwargs)  # fmt: skip
    assert fitted == []


def test_a_bad_sigma_in_a_late_chunk_fails_before_the_first_chunk_is_fitted():
    x = np.linspace(0, 1, 10)
    y = np.vstack([2 * x + 1] * 6)
    sigma = np.ones_like(y)
    sigma[4, 7] = -2.0  # curve 4 lies in the third chunk of two curves
    fitted: list[int] = []
    with pytest.raises(gf.errors.DataError, match=r"sigma must be > 0, got -2.0 at curve 4, point"):
        gf.fit_batch("a*x + b", x, y, sigma=sigma, chunk_size=2,
                     on_chunk=lambda s, r: fitted.append(s))  # fmt: skip
    assert fitted == []


def test_inputs_as_lists_numpy_float32_and_tensors_give_one_answer():
    x = np.linspace(0, 1, 12)
    y = np.vstack([2 * x + 1, -x + 3, 0.5 * x])
    y[1, 3] = np.nan
    reference = gf.fit_batch("a*x + b", x, y).params
    for xs, ys in [(x.tolist(), y.tolist()), (torch.tensor(x), torch.tensor(y))]:
        got = gf.fit_batch("a*x + b", xs, ys, chunk_size=2).params
        torch.testing.assert_close(got, reference, rtol=1e-6, atol=1e-9)
    y32 = y.astype(np.float32)  # computed in float64 (the default dtype) all the same
    got = gf.fit_batch("a*x + b", x, y32, chunk_size=2).params
    want = gf.fit_batch("a*x + b", x, y32.astype(np.float64)).params
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-9)
    inputs = y.copy()
    gf.fit_batch("a*x + b", x, y, chunk_size=1)
    np.testing.assert_array_equal(y, inputs)  # the caller's arrays are never written to


def test_concurrent_batches_restore_torch_thread_count():
    x, y, _ = ragged_gaussians(K=40, N=30, seed=8)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with ThreadPoolExecutor(3) as pool:
            runs = [pool.submit(gf.fit_batch, "gaussian", x, y, chunk_size=5) for _ in range(3)]
            results = [run.result() for run in runs]
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
    for result in results[1:]:
        torch.testing.assert_close(result.params, results[0].params, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("suffix", [".parquet", ".csv"])
def test_results_stream_to_a_file_chunk_by_chunk(tmp_path, suffix):
    import pyarrow.csv as pa_csv

    x, y, _ = ragged_gaussians(K=23, N=30, seed=9)
    out = tmp_path / "sub" / f"fits{suffix}"
    rows_seen: list[int] = []

    def watch(start, result):
        rows_seen.append(len(list(tmp_path.glob("sub/*"))))  # only the temporary file so far
        assert not out.exists()

    result = gf.fit_batch("gaussian", x, y, chunk_size=5, out=out, on_chunk=watch)
    assert rows_seen and max(rows_seen) == 1
    table = pq.read_table(out) if suffix == ".parquet" else pa_csv.read_csv(out)
    assert table.column("curve").to_pylist() == list(range(23))
    np.testing.assert_allclose(table.column("amplitude").to_numpy(), result.params[:, 0].numpy())
    assert table.column("status").to_pylist() == result.status_names
    assert [p.name for p in out.parent.iterdir()] == [out.name]  # no temporary file left


def test_an_incomplete_run_leaves_the_previous_file_alone(tmp_path):
    x, y, _ = ragged_gaussians(K=12, N=30, seed=10)
    out = tmp_path / "fits.parquet"
    out.write_bytes(b"previous results")
    gf.fit_batch("gaussian", x, y, chunk_size=4, out=out, skip_chunk=lambda s, e: s == 4)
    with pytest.raises(RuntimeError, match="disk full"):

        def fail(start, result):
            if start == 8:
                raise RuntimeError("disk full")

        gf.fit_batch("gaussian", x, y, chunk_size=4, out=out, on_chunk=fail)
    assert out.read_bytes() == b"previous results"
    assert [p.name for p in tmp_path.iterdir()] == ["fits.parquet"]
    with pytest.raises(gf.OptionError, match=r"use a \.parquet or \.csv file"):
        gf.fit_batch("gaussian", x, y, out=tmp_path / "fits.txt")


def test_missing_y_found_by_the_kernel_equal_an_explicit_mask():
    """With a start given, fit_batch leaves non-finite y values to the compiled kernel's own
    pass: the same fits as the mask path, each the closed-form line through its points."""
    rng = np.random.default_rng(11)
    K, N = 9, 25
    x = np.linspace(-1, 3, N)
    y = 1.5 - 0.7 * x + rng.normal(0, 0.1, (K, N))
    y[1, [0, 5, 24]] = np.nan  # holes, then a whole curve: x must be gathered again
    y[3, 7] = np.inf
    y[4, :] = np.nan  # no data
    y[6, 1:] = -np.inf  # one point for two parameters
    y[7, ::2] = np.nan
    found = gf.fit_batch("a*x + b", x, y, p0=[1.0, 1.0])
    masked = gf.fit_batch("a*x + b", x, y, mask=np.isfinite(y), p0=[1.0, 1.0])
    status = found.status_names
    assert status[4] == "no_data" and status[6] == "too_few_points"
    assert status == masked.status_names
    torch.testing.assert_close(found.params, masked.params, equal_nan=True, rtol=1e-12, atol=0)
    torch.testing.assert_close(found.stderr, masked.stderr, equal_nan=True, rtol=1e-9, atol=0)
    assert found.n_points.tolist() == np.isfinite(y).sum(1).tolist()
    for k in (0, 1, 2, 3, 5, 7, 8):
        keep = np.isfinite(y[k])
        slope, intercept = np.polyfit(x[keep], y[k][keep], 1)
        assert found.params[k].tolist() == pytest.approx([slope, intercept], rel=1e-9)


@pytest.mark.parametrize("bounds", [None, {"a": (-5.0, 5.0)}])
@pytest.mark.parametrize("hole", [False, True])
def test_chunks_filled_in_place_equal_one_chunk(bounds, hole):
    """The compiled kernel's chunks fill the batch's own arrays (no concatenation, unless a
    chunk's rows were replaced, as for a curve with too few points): the same result as one
    chunk, whatever the chunking."""
    rng = np.random.default_rng(3)
    x = np.linspace(0, 2, 15)
    y = 0.8 * x[None, :] - 0.3 + rng.normal(0, 0.05, (23, 15))
    if hole:
        y[9, 1:] = np.nan  # one point left: too few, its chunk's rows are replaced
    whole = gf.fit_batch("a*x + b", x, y, p0=[1.0, 0.0], bounds=bounds, chunk_size=23)
    for chunk in (1, 4, 10):
        chunked = gf.fit_batch("a*x + b", x, y, p0=[1.0, 0.0], bounds=bounds, chunk_size=chunk)
        assert chunked.status_names == whole.status_names
        for name in ("params", "stderr", "loss", "n_iter", "reduced_chi2", "r2", "n_points"):
            torch.testing.assert_close(
                getattr(chunked, name), getattr(whole, name), rtol=0, atol=0, equal_nan=True
            )
    assert (whole.status_names[9] == "too_few_points") == hole
