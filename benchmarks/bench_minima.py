"""How often a fit ends in a worse minimum than the best known one: gradfit vs SciPy's LM.

For six built-in models, K noisy curves with random true parameters are fitted from starts
scattered around the truth (each parameter times a factor in [lo, hi]) by ``fit_batch`` and
by SciPy's ``least_squares(method="lm")`` with tight tolerances, curve by curve. A fit counts
as worse when its cost exceeds the better of the two by more than 1e-8 relative. Run:
    .venv/bin/python benchmarks/bench_minima.py [--curves 200] [--spread 0.3 3.0]
"""

from __future__ import annotations

import argparse

import numpy as np
from scipy.optimize import least_squares

import gradfit as gf

N = 60
CASES = {  # model: (x grid, numpy model, ranges of the true parameters)
    "exponential": (
        np.linspace(0, 5, N),
        lambda x, a, k, c: a * np.exp(-k * x) + c,
        [(1, 5), (0.3, 3), (-1, 1)],
    ),
    "gaussian": (
        np.linspace(-5, 5, N),
        lambda x, a, c, w, o: a * np.exp(-((x - c) ** 2) / (2 * w**2)) + o,
        [(1, 5), (-2, 2), (0.3, 2), (-0.5, 0.5)],
    ),
    "lorentzian": (
        np.linspace(-5, 5, N),
        lambda x, a, c, w, o: a * w**2 / ((x - c) ** 2 + w**2) + o,
        [(1, 5), (-2, 2), (0.3, 2), (-0.5, 0.5)],
    ),
    "logistic": (
        np.linspace(-5, 5, N),
        lambda x, t, r, m, b: t / (1 + np.exp(-r * (x - m))) + b,
        [(1, 5), (0.5, 3), (-2, 2), (-1, 1)],
    ),
    "power_law": (np.linspace(0.5, 5, N), lambda x, a, b: a * x**b, [(0.5, 3), (-2, 2)]),
    "sine": (
        np.linspace(0, 3, N),
        lambda x, a, f, p, o: a * np.sin(2 * np.pi * f * x + p) + o,
        [(1, 3), (0.5, 1.5), (-1, 1), (-0.5, 0.5)],
    ),
}


def scipy_lm(f, x: np.ndarray, y: np.ndarray, p0: np.ndarray) -> float:
    tight = {"xtol": 1e-15, "ftol": 1e-15, "gtol": 1e-15, "max_nfev": 20_000}
    return least_squares(lambda p: f(x, *p) - y, p0, method="lm", **tight).cost


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--curves", type=int, default=200)
    parser.add_argument("--spread", type=float, nargs=2, default=[0.3, 3.0])
    args = parser.parse_args()
    rng = np.random.default_rng(42)
    lo, hi = args.spread
    print(f"{args.curves} curves of {N} points per model, starts at truth x U({lo}, {hi})")
    for name, (x, f, ranges) in CASES.items():
        truth = np.column_stack([rng.uniform(a, b, args.curves) for a, b in ranges])
        y = np.stack([f(x, *t) for t in truth]) + rng.normal(0, 0.05, (args.curves, N))
        p0 = truth * rng.uniform(lo, hi, truth.shape)
        ours = gf.fit_batch(name, x, y, p0=p0)
        ours_cost = ours.loss.numpy() * N / 2  # mse -> 0.5 * sum of squares
        scipy_cost = np.array([scipy_lm(f, x, y[i], p0[i]) for i in range(args.curves)])
        best = np.minimum(ours_cost, scipy_cost) * (1 + 1e-8) + 1e-14
        print(
            f"  {name:12s} worse minimum: gradfit {np.mean(ours_cost > best):6.1%}   "
            f"SciPy {np.mean(scipy_cost > best):6.1%}   "
            f"(gradfit mean {ours.n_iter.float().mean():.1f} iterations)"
        )


if __name__ == "__main__":
    main()
