"""gradfit: fit any model to data with a visible PyTorch training loop.

Example:
    >>> import gradfit as gf
    >>> x, y = gf.datasets.quadratic(seed=0)
    >>> result = gf.fit("a*x**2 + b*x + c", x, y)
    >>> sorted(result.params)
    ['a', 'b', 'c']

The public names load on first use (PEP 562), so ``import gradfit`` (and the CLI's help and
model list) do not load torch; ``from gradfit import fit`` and ``gf.fit`` work as ever.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from gradfit.errors import (
    CheckpointError,
    DataError,
    ExpressionError,
    GradfitError,
    ModelError,
    OptionError,
    OutputError,
)

if TYPE_CHECKING:
    from gradfit import datasets
    from gradfit.batch.fit_batch import fit_batch
    from gradfit.batch.fit_many import fit_many
    from gradfit.batch.shared import fit_shared
    from gradfit.fitting.fit import fit
    from gradfit.fitting.global_fit import fit_global
    from gradfit.model import losses, models
    from gradfit.model.models import Model
    from gradfit.options import FitOptions
    from gradfit.results.batch_result import BatchResult
    from gradfit.results.fit_result import FitResult

    __version__: str

#: public name -> (module, attribute in it; None: the module itself), imported when first used
_LAZY: dict[str, tuple[str, str | None]] = {
    "BatchResult": ("gradfit.results.batch_result", "BatchResult"),
    "FitOptions": ("gradfit.options", "FitOptions"),
    "FitResult": ("gradfit.results.fit_result", "FitResult"),
    "Model": ("gradfit.model.models", "Model"),
    "datasets": ("gradfit.datasets", None),
    "fit": ("gradfit.fitting.fit", "fit"),
    "fit_batch": ("gradfit.batch.fit_batch", "fit_batch"),
    "fit_many": ("gradfit.batch.fit_many", "fit_many"),
    "fit_global": ("gradfit.fitting.global_fit", "fit_global"),
    "fit_shared": ("gradfit.batch.shared", "fit_shared"),
    "losses": ("gradfit.model.losses", None),
    "models": ("gradfit.model.models", None),
    "xarray": ("gradfit.xarray", None),  # registers the DataArray accessor da.gradfit
}

__all__ = [
    "BatchResult",
    "CheckpointError",
    "DataError",
    "ExpressionError",
    "FitOptions",
    "FitResult",
    "GradfitError",
    "Model",
    "ModelError",
    "OptionError",
    "OutputError",
    "__version__",
    "datasets",
    "fit",
    "fit_batch",
    "fit_global",
    "fit_many",
    "fit_shared",
    "losses",
    "models",
]


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("gradfit")
    except PackageNotFoundError:  # running from a source tree
        return "0+unknown"


def __getattr__(name: str) -> Any:
    """Import a public name on first use and keep it (PEP 562)."""
    if name == "__version__":
        value: Any = _version()
    elif name in _LAZY:
        module_name, attribute = _LAZY[name]
        module = importlib.import_module(module_name)
        value = module if attribute is None else getattr(module, attribute)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
