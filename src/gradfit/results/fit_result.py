"""``FitResult``: fitted parameters with their uncertainties, history, JSON and plots."""

from __future__ import annotations

import json
import math
import platform
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from gradfit.io.files import write_text_atomic
from gradfit.results import stats
from gradfit.results.diagnosis import diagnose
from gradfit.results.history_store import history_entry, load_history, store_history
from gradfit.results.jacobian import prediction_and_jacobian

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from gradfit.model.models import Model

Tensor = torch.Tensor


def _number(value: float) -> float | None:
    """JSON has no NaN/inf: those become null."""
    value = float(value)
    return value if math.isfinite(value) else None


def _float(value: Any) -> float:
    """A number read back from JSON: null is NaN."""
    return math.nan if value is None else float(value)


def versions() -> dict[str, str]:
    """gradfit's, torch's and Python's versions, as results.json records them."""
    from gradfit import __version__

    return {"gradfit": __version__, "torch": torch.__version__, "python": platform.python_version()}


def _model_spec(model: Model) -> dict[str, Any]:
    """What ``FitResult.load`` needs to rebuild the model: an expression (built-ins and
    composites are expressions) from its text; a function or ``nn.Module`` only by name."""
    if getattr(model, "expression", None) is not None:
        kind = "expression"
    elif getattr(model, "module", None) is not None:
        kind = "module"
    else:
        kind = "function"
    return {
        "kind": kind,
        "name": str(getattr(model, "name", "model")),
        "independent": list(getattr(model, "independent", ("x",))),
        "param_names": list(getattr(model, "param_names", ())),
    }


def _plain(values: Any) -> Any:
    """A tensor or array as nested lists (NaN/inf as null), a scalar as a number, None as is."""
    if values is None:
        return None
    array = values.detach().cpu() if isinstance(values, Tensor) else torch.as_tensor(values)
    if bool(torch.isfinite(array).all()):
        return array.tolist()
    flat = [_number(v) for v in array.double().reshape(-1).tolist()]
    return flat[0] if array.dim() == 0 else _nest(flat, list(array.shape))


def _nest(flat: list[Any], shape: list[int]) -> Any:
    if len(shape) <= 1:
        return flat
    step = len(flat) // shape[0] if shape[0] else 0
    return [_nest(flat[i * step : (i + 1) * step], shape[1:]) for i in range(shape[0])]


#: results.json keeps the fitted data up to this many points (~60 bytes each); a larger fit
#: saves its numbers alone, and a loaded one plots its curve and band without the points
DATA_IN_JSON_MAX = 100_000


def _data_dict(data: Mapping[str, Any]) -> dict[str, Any] | None:
    """The fitted data (x, y, sigma, axis labels) as JSON, None when there are none (or more
    than ``DATA_IN_JSON_MAX`` points)."""
    if "x" not in data or "y" not in data:
        return None
    points = data["y"].numel() if isinstance(data["y"], Tensor) else np.size(data["y"])
    if points > DATA_IN_JSON_MAX:
        return None
    x = data["x"]
    y = data["y"]
    dtype = str(getattr(y, "dtype", torch.float64)).removeprefix("torch.")
    return {
        "x": {str(k): _plain(v) for k, v in x.items()} if isinstance(x, Mapping) else _plain(x),
        "y": _plain(y),
        "sigma": _plain(data.get("sigma")),
        "dtype": dtype,
        "labels": dict(data.get("labels") or {}),
    }


def _tensor(values: Any, dtype: torch.dtype) -> Tensor:
    """Nested lists from JSON (null as NaN) as a tensor."""
    return torch.as_tensor(np.array(values, dtype=float), dtype=dtype)


def _data_from(saved: Mapping[str, Any] | None) -> tuple[dict[str, Any], torch.dtype]:
    if not saved:
        return {}, torch.float64
    dtype = getattr(torch, str(saved.get("dtype", "float64")), torch.float64)
    x = saved["x"]
    data: dict[str, Any] = {
        "x": (
            {k: _tensor(v, dtype) for k, v in x.items()}
            if isinstance(x, Mapping)
            else _tensor(x, dtype)
        ),
        "y": _tensor(saved["y"], dtype),
        "sigma": None if saved.get("sigma") is None else _tensor(saved["sigma"], dtype),
    }
    if saved.get("labels"):
        data["labels"] = dict(saved["labels"])
    return data, dtype


