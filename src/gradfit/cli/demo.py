"""The blog post end to end: data, model, the training loop, four figures, and the truth.

With ``seed`` the run equals the post's program after ``torch.manual_seed(seed)``: the same
data, the same ``torch.randn(3)`` starting parameters drawn after it, the same losses.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gradfit import datasets
from gradfit.fitting.fit import fit
from gradfit.model.models import Model
from gradfit.results.fit_result import FitResult
from gradfit.views.plots import plot_after_training, plot_dataset, plot_history, plot_prediction

TRUE_PARAMS = {"a": 20.0, "b": 5.0, "c": -3.0}


def f(x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """The post's model, verbatim."""
    a, b, c = params
    return a * (x**2) + b * x + c  # type: ignore[no-any-return]  # torch: iterating gives Any


@dataclass
class DemoRun:
    seed: int
    x: torch.Tensor
    y: torch.Tensor
    initial: torch.Tensor
    result: FitResult
    optimum: dict[str, float]
    optimum_loss: float

    @property
    def excess(self) -> float:
        """How far the fitted loss lies above the least-squares optimum, relatively."""
        return self.result.loss / self.optimum_loss - 1

    def to_dict(self, history_file: str | None = None) -> dict[str, Any]:
        return {
            **self.result.to_dict(history_file),
            "seed": self.seed,
            "initial_params": dict(zip("abc", self.initial.tolist(), strict=True)),
            "true_params": TRUE_PARAMS,
            "optimum_params": self.optimum,
            "optimum_loss": self.optimum_loss,
            "loss_excess_over_optimum": self.excess,
        }


def least_squares_optimum(x: torch.Tensor, y: torch.Tensor) -> tuple[dict[str, float], float]:
    """The exact minimiser of the post's MSE, by linear least squares in float64."""
    x64, y64 = x.double(), y.double()
    A = torch.stack([x64**2, x64, torch.ones_like(x64)], dim=1)
    solution = torch.linalg.lstsq(A, y64.unsqueeze(1)).solution.squeeze(1)
    mse = float(((A @ solution - y64) ** 2).mean())
    return dict(zip("abc", solution.tolist(), strict=True)), mse


def optimum_curve(optimum: dict[str, float]) -> Callable[[np.ndarray], np.ndarray]:
    """The least-squares quadratic as a function of x, in float64."""
    coefficients = [optimum[n] for n in "abc"]  # a*x**2 + b*x + c, highest power first
    return lambda x: np.polyval(coefficients, np.asarray(x, dtype=float))


def run_demo(
    *,
    seed: int | None = None,
    epochs: int = 15_000,
    lr: float = 1e-3,
    optimizer: str = "gd",
    progress: bool = False,
) -> DemoRun:
    """Run the post's program (float32, as the post) and compare with the exact optimum."""
    seed = random.SystemRandom().randrange(2**31) if seed is None else seed
    torch.manual_seed(seed)  # the post's global RNG: data first, then the starting params
    x, y = datasets.quadratic(n=100)
    initial = torch.randn(3)
    model = Model(f, params=["a", "b", "c"])
    result = fit(
        model, x, y, p0=initial, loss="mse", optimizer=optimizer, lr=lr, epochs=epochs,
        tol=None, dtype=torch.float32, progress=progress,
    )  # fmt: skip
    optimum, optimum_loss = least_squares_optimum(x, y)
    return DemoRun(seed, x, y, initial, result, optimum, optimum_loss)


def write_demo(run: DemoRun, out: Path) -> list[Path]:
    """The post's four figures and ``results.json`` into ``out``.

    The fourth figure adds the least-squares optimum and the residuals to the post's plot, so
    that a loop stopping short of the optimum is visible.
    """
    import json

    from gradfit.io.files import write_text_atomic
    from gradfit.results.history_store import store_history

    x, y = run.x, run.y
    before = f(x, run.initial)
    stored = store_history(run.result.history, out / "results.json")  # the 15,000 epochs
    return [
        plot_dataset(x, y, out / "dataset.png"),
        plot_prediction(x, y, before, "Before training", out / "before_training.png"),
        plot_history(run.result.history, out / "history.png", ylabel="MSE"),
        plot_after_training(
            x, y, run.result.predict, optimum_curve(run.optimum), out / "after_training.png"
        ),
        *([out / stored] if stored else []),
        write_text_atomic(out / "results.json", json.dumps(run.to_dict(stored), indent=2) + "\n"),
    ]
