"""fit-many at scale: fits/s of the local engine, of a 2-worker LocalCluster and of xarray's
``curvefit`` and astropy's ``parallel_fit_dask`` on dask (sample-timed; astropy where it is
installed), and the local engine's peak RSS at two input sizes.

The input is generated Parquet (Gaussian curves, one row per point, row groups of 2^20
rows, so groups straddle row groups) in a temporary folder. The local engine runs in a
subprocess whose ``VmHWM`` is its whole peak (torch, the kernel and the reading included).
Run (Linux):
    .venv/bin/python benchmarks/bench_fit_many.py [--groups 200000] [--points 100]
        [--rss-rows 2000000 20000000] [--curvefit-sample 1000] [--skip-dask]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROW_GROUP = 1 << 20


def gaussians(first: int, count: int, points: int, seed: int) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed + first)
    x = np.linspace(-4, 4, points)
    amplitude = rng.uniform(1, 3, (count, 1))
    center = rng.uniform(-1, 1, (count, 1))
    width = rng.uniform(0.5, 1.5, (count, 1))
    y = amplitude * np.exp(-((x - center) ** 2) / (2 * width**2)) + 0.1
    y = y + rng.normal(0, 0.02, y.shape)
    keys = np.repeat(np.arange(first, first + count, dtype=np.int64), points)
    return keys, np.tile(x, count), y.ravel()


def write_input(path: Path, groups: int, points: int, seed: int = 0) -> Path:
    """``groups`` Gaussian curves of ``points`` points, written a slice at a time."""
    step = max(ROW_GROUP // points, 1)
    schema = pa.schema([("pixel", pa.int64()), ("t", pa.float64()), ("signal", pa.float64())])
    with pq.ParquetWriter(path, schema) as writer:
        for first in range(0, groups, step):
            keys, x, y = gaussians(first, min(step, groups - first), points, seed)
            writer.write_table(pa.table([keys, x, y], schema=schema), row_group_size=ROW_GROUP)
    return path


LOCAL_RUN = """
import json, sys, time
from gradfit.batch.many import run_fit_many
import gradfit as gf
start = time.perf_counter()
result = run_fit_many(sys.argv[1], model=gf.Model("gaussian"), group="pixel", x="t",
                      y="signal", sigma=None, out=sys.argv[2], overwrite=True)
seconds = time.perf_counter() - start
# VmHWM: this process's own peak; ru_maxrss would also count the parent's RSS at the fork
with open("/proc/self/status") as status:
    peak = next(int(l.split()[1]) for l in status if l.startswith("VmHWM")) / 1024
converged = int(result.converged.sum())
print(json.dumps({"seconds": seconds, "groups": len(result), "peak_mib": peak,
                  "converged": converged}))
"""


WARM = """
import numpy as np
from gradfit.batch.fit_batch import fit_batch
x = np.linspace(-2, 2, 9)
fit_batch("gaussian", x, np.exp(-x[None] ** 2))
"""


def run_local(data: Path, out: Path) -> dict[str, float]:
    """The local engine in a fresh process: seconds, groups and its peak RSS (MiB). A process
    before it fills Numba's cache: compiling the kernel (after an edit of it) costs ~0.4 GB
    once, which is not the engine's working memory."""
    subprocess.run([sys.executable, "-c", WARM], check=True)
    done = subprocess.run([sys.executable, "-c", LOCAL_RUN, str(data), str(out)],
                          capture_output=True, text=True, check=True)  # fmt: skip
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def run_dask(data: Path, out: Path, workers: int) -> tuple[float, float, int, float, float | None]:
    """(cluster start-up seconds, fit seconds, groups, curvefit fits/s, astropy fits/s or
    None where astropy is not installed) on a LocalCluster."""
    import gradfit as gf
    from gradfit.batch.dask_engine import DaskEngine
    from gradfit.batch.many import run_fit_many

    start = time.perf_counter()
    with DaskEngine.open(workers=workers, scheduler=None, client=None) as engine:
        ready = time.perf_counter()
        result = run_fit_many(data, model=gf.Model("gaussian"), group="pixel", x="t",
                              y="signal", sigma=None, out=out, overwrite=True, engine="dask",
                              client=engine.client)  # fmt: skip
        fitted = time.perf_counter()
        curvefit = run_curvefit(engine.client, data)
        astropy = run_astropy(data)
    return ready - start, fitted - ready, len(result), curvefit, astropy


SAMPLE = [300]


