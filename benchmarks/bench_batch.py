"""Fits per second for many curves: gradfit.fit_batch vs SciPy curve_fit and lmfit in a loop.

Same generated data for all: K curves of 100 points, float64, the quadratic and a 4-parameter
Gaussian written as expression strings. Accuracy: the fraction of a sample of curves whose
gradfit parameters lie within 1e-6 (relative) of SciPy's answer (SciPy run with the analytic
Jacobian and tight tolerances on that sample). SciPy and lmfit are timed on a sample and
scaled to fits/s.

Run: .venv/bin/python benchmarks/bench_batch.py [--sizes 10000 100000 1000000]
     [--device cuda] [--dtype float32]
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch
from scipy.optimize import curve_fit

import gradfit as gf

QUADRATIC = "a*x**2 + b*x + c"
GAUSSIAN = "amplitude*exp(-(x - center)**2/(2*width**2)) + offset"


def quadratic_np(x, a, b, c):
    return a * x**2 + b * x + c


def gaussian_np(x, amplitude, center, width, offset):
    return amplitude * np.exp(-((x - center) ** 2) / (2 * width**2)) + offset


def quadratic_jac(x, a, b, c):
    return np.stack([x**2, x, np.ones_like(x)], axis=1)


def gaussian_jac(x, amplitude, center, width, offset):
    e = np.exp(-((x - center) ** 2) / (2 * width**2))
    d = x - center
    return np.stack(
        [e, amplitude * e * d / width**2, amplitude * e * d**2 / width**3, np.ones_like(x)], axis=1
    )


JACOBIANS = {quadratic_np: quadratic_jac, gaussian_np: gaussian_jac}


def make_data(kind: str, K: int, N: int = 100, seed: int = 0):
    rng = np.random.default_rng(seed)
    if kind == "quadratic":
        x = np.linspace(0, 1, N)
        truth = np.column_stack(
            [rng.uniform(10, 30, K), rng.uniform(-10, 10, K), rng.uniform(-5, 5, K)]
        )
        y = quadratic_np(x, *(truth[:, i : i + 1] for i in range(3)))
        y += rng.normal(0, 1, (K, N))
        p0 = np.array([1.0, 1.0, 1.0])
    else:
        x = np.linspace(-5, 5, N)
        truth = np.column_stack(
            [
                rng.uniform(2, 5, K),
                rng.uniform(-1, 1, K),
                rng.uniform(0.7, 1.5, K),
                rng.uniform(-0.5, 0.5, K),
            ]
        )
        y = gaussian_np(x, *(truth[:, i : i + 1] for i in range(4)))
        y += rng.normal(0, 0.1, (K, N))
        p0 = np.column_stack(
            [truth[:, 0] * 0.8, truth[:, 1] + 0.3, truth[:, 2] * 1.2, truth[:, 3] * 0.0]
        )  # a rough per-curve start, as Gpufit's tests use
    return x, y, p0


def reference_loop(fn, x, y, p0, sample: np.ndarray, tight: bool) -> tuple[float, np.ndarray]:
    # the reference: analytic Jacobian (curve_fit's default finite differences leave errors
    # of up to ~3e-5 relative on the quadratic) and tight tolerances; timing: the defaults
    options = {"xtol": 1e-15, "ftol": 1e-15, "gtol": 1e-15, "maxfev": 10_000} if tight else {}
    if tight:
        options["jac"] = JACOBIANS[fn]
    out = []
    start = time.perf_counter()
    for i in sample:
        start_i = p0 if p0.ndim == 1 else p0[i]
        out.append(curve_fit(fn, x, y[i], p0=start_i, **options)[0])
    return len(sample) / (time.perf_counter() - start), np.array(out)


def lmfit_rate(fn, x, y, p0, sample: np.ndarray) -> float:
    import lmfit

    model = lmfit.Model(fn)
    names = model.param_names
    start = time.perf_counter()
    for i in sample:
        start_i = p0 if p0.ndim == 1 else p0[i]
        model.fit(y[i], model.make_params(**dict(zip(names, start_i, strict=True))), x=x)
    return len(sample) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float64", choices=["float64", "float32"])
    parser.add_argument("--sample", type=int, default=300)
    parser.add_argument("--no-lmfit", action="store_true")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}, "
        f"{args.dtype}; 100 points per curve"
    )
    for kind, expression, fn in (
        ("quadratic", QUADRATIC, quadratic_np),
        ("gaussian", GAUSSIAN, gaussian_np),
    ):
        x, y, p0 = make_data(kind, max(args.sizes))
        sample = np.random.default_rng(1).choice(max(args.sizes), args.sample, replace=False)
        scipy_rate, _ = reference_loop(fn, x, y, p0, sample, tight=False)
        _, scipy_tight = reference_loop(fn, x, y, p0, sample, tight=True)
        lm_rate = float("nan") if args.no_lmfit else lmfit_rate(fn, x, y, p0, sample[:100])
        print(f"\n{kind} ({expression})")
        print(f"  scipy curve_fit loop: {scipy_rate:12,.0f} fits/s")
        print(f"  lmfit loop          : {lm_rate:12,.0f} fits/s")
        for K in args.sizes:
            gf.fit_batch(
                expression,
                x,
                y[:256],
                p0=p0 if p0.ndim == 1 else p0[:256],
                dtype=dtype,
                device=args.device,
            )  # warm-up
            elapsed = math.inf
            for _ in range(3):  # best of up to three: short runs on a shared VM are noisy
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                start = time.perf_counter()
                result = gf.fit_batch(
                    expression,
                    x,
                    y[:K],
                    p0=p0 if p0.ndim == 1 else p0[:K],
                    dtype=dtype,
                    device=args.device,
                )
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                elapsed = min(elapsed, time.perf_counter() - start)
                if elapsed > 1.0:
                    break
            in_sample = sample[sample < K]
            ours = result.params[torch.as_tensor(in_sample)].cpu().double().numpy()
            theirs = scipy_tight[np.isin(sample, in_sample)]
            scale = np.maximum(np.abs(theirs), 1e-3)
            agree = [
                np.all(np.abs(ours - theirs) <= rtol * scale, axis=1).mean()
                for rtol in (1e-6, 1e-4)
            ]
            converged = float(result.converged.float().mean())
            print(
                f"  gradfit K={K:>9,}: {K / elapsed:12,.0f} fits/s ({elapsed:6.2f} s)  "
                f"{(K / elapsed) / scipy_rate:6.1f}x SciPy  agree(1e-6) {100 * agree[0]:5.1f}%  "
                f"agree(1e-4) {100 * agree[1]:5.1f}%  converged {100 * converged:5.1f}%"
            )


if __name__ == "__main__":
    main()
