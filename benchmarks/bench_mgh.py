"""The Moré–Garbow–Hillstrom least-squares problems: does gradfit's LM reach the known minima?

Twelve curve-fit-shaped MGH problems (ACM TOMS 7(1), 1981; defined in tests/mgh.py) from
their 35 standard starts (x0, 10·x0, 100·x0), fitted by ``gradfit.fit(..., optimizer="lm")``
with default settings and by SciPy's MINPACK LM (``least_squares(method="lm")``, tolerances
1e-15, finite-difference Jacobian) from the same start. One row per start: final SSE, status,
iterations, residual evaluations (n/a: ``FitResult`` does not report them) and wall time,
SciPy's SSE and evaluations, the known minimum f*, and whether each reached f*
(``Problem.reaches``: within 1e-6 relative, or below 1e-20 for zero minima). Run:
    .venv/bin/python benchmarks/bench_mgh.py [--kernel compiled|torch|both]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from mgh import CASES, reference

import gradfit as gf
from gradfit.optim import compiled_lm

HEADER = (
    f"{'problem':16s} {'start':>6s} | {'gradfit SSE':>12s} {'status':10s} {'iter':>5s} "
    f"{'evals':>5s} {'ms':>7s} | {'SciPy SSE':>12s} {'nfev':>6s} | {'f*':>12s}  reached"
)


def run(kernel: str) -> None:
    lm_compiled = compiled_lm()
    if kernel == "compiled" and lm_compiled is None:
        print("compiled kernel: unavailable (Numba cannot be imported)\n")
        return
    if lm_compiled is not None:
        lm_compiled.ENABLED = kernel == "compiled"
    first, factor = CASES[0]  # untimed: loads the compiled kernel (compiles it if stale)
    gf.fit(first.expression, first.x, first.y, p0=first.start(factor), optimizer="lm")
    print(f"kernel: {kernel}")
    print(HEADER)
    print("-" * len(HEADER))
    ours = scipy = ours_where_scipy = 0
    for problem, factor in CASES:
        start = time.perf_counter()
        result = gf.fit(
            problem.expression, problem.x, problem.y, p0=problem.start(factor), optimizer="lm"
        )
        ms = (time.perf_counter() - start) * 1e3
        scipy_sse, nfev = reference(problem, factor)
        reached, scipy_reached = problem.reaches(result.chi2), problem.reaches(scipy_sse)
        ours += reached
        scipy += scipy_reached
        ours_where_scipy += reached and scipy_reached
        n_eval = result.n_eval
        flags = f"{'G' if reached else '-'}{'S' if scipy_reached else '-'}"
        print(
            f"{problem.name:16s} {factor:4g}x0 | {result.chi2:12.6e} {result.status:10s} "
            f"{result.n_iter:5d} {'n/a' if n_eval is None else n_eval:>5} {ms:7.1f} | "
            f"{scipy_sse:12.6e} {nfev:6d} | {problem.f_star:12.6e}  {flags}"
        )
    n = len(CASES)
    print(
        f"reached (G: gradfit, S: SciPy). gradfit reaches f* on {ours}/{n}, SciPy on "
        f"{scipy}/{n}, gradfit where SciPy does: {ours_where_scipy}/{scipy}\n"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kernel", choices=["compiled", "torch", "both"], default="both")
    args = parser.parse_args()
    torch.set_num_threads(1)  # tiny problems: threads only add overhead
    for kernel in ("compiled", "torch") if args.kernel == "both" else (args.kernel,):
        run(kernel)


if __name__ == "__main__":
    main()
