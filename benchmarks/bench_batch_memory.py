"""Working memory of fit_batch: peak resident memory added by the fit, against the input's size.

The curves are converted chunk by chunk, so the extra memory should stay near a few chunks'
working sets plus the results (~100 bytes per curve) whatever K is. Run (Linux):
    .venv/bin/python benchmarks/bench_batch_memory.py [--sizes 100000 1000000] [--model ...]
"""

from __future__ import annotations

import argparse
import threading
import time

import numpy as np

import gradfit as gf


def resident_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


def peak_during(fn) -> tuple[float, float]:
    """(peak resident MiB while fn runs, seconds), sampling every 5 ms."""
    peak, done = [resident_mib()], threading.Event()

    def watch() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], resident_mib())
            time.sleep(0.005)

    watcher = threading.Thread(target=watch)
    watcher.start()
    start = time.perf_counter()
    try:
        fn()
    finally:
        done.set()
        watcher.join()
    return peak[0], time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--model", default="a*x**2 + b*x + c")
    args = parser.parse_args()
    x = np.linspace(0, 1, 100)
    rng = np.random.default_rng(0)
    for K in args.sizes:
        y = 20 * x**2 + 5 * x - 3 + rng.normal(size=(K, 100))
        before = resident_mib()
        peak, seconds = peak_during(lambda y=y: gf.fit_batch(args.model, x, y))
        extra = peak - before
        print(
            f"K={K:>10,}: input {y.nbytes / 2**20:7.0f} MiB, peak extra during the fit "
            f"{extra:6.0f} MiB ({extra / (y.nbytes / 2**20):.2f}x the input, "
            f"{2**20 * extra / K:.0f} bytes/curve), {seconds:.1f} s"
        )
        del y


if __name__ == "__main__":
    main()
