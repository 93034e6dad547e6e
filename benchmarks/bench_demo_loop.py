"""The post's verbatim 15,000-epoch loop vs `gradfit demo`'s loop, same data, same start.

Prints wall time of each, the ratio (gradfit / post; below 1 means gradfit is faster) and
microseconds per step. Also the library's gd on the post's data and model written as an
expression, ``fit("a*x**2 + b*x + c", optimizer="gd")`` (float64, its default), and the
post's loop with the expression's symbolic gradient (``first_order.symbolic_loss``) in place
of forward + backward: what each epoch of the library's loop costs where it takes it.
Run: .venv/bin/python benchmarks/bench_demo_loop.py [--epochs N]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from post_verbatim import run_post

import gradfit as gf
from gradfit import datasets
from gradfit.cli.demo import run_demo
from gradfit.model.losses import get_loss
from gradfit.model.models import as_model
from gradfit.model.parameters import ParameterSpace
from gradfit.optim.first_order import symbolic_loss
from gradfit.optim.problem import Problem

QUADRATIC = "a*x**2 + b*x + c"


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


def symbolic_loop(x: torch.Tensor, y: torch.Tensor, epochs: int) -> list[float]:
    """The post's loop with the symbolic gradient: loss and grad, update, zero the grad."""
    model = as_model(QUADRATIC)
    space = ParameterSpace.build(model.param_names, None, None)
    step = symbolic_loss(Problem(model, x, y, get_loss("mse"), space))
    assert step is not None
    params = torch.randn(3, dtype=x.dtype).requires_grad_()
    history = []
    for _ in range(epochs):
        loss = step(params)
        params.data -= 1e-3 * params.grad.data
        params.grad = None
        history.append(loss.item())
    return history


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=15_000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)  # tiny tensors: threads only add overhead, for both loops
    x, y = datasets.quadratic(seed=0)
    x64, y64 = x.double(), y.double()
    post, ours, library, symbolic = interleaved_best(
        args.repeats,
        lambda: run_post(0, epochs=args.epochs),
        lambda: run_demo(seed=0, epochs=args.epochs),
        lambda: gf.fit(QUADRATIC, x, y, optimizer="gd", epochs=args.epochs, tol=-1.0),
        lambda: symbolic_loop(x64, y64, args.epochs),
    )
    n = args.epochs
    print(f"epochs: {n}, best of {args.repeats}, interleaved, torch {torch.__version__}")
    print(f"post's verbatim loop : {post:7.3f} s  {1e6 * post / n:6.1f} us/step")
    print(f"gradfit demo loop    : {ours:7.3f} s  {1e6 * ours / n:6.1f} us/step")
    print(f"ratio gradfit/post   : {ours / post:7.3f}  (must be <= 1)")
    print(f"fit(optimizer='gd')  : {library:7.3f} s  {1e6 * library / n:6.1f} us/step  "
          f"post/fit {post / library:5.2f}x")  # fmt: skip
    print(f"post's loop, symbolic: {symbolic:7.3f} s  {1e6 * symbolic / n:6.1f} us/step  "
          f"post/symbolic {post / symbolic:5.2f}x")  # fmt: skip


if __name__ == "__main__":
    main()
