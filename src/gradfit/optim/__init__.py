"""Optimizers by name: the post's ``gd``, ``sgd``, ``adam``, ``lbfgs`` and Levenberg–Marquardt."""

from __future__ import annotations

from types import ModuleType

from gradfit.optim.first_order import Adam, GradientDescent, Momentum

FIRST_ORDER = {"gd": GradientDescent, "sgd": Momentum, "adam": Adam}
OPTIMIZERS = ("auto", "gd", "sgd", "adam", "lbfgs", "lm")
#: default learning rates: the post's 1e-3 for gd; Adam's usual step is larger
DEFAULT_LR = {"gd": 1e-3, "sgd": 1e-3, "adam": 1e-2, "lbfgs": 1.0}


__all__ = [
    "DEFAULT_LR", "FIRST_ORDER", "OPTIMIZERS", "Adam", "GradientDescent", "Momentum",
]  # fmt: skip


def compiled_lm() -> ModuleType | None:
    """The compiled LM kernel's module, or None where Numba cannot be imported or cannot
    cache (no writable cache folder: RuntimeError); every fit then runs the PyTorch kernel.
    Imported on first use: Numba takes ~0.2 s to import."""
    try:
        from gradfit.optim.compiled import bridge as lm_compiled
    except (ImportError, RuntimeError, OSError):
        return None
    return lm_compiled
