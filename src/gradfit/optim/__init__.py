"""Optimizers by name: the post's ``gd``, ``sgd``, ``adam``, ``lbfgs`` and Levenberg–Marquardt."""

from __future__ import annotations

from types import ModuleType

from gradfit.optim.first_order import Adam, GradientDescent, Momentum

FIRST_ORDER = {"gd": GradientDescent, "sgd": Momentum, "adam": Adam}
OPTIMIZERS = ("auto", "gd", "sgd", "adam", "lbfgs", "lm")
#: default learning rates: the post's 1e-3 for gd; Adam's usual step is larger
DEFAULT_LR = {"gd": 1e-3, "sgd": 1e-3, "adam": 1e-2, "lbfgs": 1.0}


def learning_rate(optimizer: str, lr: float | None) -> float | None:
    """``lr``, or the optimizer's default; None for ``lm``, which chooses its own steps."""
    if optimizer == "lm":
        return None
    lr = DEFAULT_LR[optimizer] if lr is None else lr
    if not lr > 0:
        from gradfit.errors import OptionError

        raise OptionError(f"lr must be > 0, got {lr}")
    return lr


def check_epochs(epochs: int | None) -> None:
    """Refuse an epoch (LM: iteration) limit below 1; None means the optimizer's default."""
    if epochs is not None and not epochs >= 1:
        from gradfit.errors import OptionError

        raise OptionError(f"epochs must be >= 1 (or left out for the default), got {epochs}")


__all__ = [
    "DEFAULT_LR", "FIRST_ORDER", "OPTIMIZERS", "Adam", "GradientDescent", "Momentum",
    "check_epochs", "learning_rate",
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
