"""One global fit with a shared parameter vs the same number of independent fits.

K Gaussian curves on x = 0..49 (amplitude, center, offset per curve; the width is shared,
w = 4), noise sigma = 0.05, float64 on the CPU. ``gradfit.fit_shared`` fits all of them in
one problem, the width shared (block LM, ``optim/block_lm.py``); ``gradfit.fit_batch`` fits
the same curves independently, the width free per curve (its compiled LM kernel where it
applies). Both start from the same guesses. Printed: seconds of each, their ratio, the shared
width ± stderr, and the median |amplitude error| / stderr of each (both should be ~0.67).

Run: .venv/bin/python benchmarks/bench_shared.py [--sizes 10000 100000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

import gradfit as gf

MODEL = "amplitude*exp(-(x - center)**2/(2*width**2)) + offset"
WIDTH, NOISE, N = 4.0, 0.05, 50


def make_data(K: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = np.arange(N, dtype=np.float64)
    amplitude = rng.uniform(1.0, 3.0, K)
    center = rng.uniform(15.0, 35.0, K)
    offset = rng.uniform(-0.5, 0.5, K)
    y = amplitude[:, None] * np.exp(-((x - center[:, None]) ** 2) / (2 * WIDTH**2))
    y += offset[:, None] + rng.normal(0.0, NOISE, (K, N))
    start = np.column_stack(
        [y.max(1) - np.median(y, 1), x[y.argmax(1)], np.full(K, 3.0), np.median(y, 1)]
    )
    return x, y, start, amplitude


def run(K: int, repeat: int) -> None:
    x, y, start, amplitude = make_data(K)
    shared_times, batch_times = [], []
    for _ in range(repeat):
        t0 = time.perf_counter()
        rows, common = gf.fit_shared(MODEL, x, y, shared="width", p0=start)
        shared_times.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        alone = gf.fit_batch(MODEL, x, y, p0=start)
        batch_times.append(time.perf_counter() - t0)
    t_shared, t_batch = min(shared_times), min(batch_times)
    pull_shared = np.median(
        np.abs(rows.params[:, 0].numpy() - amplitude) / rows.stderr[:, 0].numpy()
    )
    pull_alone = np.median(
        np.abs(alone.params[:, 0].numpy() - amplitude) / alone.stderr[:, 0].numpy()
    )
    sd = common.stderr["width"]
    print(
        f"K={K:>7}: fit_shared {t_shared:7.2f} s ({common.n_iter} iterations, {common.status}), "
        f"fit_batch {t_batch:7.2f} s ({int(alone.converged.sum())}/{K} converged); "
        f"ratio shared/batch {t_shared / t_batch:5.2f}x; width {common.values['width']:.6f} "
        f"± {sd:.2g}; median |amplitude error|/stderr {pull_shared:.2f} (shared), "
        f"{pull_alone:.2f} (batch)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--repeat", type=int, default=3, help="best of this many runs")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for K in args.sizes:
        run(K, args.repeat)


if __name__ == "__main__":
    main()
