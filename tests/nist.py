"""Loader for the NIST StRD nonlinear regression datasets, plus hand-written torch models.

The ``.dat`` files (public domain) are kept in ``tests/data/nist_strd``, so the proof runs on
any clean clone.

Run ``python tests/nist.py`` to print every parsed model and check it against the hand-written
torch version at the certified parameters.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import numpy as np
import torch

NIST_DIR = Path(__file__).resolve().parent / "data" / "nist_strd"

#: The 27 datasets, in NIST's order of difficulty (lower, average, higher).
NAMES: tuple[str, ...] = (
    *("Misra1a", "Chwirut2", "Chwirut1", "Lanczos3", "Gauss1", "Gauss2", "DanWood", "Misra1b"),
    *("Kirby2", "Hahn1", "Nelson", "MGH17", "Lanczos1", "Lanczos2", "Gauss3", "Misra1c"),
    *("Misra1d", "Roszman1", "ENSO"),
    *("MGH09", "Thurber", "BoxBOD", "Rat42", "MGH10", "Eckerle4", "Rat43", "Bennett5"),
)


@dataclass(frozen=True)
class NistProblem:
    """One NIST StRD problem; ``y`` is the fitted response (``log(y)`` for Nelson)."""

    name: str
    model: str  # Python syntax, parameters b1..bP, e.g. "b1*(1-exp(-b2*x))"
    independent: tuple[str, ...]  # ("x",) or ("x1", "x2")
    start1: np.ndarray  # (P,)
    start2: np.ndarray  # (P,)
    certified: np.ndarray  # (P,)
    certified_stderr: np.ndarray  # (P,)
    rss: float
    dof: int
    x: dict[str, np.ndarray]  # name -> (N,)
    y: np.ndarray  # (N,)
    response: str = field(default="y")  # "y", or "log(y)" when the file models log[y]

    @property
    def n_params(self) -> int:
        return len(self.certified)


_NUMBER = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"


def _model_text(lines: list[str]) -> tuple[str, str]:
    """Extract ``(response, rhs)`` from the header's multi-line ``Model:`` block."""
    start = next(i for i, ln in enumerate(lines) if ln.startswith("Model:"))
    parts: list[str] = []
    for ln in lines[start + 1 :]:
        text = ln.strip()
        if parts or re.match(r"^(log\[y\]|y)\s*=", text):
            parts.append(text)
            if re.search(r"\+\s*e\s*$", text):
                break
    expr = " ".join(parts)
    response, rhs = (s.strip() for s in expr.split("=", 1))
    rhs = re.sub(r"\+\s*e\s*$", "", rhs).strip()  # drop the error term
    rhs = rhs.replace("[", "(").replace("]", ")")
    rhs = re.sub(r"\s+", " ", rhs)
    return ("log(y)" if response.startswith("log") else "y"), rhs


def _param_table(lines: list[str]) -> np.ndarray:
    """Rows ``b_i = start1 start2 certified stderr`` -> array (P, 4)."""
    rows = []
    for ln in lines:
        m = re.match(r"^\s*b(\d+)\s*=\s*(.*)$", ln)
        if m:
            rows.append([float(v) for v in re.findall(_NUMBER, m.group(2))[:4]])
    return np.array(rows, dtype=np.float64)


def _header_value(lines: list[str], label: str) -> float:
    line = next(ln for ln in lines if ln.startswith(label))
    return float(re.findall(_NUMBER, line.split(":", 1)[1])[0])


@cache
def load(name: str) -> NistProblem:
    """Parse ``<name>.dat``."""
    lines = (NIST_DIR / f"{name}.dat").read_text().splitlines()
    response, model = _model_text(lines)
    table = _param_table(lines)
    # The data block starts after the second "Data:" line, whose words name the columns.
    data_at = [i for i, ln in enumerate(lines) if ln.startswith("Data:")][-1]
    columns = lines[data_at].split()[1:]  # ["y", "x"] or ["y", "x1", "x2"]
    data = np.array(
        [[float(v) for v in ln.split()] for ln in lines[data_at + 1 :] if ln.strip()],
        dtype=np.float64,
    )
    y = data[:, 0]
    return NistProblem(
        name=name,
        model=model,
        independent=tuple(columns[1:]),
        start1=table[:, 0],
        start2=table[:, 1],
        certified=table[:, 2],
        certified_stderr=table[:, 3],
        rss=_header_value(lines, "Residual Sum of Squares"),
        dof=int(_header_value(lines, "Degrees of Freedom")),
        x={c: data[:, j + 1] for j, c in enumerate(columns[1:])},
        y=np.log(y) if response == "log(y)" else y,
        response=response,
    )


# --- Hand-written torch models: b is a list of (K, 1) tensors, x maps names to (N,) tensors. ---

Model = Callable[[list[torch.Tensor], dict[str, torch.Tensor]], torch.Tensor]
_PI = math.pi


