"""Fits per second on an xarray cube: the gradfit accessor (NumPy- and Dask-backed) vs
``DataArray.curvefit`` on the same cube, and how far their answers agree.

The cube: ``(y, x, t)`` Gaussians plus noise, float64, a rough per-pixel start (``p0`` as
DataArrays, which both accept). ``curvefit`` (SciPy's ``curve_fit`` pixel by pixel) is timed
on the first ``--sample-rows`` rows and scaled to fits/s, on NumPy and on Dask (threads).
Agreement, on those rows: the share of pixels where both converged (gradfit: status
``converged``; curvefit: a finite answer) whose parameters are within 1e-6 of each other
(relative, with a floor of 1e-3), and each one's share within 1e-6 of a tight reference
(``curve_fit`` with the analytic Jacobian and tolerances of 1e-15) on 300 of those pixels.

Run: .venv/bin/python benchmarks/bench_xarray.py [--ny 100 --nx 200 --n 50]
     [--chunk-rows 25] [--workers 2] [--sample-rows 5] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import time
import warnings

import dask
import numpy as np
import torch
import xarray as xr
from scipy.optimize import curve_fit

import gradfit.xarray  # noqa: F401  (registers DataArray.gradfit)

NAMES = ("amplitude", "center", "width", "offset")


def gaussian(t, amplitude, center, width, offset):
    return amplitude * np.exp(-((t - center) ** 2) / (2 * width**2)) + offset


def gaussian_jac(t, amplitude, center, width, offset):
    e = np.exp(-((t - center) ** 2) / (2 * width**2))
    d = t - center
    return np.stack(
        [e, amplitude * e * d / width**2, amplitude * e * d**2 / width**3, np.ones_like(t)], 1
    )


def make_cube(ny: int, nx: int, n: int, seed: int = 0) -> tuple[xr.DataArray, dict]:
    rng = np.random.default_rng(seed)
    t = np.linspace(-5, 5, n)
    truth = {
        "amplitude": rng.uniform(2, 5, (ny, nx)), "center": rng.uniform(-1, 1, (ny, nx)),
        "width": rng.uniform(0.7, 1.5, (ny, nx)), "offset": rng.uniform(-0.5, 0.5, (ny, nx)),
    }  # fmt: skip
    values = gaussian(t, *(truth[k][..., None] for k in NAMES))
    values = values + rng.normal(0, 0.1, values.shape)
    coords = {"y": np.arange(ny), "x": np.arange(nx), "t": t}
    cube = xr.DataArray(values, dims=("y", "x", "t"), coords=coords)
    start = {  # rough per-pixel starts, as bench_batch.py uses
        "amplitude": truth["amplitude"] * 0.8, "center": truth["center"] + 0.3,
        "width": truth["width"] * 1.2, "offset": truth["offset"] * 0.0,
    }  # fmt: skip
    p0 = {
        k: xr.DataArray(v, dims=("y", "x"), coords=cube.isel(t=0).coords) for k, v in start.items()
    }
    return cube, {k: v.drop_vars("t") for k, v in p0.items()}


def best_of(repeats: int, run):
    best, out = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        out = run()
        best = min(best, time.perf_counter() - start)
    return best, out


def params_of(ds: xr.Dataset, kind: str) -> np.ndarray:
    """``[pixels, 4]`` parameters in NAMES order."""
    if kind == "gradfit":
        return np.stack([ds[k].values.ravel() for k in NAMES], axis=1)
    coefficients = ds["curvefit_coefficients"].transpose("y", "x", "param")
    return coefficients.sel(param=list(NAMES)).values.reshape(-1, len(NAMES))


def within(a: np.ndarray, b: np.ndarray, rtol: float = 1e-6) -> np.ndarray:
    return np.all(np.abs(a - b) <= rtol * np.maximum(np.abs(b), 1e-3), axis=1)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ny", type=int, default=100)
    parser.add_argument("--nx", type=int, default=200)
    parser.add_argument("--n", type=int, default=50)
    parser.add_argument("--chunk-rows", type=int, default=25)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--sample-rows", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    cube, p0 = make_cube(args.ny, args.nx, args.n)
    K = args.ny * args.nx
    threads = (torch.get_num_threads(), os.getenv("OMP_NUM_THREADS"))
    print(
        f"cube {args.ny}x{args.nx} pixels x {args.n} points ({K:,} curves), float64; "
        f"torch {torch.__version__} with {threads[0]} threads; Dask threads scheduler, "
        f"{args.workers} workers, blocks of {args.chunk_rows}x{args.nx} pixels"
    )
    cube.isel(y=slice(0, 2)).gradfit.fit("gaussian", dim="t")  # warm-up (kernel cache)

    def ours_numpy():
        return cube.gradfit.fit("gaussian", dim="t", p0=p0)

    chunked = cube.chunk({"y": args.chunk_rows, "x": -1, "t": -1})
    p0_chunked = {k: v.chunk({"y": args.chunk_rows}) for k, v in p0.items()}

    def ours_dask():
        lazy = chunked.gradfit.fit("gaussian", dim="t", p0=p0_chunked)
        return lazy.compute(scheduler="threads", num_workers=args.workers)

    t_np, ds_np = best_of(args.repeats, ours_numpy)
    t_da, ds_da = best_of(args.repeats, ours_dask)
    rows = slice(0, args.sample_rows)
    sample = cube.isel(y=rows)
    p0_sample = {k: v.isel(y=rows) for k, v in p0.items()}

    def theirs_numpy():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # curve_fit's OptimizeWarning on hard pixels
            return sample.curvefit("t", gaussian, p0=p0_sample, errors="ignore")

    def theirs_dask():
        chunked_sample = sample.chunk({"y": 1, "x": -1, "t": -1})
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fit = chunked_sample.curvefit("t", gaussian, p0=p0_sample, errors="ignore")
            return fit.compute(scheduler="threads", num_workers=args.workers)

    t_cf, ds_cf = best_of(min(args.repeats, 2), theirs_numpy)
    t_cfd, _ = best_of(min(args.repeats, 2), theirs_dask)
    k_sample = sample.sizes["y"] * sample.sizes["x"]
    rate_cf, rate_cfd = k_sample / t_cf, k_sample / t_cfd
    print(f"  gradfit accessor, NumPy-backed : {K / t_np:10,.0f} fits/s ({t_np:6.2f} s)"
          f"  {K / t_np / rate_cf:6.1f}x curvefit")  # fmt: skip
    print(f"  gradfit accessor, Dask threads : {K / t_da:10,.0f} fits/s ({t_da:6.2f} s)"
          f"  {K / t_da / rate_cf:6.1f}x curvefit")  # fmt: skip
    print(f"  DataArray.curvefit, NumPy      : {rate_cf:10,.0f} fits/s (on {k_sample:,} pixels)")
    print(f"  DataArray.curvefit, Dask       : {rate_cfd:10,.0f} fits/s (on {k_sample:,} pixels)")
    same = all(np.array_equal(ds_np[v].values, ds_da[v].values) for v in NAMES)
    ours = params_of(ds_np.isel(y=rows), "gradfit")
    theirs = params_of(ds_cf, "curvefit")
    converged = ds_np["status"].isel(y=rows).values.ravel() == "converged"
    both = converged & np.isfinite(theirs).all(axis=1)
    agree = within(ours[both], theirs[both]).mean()
    print(f"  NumPy- and Dask-backed parameters bit-identical: {same}")
    print(f"  converged: gradfit {converged.mean():.1%}, curvefit "
          f"{np.isfinite(theirs).all(axis=1).mean():.1%} of the sample; where both: "
          f"{agree:.1%} within 1e-6 of each other")  # fmt: skip
    pick = np.random.default_rng(1).choice(np.flatnonzero(both), min(300, both.sum()), False)
    values, t = sample.values.reshape(-1, args.n), sample["t"].values
    starts = np.stack([p0_sample[k].values.ravel() for k in NAMES], axis=1)
    tight = np.array([
        curve_fit(gaussian, t, values[i], p0=starts[i], jac=gaussian_jac, xtol=1e-15,
                  ftol=1e-15, gtol=1e-15, maxfev=10_000)[0] for i in pick
    ])  # fmt: skip
    near = within(ours[pick], tight).mean(), within(theirs[pick], tight).mean()
    print(f"  within 1e-6 of a tight SciPy reference ({len(pick)} pixels): gradfit "
          f"{near[0]:.1%}, curvefit {near[1]:.1%}")  # fmt: skip
    after = (torch.get_num_threads(), os.getenv("OMP_NUM_THREADS"))
    print(f"  client torch threads / OMP_NUM_THREADS before {threads}, after {after}")


if __name__ == "__main__":
    with dask.config.set({"array.slicing.split_large_chunks": False}):
        main()
