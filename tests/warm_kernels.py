"""Compile (or load) the Numba kernels the tests use, in one process: ``make test`` runs it
beside ruff and mypy, so that pytest finds them in Numba's disk cache instead of compiling
them inside its first tests (~40 s on a fresh clone)."""

import numpy as np

import gradfit as gf


def main() -> None:
    x = np.linspace(0.0, 1.0, 12)
    y = np.stack([2.0 * x + 1.0, 1.0 - x]) + 0.01 * np.sin(9 * x)
    gf.fit_batch("a*x + b", x, y, p0=[1.0, 1.0])  # the LM kernel and the per-curve columns
    gf.fit("a*x + b", x, y[0], optimizer="gd", epochs=2)  # the symbolic gradient
    gf.fit_shared("a*x + b", x, y, shared=["b"])  # the shared-parameter blocks


if __name__ == "__main__":  # (pytest's doctest collection imports this file too)
    main()