def run_curvefit(client: object, data: Path) -> float:
    """fits/s of ``DataArray.curvefit`` on a dask array of the first SAMPLE curves."""
    import dask.array as da
    import xarray as xr

    table = pq.read_table(data, columns=["t", "signal"]).slice(0, SAMPLE[0] * POINTS[0])
    y = table.column("signal").to_numpy().reshape(SAMPLE[0], POINTS[0])
    x = table.column("t").to_numpy()[: POINTS[0]]

    def gaussian(t, amplitude, center, width, offset):
        return amplitude * np.exp(-((t - center) ** 2) / (2 * width**2)) + offset

    p0 = {"amplitude": 2, "center": 0, "width": 1, "offset": 0}
    chunks = (max(SAMPLE[0] // 2, 1), -1)  # one chunk per worker
    cube = xr.DataArray(da.from_array(y, chunks=chunks), dims=("pixel", "t"), coords={"t": x})
    cube.curvefit("t", gaussian, p0=p0).compute()  # warm-up: SciPy imported on every worker
    start = time.perf_counter()
    fitted = cube.curvefit("t", gaussian, p0=p0).compute()
    seconds = time.perf_counter() - start
    assert fitted.curvefit_coefficients.shape[0] == SAMPLE[0]
    return SAMPLE[0] / seconds


def run_astropy(data: Path) -> float | None:
    """fits/s of astropy's ``parallel_fit_dask`` on the same SAMPLE curves, on the running
    Dask client (None without astropy: a benchmark reference only, not a dependency)."""
    try:
        from astropy.modeling import fitting, models
    except ImportError:
        return None
    table = pq.read_table(data, columns=["t", "signal"]).slice(0, SAMPLE[0] * POINTS[0])
    y = table.column("signal").to_numpy().reshape(SAMPLE[0], POINTS[0])
    x = table.column("t").to_numpy()[: POINTS[0]]
    model = models.Gaussian1D(amplitude=2, mean=0, stddev=1) + models.Const1D(0)

    def fit() -> object:
        return fitting.parallel_fit_dask(
            model=model, fitter=fitting.TRFLSQFitter(), data=y, fitting_axes=1, world=(x,),
            scheduler="default", chunk_n_max=max(SAMPLE[0] // 2, 1),
        )  # fmt: skip

    fit()  # warm-up: astropy imported on every worker
    start = time.perf_counter()
    fit()
    return SAMPLE[0] / (time.perf_counter() - start)


POINTS = [100]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--groups", type=int, default=200_000)
    parser.add_argument("--points", type=int, default=100)
    parser.add_argument("--rss-rows", type=int, nargs="+", default=[2_000_000, 20_000_000])
    parser.add_argument("--curvefit-sample", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--skip-dask", action="store_true")
    args = parser.parse_args()
    POINTS[0], SAMPLE[0] = args.points, args.curvefit_sample
    with tempfile.TemporaryDirectory(prefix="bench-fit-many-") as tmp:
        folder = Path(tmp)
        data = write_input(folder / "pixels.parquet", args.groups, args.points)
        rows = args.groups * args.points
        print(f"input: {args.groups:,} Gaussian groups x {args.points} points = {rows:,} rows")
        local = run_local(data, folder / "local.parquet")
        local_rate = local["groups"] / local["seconds"]
        peak, converged = local["peak_mib"], local["converged"]
        print(f"local engine:         {local_rate:9,.0f} fits/s ({local['seconds']:.1f} s, "
              f"peak RSS {peak:.0f} MiB, {converged:,} converged)")  # fmt: skip
        if not args.skip_dask:
            startup, seconds, groups, curvefit, astropy = run_dask(
                data, folder / "dask.parquet", args.workers
            )
            print(f"LocalCluster {args.workers} workers: {groups / seconds:9,.0f} fits/s "
                  f"({seconds:.1f} s, + {startup:.1f} s cluster start-up), "
                  f"{groups / seconds / local_rate:.2f}x local")  # fmt: skip
            print(f"xarray curvefit/dask: {curvefit:9,.0f} fits/s (sample of {SAMPLE[0]} "
                  f"curves), local engine is {local_rate / curvefit:.0f}x faster")  # fmt: skip
            if astropy is None:
                print("astropy parallel_fit_dask: skipped (astropy not installed)")
            else:
                print(f"astropy parallel_fit_dask: {astropy:9,.0f} fits/s (same sample), "
                      f"local engine is {local_rate / astropy:.0f}x faster")  # fmt: skip
        for size in args.rss_rows:
            groups = size // args.points
            path = write_input(folder / f"rss-{size}.parquet", groups, args.points, seed=1)
            measured = run_local(path, folder / f"rss-{size}-out.parquet")
            peak, seconds = measured["peak_mib"], measured["seconds"]
            print(f"peak RSS, local engine, {size:>12,} rows: {peak:6.0f} MiB "
                  f"({seconds:.1f} s, {groups / seconds:,.0f} fits/s)")  # fmt: skip
            path.unlink()


if __name__ == "__main__":
    main()