def _rebuilt_model(
    spec: Mapping[str, Any], formula: str, names: tuple[str, ...], given: Any
) -> Model:
    """The saved model: ``given`` (checked against the saved parameter names), an expression
    rebuilt from its text (a built-in by its name, with its starting guess), or a stand-in
    that refuses to evaluate (a Python function or ``nn.Module`` is not saved)."""
    from gradfit.errors import ModelError
    from gradfit.model.models import Model, as_model, get_builtin

    if given is not None:
        model = as_model(given)
        if tuple(model.param_names) != names:
            raise ModelError(
                f"the model given has parameters {list(model.param_names)}, the saved result "
                f"{list(names)}"
            )
        return model
    name = str(spec.get("name", formula))
    independent = tuple(spec.get("independent", ("x",)))
    names = tuple(spec.get("param_names") or names)  # the model's own (tied ones included)
    if spec.get("kind", "expression") == "expression":
        builtin = get_builtin(name) if name != formula else None
        if builtin is not None and builtin.formula == formula and builtin.param_names == names:
            return builtin
        model = Model(formula, params=names, independent=independent)
        model.name = name
        return model
    return _saved_only(spec, formula, names, independent)


def _saved_only(
    spec: Mapping[str, Any], formula: str, names: tuple[str, ...], independent: tuple[str, ...]
) -> Model:
    """A stand-in for a model that results.json cannot rebuild: it names the model and
    refuses to evaluate, with a ``ModelError`` that says what to do."""
    from gradfit.errors import ModelError
    from gradfit.model.models import Model

    what = "nn.Module" if spec.get("kind") == "module" else "Python function"
    message = (
        f"this result was loaded from a file and its model, the {what} {formula}, cannot "
        "be rebuilt from text: its numbers are loaded, but to predict or plot pass the "
        "model again, FitResult.load(path, model=...)"
    )

    class SavedModel(Model):
        def __init__(self) -> None:
            self.independent = independent
            self.expression = None
            self.module = None
            self.guess_fn = None
            self._defaults = None
            self.param_names = names
            self.formula = formula
            self.name = str(spec.get("name", formula))

        def __call__(self, x: Any, params: Tensor) -> Tensor:
            raise ModelError(message)

        def jacobian(self, x: Any, params: Tensor) -> tuple[Tensor, Tensor] | None:
            raise ModelError(message)

        def value_and_derivatives(self, x: Any, params: Tensor) -> list[Tensor] | None:
            raise ModelError(message)

    return SavedModel()


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
    # tied parameters (``ties=``): name -> expression; in params/stderr, not in param_names
    tied: dict[str, str] = field(default_factory=dict)
    n_eval: int | None = None  # model evaluations (Levenberg–Marquardt; SciPy's nfev)
    # how the Jacobian was taken: "analytic" (symbolic or autodiff) or "numerical" (finite
    # differences, a model written in NumPy; ``message`` says so too, as results.json keeps it)
    jacobian: str = "analytic"
    # mini-batch training with validation: the validation loss after every epoch
    validation_history: list[float] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict, repr=False)
    # where it came from (the CLI: the input file and the command line); in results.json
    provenance: dict[str, Any] = field(default_factory=dict)
    # a loaded result: the versions that wrote it (``to_dict`` records the running ones)
    saved_versions: dict[str, str] = field(default_factory=dict, repr=False)

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

    def prediction_band(
        self, x: Any, level: float = 0.95, sigma: Any = None
    ) -> tuple[Tensor, Tensor]:
        """Lower and upper band for a new observation at ``x``: the confidence band plus the
        noise, half-width ``t · sqrt(g(x)ᵀ C g(x) + s²)`` (same ``t`` as the confidence band).

        The noise variance ``s²``: ``χ²ᵣ`` for an unweighted fit (the residual variance);
        ``σ(x)² · χ²ᵣ`` for a weighted one; ``σ(x)²`` alone with ``absolute_sigma`` (σ = 1
        when the fit had none, as the covariance assumes). ``sigma``: the new points' σ (a
        number or one per x), required for a weighted fit.
        """
        weighted = self.data.get("sigma") is not None
        if weighted and sigma is None:
            raise ValueError("a weighted fit's prediction band needs sigma= at the new x")
        y_pred, J = prediction_and_jacobian(self.model, self._as_x(x), self.values)
        free = [i for i, n in enumerate(self.param_names) if n not in self.fixed]
        g = J[..., free]
        variance = ((g @ self.covariance[free][:, free]) * g).sum(-1).clamp_min(0)
        noise = self._as_x(1.0 if sigma is None else sigma) ** 2
        if not self.absolute_sigma:
            noise = noise * self.reduced_chi2
        t = stats.student_t_quantile(0.5 + level / 2, self.dof)
        half = t * (variance + noise).sqrt()
        return y_pred - half, y_pred + half

    def confidence_intervals(
        self,
        level: float = 0.6827,
        method: str = "profile",
        *,
        n: int = 1000,
        seed: int | None = None,
        options: Any = None,
    ) -> dict[str, tuple[float, float]]:
        """``{name: (lo, hi)}`` for the free parameters (``gradfit.results.intervals``).

        ``method="profile"``: lmfit's ``conf_interval`` (F-test on χ², the other parameters
        refitted); ``"bootstrap"``: residual resampling, ``n`` refits in one ``fit_batch``
        call, percentile intervals (``seed`` for reproducibility). Plain least squares only.
        ``options``: a ``FitOptions`` with the fit's bounds and optimizer settings, if any.
        """
        from gradfit.results.intervals import confidence_intervals

        return confidence_intervals(self, level, method, n=n, seed=seed, options=options)

    def to_dict(self, history_file: str | None = None) -> dict[str, Any]:
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
            **({"tied": dict(self.tied)} if self.tied else {}),  # only a fit with ties
            "at_bound": list(self.at_bound),
            "history": history_entry(self.history, history_file),
            # only a fit with validation (mini-batch); NaN as null
            **(
                {"validation_history": [_number(v) for v in self.validation_history]}
                if self.validation_history
                else {}
            ),
            "model_spec": _model_spec(self.model),
            "versions": versions(),
            "provenance": dict(self.provenance),
            "data": _data_dict(self.data),
        }

    def to_json(self, indent: int | None = 2, history_file: str | None = None) -> str:
        """The results as JSON text (the history inline, or named by ``history_file``)."""
        return json.dumps(self.to_dict(history_file), indent=indent, allow_nan=False)

    def save(self, path: str | Path) -> Path:
        """Write ``to_json()`` to ``path`` atomically; a history of more than
        ``INLINE_HISTORY`` epochs goes to ``<stem>.history.npz`` beside it (written first)."""
        path = Path(path)
        stored = store_history(self.history, path)
        return write_text_atomic(path, self.to_json(history_file=stored) + "\n")

    @classmethod
    def load(cls, path: str | Path, model: Any = None) -> FitResult:
        """Read a results.json written by ``save`` (or the CLI) back.

        Every saved number comes back as it was; the data (x, y, sigma) too, so ``predict``,
        ``confidence_band`` and ``plot`` work. An expression model (built-ins and composites
        are expressions) is rebuilt from its text; a Python function or ``nn.Module`` cannot
        be: pass it as ``model=`` (its parameter names must match), else ``predict`` raises a
        ``ModelError`` saying so. ``provenance`` and ``versions`` are as recorded.
        """
        saved = json.loads(Path(path).read_text())
        names = tuple(saved["param_names"])
        data, dtype = _data_from(saved.get("data"))
        covariance = _tensor(saved["covariance"], dtype).reshape(len(names), len(names))
        correlation = _tensor(saved["correlation"], dtype).reshape(len(names), len(names))
        spec = saved.get("model_spec") or {}
        stderr = saved["stderr"]
        result = cls(
            params={n: _float(v) for n, v in saved["params"].items()},
            stderr={n: (None if v is None else float(v)) for n, v in stderr.items()},
            covariance=covariance,
            correlation=correlation,
            param_names=names,
            loss=_float(saved["loss"]),
            history=load_history(saved["history"], Path(path)),
            validation_history=[_float(v) for v in saved.get("validation_history", [])],
            n_iter=int(saved["n_iter"]),
            converged=bool(saved["converged"]),
            status=str(saved["status"]),
            message=str(saved["message"]),
            optimizer=str(saved["optimizer"]),
            loss_name=str(saved["loss_name"]),
            model=_rebuilt_model(spec, str(saved["model"]), names, model),
            n_points=int(saved["n_points"]),
            dof=int(saved["dof"]),
            chi2=_float(saved["chi2"]),
            reduced_chi2=_float(saved["reduced_chi2"]),
            r2=_float(saved["r2"]),
            aic=_float(saved["aic"]),
            bic=_float(saved["bic"]),
            absolute_sigma=bool(saved["absolute_sigma"]),
            n_omitted=int(saved["n_omitted"]),
            at_bound=tuple(saved["at_bound"]),
            fixed=tuple(saved["fixed"]),
            warnings=list(saved["warnings"]),
            tied=dict(saved.get("tied") or {}),
            n_eval=saved["n_eval"],
            data=data,
            provenance=dict(saved.get("provenance") or {}),
            saved_versions=dict(saved.get("versions") or {}),
        )
        return result

    # The views read results and are never imported by them at load time: these methods are
    # thin conveniences that import their view when called (a one-way, on-demand use).

    def plot(self, path: str | Path | None = None) -> Figure:
        """The fit as a matplotlib ``Figure``: data, fitted curve, 95% confidence band, and
        the residuals below (``gradfit.views.plots.fit_figure``, imported on call); with
        ``path``, also written there as PNG."""
        from gradfit.views.plots import fit_figure, save_figure

        figure = fit_figure(self)
        if path is not None:
            save_figure(figure, Path(path))
        return figure

    def save_plots(self, out_dir: str | Path) -> list[Path]:
        """Write ``fit.png`` (``plot()``) and ``history.png`` into ``out_dir``."""
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
