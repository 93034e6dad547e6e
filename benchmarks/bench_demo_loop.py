"""The post's verbatim 15,000-epoch loop vs `gradfit demo`'s loop, same data, same start.

Prints wall time of each, the ratio (gradfit / post; below 1 means gradfit is faster) and
microseconds per step. Run: .venv/bin/python benchmarks/bench_demo_loop.py [--epochs N]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from post_verbatim import run_post

from gradfit.cli.demo import run_demo


def interleaved_best(repeats: int, *fns) -> list[float]:
    """Best time of each function, alternating them so that drifts of a shared machine's speed
    hit both alike."""
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, samples in zip(fns, times, strict=True):
            start = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - start)
    return [min(samples) for samples in times]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=15_000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)  # tiny tensors: threads only add overhead, for both loops
    post, ours = interleaved_best(
        args.repeats,
        lambda: run_post(0, epochs=args.epochs),
        lambda: run_demo(seed=0, epochs=args.epochs),
    )
    print(f"epochs: {args.epochs}, best of {args.repeats}, interleaved, torch {torch.__version__}")
    print(f"post's verbatim loop : {post:7.3f} s  {1e6 * post / args.epochs:6.1f} us/step")
    print(f"gradfit demo loop    : {ours:7.3f} s  {1e6 * ours / args.epochs:6.1f} us/step")
    print(f"ratio gradfit/post   : {ours / post:7.3f}  (must be <= 1)")


if __name__ == "__main__":
    main()
