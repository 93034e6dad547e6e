"""``FitResult``: fitted parameters with their uncertainties, history, JSON and plots."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from gradfit.io.files import write_text_atomic
from gradfit.results import stats
from gradfit.results.diagnosis import diagnose
from gradfit.results.jacobian import prediction_and_jacobian

if TYPE_CHECKING:
    from gradfit.model.models import Model

Tensor = torch.Tensor


def _number(value: float) -> float | None:
    """JSON has no NaN/inf: those become null."""
    value = float(value)
    return value if math.isfinite(value) else None


@dataclass
class FitResult:
    """The outcome of ``gradfit.fit``.

    ``params``, ``stderr``: name -> value (stderr None for fixed parameters and for those the
    data do not determine); ``covariance``, ``correlation``: ``[P, P]`` tensors in
    ``param_names`` order (NaN where not estimable); ``history``: the loss per epoch (LM: per
    iteration). ``warnings``: plain sentences on why the result may not be trusted (not
    converged, parameters that cannot be told apart or ran away, at a bound); empty when all
    is well.
    """

    params: dict[str, float]
    stderr: dict[str, float | None]
    covariance: Tensor
    correlation: Tensor
    param_names: tuple[str, ...]
    loss: float
    history: list[float]
    n_iter: int
    converged: bool
    status: str
    message: str
    optimizer: str
    loss_name: str
    model: Model
    n_points: int
    dof: int
    chi2: float
    reduced_chi2: float
    r2: float
    aic: float
    bic: float
    absolute_sigma: bool = False
    n_omitted: int = 0
    at_bound: tuple[str, ...] = ()
    fixed: tuple[str, ...] = ()
    warnings: list[str] = field(default_factory=list)
    n_eval: int | None = None  # model evaluations (Levenberg–Marquardt; SciPy's nfev)
    data: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def build(
        cls,
        *,
        model: Model,
        problem: Any,
        params: Tensor,
        covariance: Tensor,
        outcome: Any,
        optimizer: str,
        statistics: Mapping[str, stats.Array],
        n_omitted: int,
        absolute_sigma: bool,
        start: Tensor | None = None,
        estimability: stats.Estimability | None = None,
    ) -> FitResult:
        space = problem.space
        names = space.names
        # one fit's statistics on the CPU run in NumPy (see fitting._result)
        cov = covariance.numpy() if covariance.device.type == "cpu" else covariance
        sd = stats.stderr_from(cov)
        fixed = tuple(n for n, v in zip(names, space.fixed, strict=True) if v is not None)
        at_bound = space.at_bound(params)
        result = cls(
            params={n: float(v) for n, v in zip(names, params.tolist(), strict=True)},
            stderr={
                n: (None if n in fixed or not math.isfinite(s) else s)
                for n, s in zip(names, sd.tolist(), strict=True)
            },
            covariance=covariance,
            correlation=torch.as_tensor(stats.correlation(cov), device=covariance.device),
            param_names=names,
            loss=outcome.loss,
            history=outcome.history,
            n_iter=len(outcome.history),
            n_eval=outcome.n_eval,
            converged=outcome.converged,
            status=outcome.status,
            message=outcome.message,
            optimizer=optimizer,
            loss_name=problem.loss.name,
            model=model,
            n_points=int(statistics["n_points"]),
            dof=int(statistics["dof"]),
            chi2=float(statistics["chi2"]),
            reduced_chi2=float(statistics["reduced_chi2"]),
            r2=float(statistics["r2"]),
            aic=float(statistics["aic"]),
            bic=float(statistics["bic"]),
            absolute_sigma=absolute_sigma,
            n_omitted=n_omitted,
            at_bound=tuple(n for n, flag in zip(names, at_bound.tolist(), strict=True) if flag),
            fixed=fixed,
            data={"x": problem.x, "y": problem.y, "sigma": problem.loss.sigma},
        )
        if start is not None and estimability is not None:
            result.warnings = diagnose(result, problem, start.tolist(), estimability)
        return result

    @property
    def values(self) -> Tensor:
        """The parameters as one vector in ``param_names`` order."""
        return self.covariance.new_tensor([self.params[n] for n in self.param_names])

    def predict(self, x: Any) -> Tensor:
        """The fitted model at ``x`` (array, or mapping name -> array)."""
        return self.model(self._as_x(x), self.values).detach()

    def _as_x(self, x: Any) -> Any:
        dtype, device = self.covariance.dtype, self.covariance.device
        if isinstance(x, dict):
            return {k: torch.as_tensor(v, dtype=dtype, device=device) for k, v in x.items()}
        return torch.as_tensor(x, dtype=dtype, device=device)

    def confidence_band(self, x: Any, level: float = 0.95) -> tuple[Tensor, Tensor]:
        """Lower and upper confidence band of the fitted curve (delta method, Student t).

        The half-width at each x is ``t · sqrt(g(x)ᵀ C g(x))`` with ``g = ∂f/∂params``.
        """
        y_pred, J = prediction_and_jacobian(self.model, self._as_x(x), self.values)
        free = [i for i, n in enumerate(self.param_names) if n not in self.fixed]
        C = self.covariance[free][:, free]
        g = J[..., free]
        variance = ((g @ C) * g).sum(-1).clamp_min(0)
        t = stats.student_t_quantile(0.5 + level / 2, self.dof)
        half = t * variance.sqrt()
        return y_pred - half, y_pred + half

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict (NaN/inf as null)."""
        matrix = [[_number(v) for v in row] for row in self.covariance.tolist()]
        correlation = [[_number(v) for v in row] for row in self.correlation.tolist()]
        return {
            "model": getattr(self.model, "formula", str(self.model)),
            "param_names": list(self.param_names),
            "params": {n: _number(v) for n, v in self.params.items()},
            "stderr": {n: (None if v is None else _number(v)) for n, v in self.stderr.items()},
            "covariance": matrix,
            "correlation": correlation,
            "loss": _number(self.loss),
            "loss_name": self.loss_name,
            "optimizer": self.optimizer,
            "n_iter": self.n_iter,
            "n_eval": self.n_eval,
            "converged": self.converged,
            "status": self.status,
            "message": self.message,
            "warnings": list(self.warnings),
            "n_points": self.n_points,
            "n_omitted": self.n_omitted,
            "dof": self.dof,
            "chi2": _number(self.chi2),
            "reduced_chi2": _number(self.reduced_chi2),
            "r2": _number(self.r2),
            "aic": _number(self.aic),
            "bic": _number(self.bic),
            "absolute_sigma": self.absolute_sigma,
            "fixed": list(self.fixed),
            "at_bound": list(self.at_bound),
            "history": [_number(v) for v in self.history],
        }

    def to_json(self, indent: int | None = 2) -> str:
        """The results as JSON text."""
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)

    def save(self, path: str | Path) -> Path:
        """Write ``to_json()`` to ``path`` atomically."""
        return write_text_atomic(Path(path), self.to_json() + "\n")

    # The views read results and are never imported by them at load time: these two methods
    # are thin conveniences that import their view when called (a one-way, on-demand use).

    def plot(self, out_dir: str | Path) -> list[Path]:
        """Write ``fit.png`` (data, fit, confidence band, residuals) and ``history.png``
        (``gradfit.views.plots``, imported on call)."""
        from gradfit.views.plots import plot_fit, plot_history

        out = Path(out_dir)
        return [plot_fit(self, out / "fit.png"), plot_history(self.history, out / "history.png")]

    def report(self) -> str:
        """A plain-text report: parameters ± stderr, correlations, statistics, stop reason
        (``gradfit.views.report.text_report``, imported on call)."""
        from gradfit.views.report import text_report

        return text_report(self)

    def __repr__(self) -> str:
        shown = ", ".join(f"{n}={v:.6g}" for n, v in self.params.items())
        return f"FitResult({shown}, loss={self.loss:.6g}, status={self.status!r})"
