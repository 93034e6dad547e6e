"""Timing of the batched LM kernel (run by hand; no assertions).

    python benchmarks/bench_lm_kernel.py [--large-k 100000] [--threads 1] [--device cpu]

* K = 1: quadratic ``a x² + b x + c`` and Gaussian ``a exp(-(x-mu)²/(2 s²)) + c`` on 100
  points, against ``scipy.optimize.curve_fit`` on the same data (median wall time).
* Large K: K curves × N = 100 quadratic and Gaussian fits in one call (fits per second).
* ``--agree``: the same Gaussian batch on ``--device`` and on the CPU.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from gradfit.optim.lm import levenberg_marquardt

Tensor = torch.Tensor


def median_time(fn: Callable[[], object], repeat: int, warmup: int | None = None) -> float:
    for _ in range(max(3, repeat // 10) if warmup is None else warmup):
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def problems(rng: np.random.Generator) -> dict[str, dict]:
    x = np.linspace(-3, 3, 100)
    yq = 1.5 * x**2 - 0.7 * x + 0.3 + 0.1 * rng.standard_normal(100)
    yg = 2.0 * np.exp(-((x - 0.3) ** 2) / (2 * 0.8**2)) + 0.1 + 0.05 * rng.standard_normal(100)
    return {
        "quadratic": {
            "np": lambda x, a, b, c: a * x**2 + b * x + c,
            "y": yq,
            "p0": [1.0, 1.0, 1.0],
        },
        "gaussian": {
            "np": lambda x, a, mu, s, c: a * np.exp(-((x - mu) ** 2) / (2 * s**2)) + c,
            "y": yg,
            "p0": [1.0, 0.0, 1.0, 0.0],
        },
        "x": x,
    }


def torch_fns(name: str, x: Tensor, y: Tensor) -> tuple[Callable, Callable]:
    """Residuals ``(K, P) -> (K, N)`` and an analytic ``(r, J)`` for the named model."""
    if name == "quadratic":
        basis = torch.stack([x**2, x, torch.ones_like(x)], -1)  # (N, 3)

        def res(t: Tensor) -> Tensor:
            return t @ basis.T - y

        def jac(t: Tensor) -> tuple[Tensor, Tensor]:
            return t @ basis.T - y, basis.expand(t.shape[0], -1, -1)

        return res, jac

    def gres(t: Tensor) -> Tensor:
        a, mu, s, c = t.unsqueeze(-1).unbind(-2)  # each (K, 1)
        return a * torch.exp(-((x - mu) ** 2) / (2 * s**2)) + c - y

    def gjac(t: Tensor) -> tuple[Tensor, Tensor]:
        a, mu, s, c = t.unsqueeze(-1).unbind(-2)
        d = x - mu
        e = torch.exp(-(d**2) / (2 * s**2))
        ae = a * e
        J = torch.stack([e, ae * d / s**2, ae * d**2 / s**3, torch.ones_like(e)], -1)
        return ae + c - y, J

    return gres, gjac


def bench_k1(repeat: int) -> None:
    from scipy.optimize import curve_fit

    rng = np.random.default_rng(0)
    probs = problems(rng)
    x_np = probs.pop("x")
    x = torch.as_tensor(x_np)
    for name, pr in probs.items():
        y_np, p0 = pr["y"], pr["p0"]
        t_sp = median_time(lambda: curve_fit(pr["np"], x_np, y_np, p0=p0), repeat)  # noqa: B023
        res, jac = torch_fns(name, x, torch.as_tensor(y_np))
        th0 = torch.tensor([p0], dtype=torch.float64)
        popt = curve_fit(pr["np"], x_np, y_np, p0=p0)[0]
        for label, kw in (("autodiff", {}), ("analytic J", {"jacobian": jac})):
            out = levenberg_marquardt(res, th0, **kw)
            t_lm = median_time(lambda: levenberg_marquardt(res, th0, **kw), repeat)  # noqa: B023
            err = float(np.max(np.abs(out.theta[0].numpy() - popt) / np.abs(popt)))
            print(
                f"K=1 {name:9s} {label:10s}: lm {t_lm * 1e6:8.0f} us  curve_fit "
                f"{t_sp * 1e6:6.0f} us  ratio {t_lm / t_sp:5.1f}x  iters {int(out.n_iter[0]):3d}"
                f"  evals {out.n_eval:3d}  max rel diff vs curve_fit {err:.1e}"
            )


def large_k_problem(name: str, K: int, dev: torch.device) -> tuple[Callable, Callable, Tensor]:
    """K noisy curves of the named model on 100 points, and a start for all of them."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.linspace(-3, 3, 100, dtype=torch.float64)
    if name == "quadratic":
        true = torch.randn(K, 3, generator=gen, dtype=torch.float64)
        theta0 = torch.ones(K, 3, dtype=torch.float64)
    else:  # gaussian: amplitude, centre, width, offset
        u = torch.rand(K, 4, generator=gen, dtype=torch.float64)
        true = torch.stack([1 + 2 * u[:, 0], u[:, 1] - 0.5, 0.5 + u[:, 2], 0.2 * u[:, 3]], -1)
        theta0 = torch.tensor([[1.0, 0.0, 1.0, 0.0]], dtype=torch.float64).expand(K, 4)
    clean, _ = torch_fns(name, x, torch.zeros(100, dtype=torch.float64))
    y = clean(true) + 0.05 * torch.randn(K, 100, generator=gen, dtype=torch.float64)
    res, jac = torch_fns(name, x.to(dev), y.to(dev))
    return res, jac, theta0.to(dev).contiguous()