def _rational3(b: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    num = b[0] + b[1] * x + b[2] * x**2 + b[3] * x**3
    return num / (1 + b[4] * x + b[5] * x**2 + b[6] * x**3)


def _gauss(b: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    return (
        b[0] * torch.exp(-b[1] * x)
        + b[2] * torch.exp(-((x - b[3]) ** 2) / b[4] ** 2)
        + b[5] * torch.exp(-((x - b[6]) ** 2) / b[7] ** 2)
    )


def _lanczos(b: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    return b[0] * torch.exp(-b[1] * x) + b[2] * torch.exp(-b[3] * x) + b[4] * torch.exp(-b[5] * x)


def _enso(b: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    w = 2 * _PI * x
    return (
        b[0]
        + b[1] * torch.cos(w / 12)
        + b[2] * torch.sin(w / 12)
        + b[4] * torch.cos(w / b[3])
        + b[5] * torch.sin(w / b[3])
        + b[7] * torch.cos(w / b[6])
        + b[8] * torch.sin(w / b[6])
    )


def _misra1a(b: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    return b[0] * (1 - torch.exp(-b[1] * x))


def _chwirut(b: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    return torch.exp(-b[0] * x) / (b[1] + b[2] * x)


_ONE_X: dict[str, Callable[[list[torch.Tensor], torch.Tensor], torch.Tensor]] = {
    "Misra1a": _misra1a,
    "BoxBOD": _misra1a,
    "Chwirut1": _chwirut,
    "Chwirut2": _chwirut,
    "Lanczos1": _lanczos,
    "Lanczos2": _lanczos,
    "Lanczos3": _lanczos,
    "Gauss1": _gauss,
    "Gauss2": _gauss,
    "Gauss3": _gauss,
    "Thurber": _rational3,
    "Hahn1": _rational3,
    "ENSO": _enso,
    "DanWood": lambda b, x: b[0] * x ** b[1],
    "Misra1b": lambda b, x: b[0] * (1 - (1 + b[1] * x / 2) ** (-2)),
    "Misra1c": lambda b, x: b[0] * (1 - (1 + 2 * b[1] * x) ** (-0.5)),
    "Misra1d": lambda b, x: b[0] * b[1] * x / (1 + b[1] * x),
    "Kirby2": lambda b, x: (b[0] + b[1] * x + b[2] * x**2) / (1 + b[3] * x + b[4] * x**2),
    "MGH17": lambda b, x: b[0] + b[1] * torch.exp(-x * b[3]) + b[2] * torch.exp(-x * b[4]),
    "Roszman1": lambda b, x: b[0] - b[1] * x - torch.atan(b[2] / (x - b[3])) / _PI,
    "MGH09": lambda b, x: b[0] * (x**2 + x * b[1]) / (x**2 + x * b[2] + b[3]),
    "Rat42": lambda b, x: b[0] / (1 + torch.exp(b[1] - b[2] * x)),
    "MGH10": lambda b, x: b[0] * torch.exp(b[1] / (x + b[2])),
    "Eckerle4": lambda b, x: (b[0] / b[1]) * torch.exp(-0.5 * ((x - b[2]) / b[1]) ** 2),
    "Rat43": lambda b, x: b[0] / (1 + torch.exp(b[1] - b[2] * x)) ** (1 / b[3]),
    "Bennett5": lambda b, x: b[0] * (b[1] + x) ** (-1 / b[2]),
}


def torch_model(name: str) -> Model:
    """The hand-written torch model for ``name``: ``f(b, x) -> (K, N)``."""
    if name == "Nelson":
        return lambda b, x: b[0] - b[1] * x["x1"] * torch.exp(-b[2] * x["x2"])
    one = _ONE_X[name]
    return lambda b, x: one(b, x["x"])


_EVAL_NAMESPACE = {
    "exp": torch.exp,
    "log": torch.log,
    "sin": torch.sin,
    "cos": torch.cos,
    "arctan": torch.atan,
    "pi": _PI,
}


def eval_model_text(problem: NistProblem, b: list[torch.Tensor], x: dict) -> torch.Tensor:
    """Evaluate ``problem.model`` (Python syntax) with torch functions; a parser cross-check."""
    names = {f"b{i + 1}": v for i, v in enumerate(b)} | dict(x)
    return eval(problem.model, {"__builtins__": {}, **_EVAL_NAMESPACE}, names)


def residual_fn(
    problem: NistProblem, model: Model | None = None, dtype: torch.dtype = torch.float64
) -> Callable[[torch.Tensor], torch.Tensor]:
    """``theta (K, P) -> r (K, N)`` = model - y, for the LM kernel."""
    model = model or torch_model(problem.name)
    x = {k: torch.as_tensor(v, dtype=dtype) for k, v in problem.x.items()}
    y = torch.as_tensor(problem.y, dtype=dtype)

    def residuals(theta: torch.Tensor) -> torch.Tensor:
        b = [theta[:, i : i + 1] for i in range(theta.shape[1])]  # each (K, 1)
        return model(b, x) - y

    return residuals


def lre(estimate: np.ndarray, certified: np.ndarray) -> np.ndarray:
    """Log relative error: the number of matching significant digits (capped at 15)."""
    rel = np.abs(estimate - certified) / np.abs(certified)
    with np.errstate(divide="ignore"):
        return np.minimum(-np.log10(rel), 15.0)


if __name__ == "__main__":
    for nm in NAMES:
        prob = load(nm)
        b_cert = [torch.tensor([[v]], dtype=torch.float64) for v in prob.certified]
        xs = {k: torch.as_tensor(v) for k, v in prob.x.items()}
        diff = (eval_model_text(prob, b_cert, xs) - torch_model(nm)(b_cert, xs)).abs().max()
        rss = float(((torch_model(nm)(b_cert, xs) - torch.as_tensor(prob.y)) ** 2).sum())
        print(f"{nm:9s} {prob.response:6s}= {prob.model}  |diff|={float(diff):.1e}", end="")
        print(f"  rss/cert={rss / prob.rss:.9f} P={prob.n_params} N={len(prob.y)}")
