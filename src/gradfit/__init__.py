"""gradfit: fit any model to data with a visible PyTorch training loop.

Example:
    >>> import gradfit as gf
    >>> x, y = gf.datasets.quadratic(seed=0)
    >>> result = gf.fit("a*x**2 + b*x + c", x, y)
    >>> sorted(result.params)
    ['a', 'b', 'c']
"""

from importlib.metadata import PackageNotFoundError, version

from gradfit import datasets
from gradfit.batch.fit_batch import fit_batch
from gradfit.errors import (
    CheckpointError,
    DataError,
    ExpressionError,
    GradfitError,
    ModelError,
    OptionError,
    OutputError,
)
from gradfit.fitting.fit import fit
from gradfit.model import losses, models
from gradfit.model.models import Model
from gradfit.options import FitOptions
from gradfit.results.batch_result import BatchResult
from gradfit.results.fit_result import FitResult

try:
    __version__ = version("gradfit")
except PackageNotFoundError:  # running from a source tree
    __version__ = "0+unknown"

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
    "losses",
    "models",
]