def bench_large_k(K: int, device: str, repeat: int) -> None:
    dev = torch.device(device)
    for name in ("quadratic", "gaussian"):
        res, jac, th0 = large_k_problem(name, K, dev)
        for label, kw in (("analytic J", {"jacobian": jac}), ("autodiff", {})):

            def run(kw: dict = kw, res: Callable = res, th0: Tensor = th0) -> object:
                out = levenberg_marquardt(res, th0, **kw)
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                return out

            out = run()  # also the warm-up
            t = median_time(run, repeat, warmup=0)
            print(
                f"K={K} N=100 {name:9s} {label:10s} on {device}: {t:7.3f} s {K / t:10.0f} fits/s"
                f"  iters mean {out.n_iter.double().mean():.1f} max {int(out.n_iter.max())}"
                f"  statuses {torch.bincount(out.status.cpu(), minlength=7).tolist()}",
                flush=True,
            )


def check_agreement(device: str, K: int = 20_000) -> None:
    """The same Gaussian batch on ``device`` and on the CPU: statuses and parameters agree."""
    res_d, _, th_d = large_k_problem("gaussian", K, torch.device(device))
    res_c, _, th_c = large_k_problem("gaussian", K, torch.device("cpu"))
    a, b = levenberg_marquardt(res_d, th_d), levenberg_marquardt(res_c, th_c)
    same = (a.status.cpu() == b.status).double().mean()
    rel = ((a.theta.cpu() - b.theta).abs() / b.theta.abs().clamp_min(1e-12)).max()
    print(f"{device} vs cpu, K={K} gaussians: same status {same:.4f}, max rel theta diff {rel:.1e}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--large-k", type=int, default=100_000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeat", type=int, default=200)
    ap.add_argument("--large-k-repeat", type=int, default=3)
    ap.add_argument("--skip-k1", action="store_true")
    ap.add_argument("--agree", action="store_true", help="compare --device with the CPU")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if not args.skip_k1:
        bench_k1(args.repeat)
    if args.large_k:
        bench_large_k(args.large_k, args.device, repeat=args.large_k_repeat)
    if args.agree:
        check_agreement(args.device)


if __name__ == "__main__":
    main()
