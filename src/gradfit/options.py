"""``FitOptions``: every option of a fit, validated once, passed whole.

``gradfit.fit`` and ``gradfit.fit_batch`` build one from their keyword arguments (or take a
ready one as ``options=``), the CLI builds one from its flags, and checkpoints and fit-many's
parts folders store its ``fingerprint`` so that a resumed run refuses changed options.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any

import torch

from gradfit.errors import OptionError, unknown_name
from gradfit.model.losses import Loss, get_loss
from gradfit.model.ties import parse_ties
from gradfit.optim import DEFAULT_LR, FIRST_ORDER, OPTIMIZERS

Tensor = torch.Tensor
NAN_POLICIES = ("raise", "omit")
#: the epoch limit of the first-order optimizers when none is given (the post's 15,000)
DEFAULT_EPOCHS = 15_000


@dataclasses.dataclass(frozen=True)
class FitOptions:
    """How to fit: loss, optimizer and its settings, start, bounds, statistics, numbers.

    Args:
        loss: ``mse`` (the post's), ``sse``, ``chi2``, ``mae``, ``huber``, ``soft_l1``,
            ``cauchy``, ``arctan``, a ``Loss`` or a callable ``loss(y_pred, y_true)``.
        f_scale: soft margin between inliers and outliers of the robust losses.
        optimizer: ``auto``, ``lm``, ``gd``, ``sgd``, ``adam``, ``lbfgs`` (see ``resolve``).
        lr, epochs, tol: learning rate, epoch (LM: iteration) limit, relative loss-change stop
            (a negative tol: run every epoch).
        p0: starting values (mapping or vector; ``fit_batch``: also ``[K, P]``).
        bounds, fixed: ``{name: (lo, hi)}`` (None = unbounded) and ``{name: value}``.
        ties: ``{name: expression}`` of other parameters and numbers, lmfit's ``expr``
            (``{"p2_width": "p1_width"}``; expression models only; ``gradfit.model.ties``).
        absolute_sigma: take ``sigma`` as absolute (no χ²ᵣ rescaling of the covariance).
        nan_policy: ``raise`` or ``omit`` rows with NaN or inf (``fit``; ``fit_batch`` pads).
        dtype, device, seed: float64 unless given; the data's device; the random seed.

    Example:
        >>> FitOptions(loss="huber", optimizer="auto").resolve(batched=False)
        'lm'
        >>> FitOptions(lr=-1)
        Traceback (most recent call last):
        ...
        gradfit.errors.OptionError: lr must be > 0, got -1
    """

    loss: str | Loss | Callable[[Tensor, Tensor], Tensor] = "mse"
    f_scale: float = 1.0
    optimizer: str = "auto"
    lr: float | None = None
    epochs: int | None = None
    tol: float | None = None
    p0: Any = None
    bounds: Mapping[str, Any] | None = None
    fixed: Mapping[str, float] | None = None
    ties: Mapping[str, str] | None = None
    absolute_sigma: bool = False
    nan_policy: str = "raise"
    dtype: torch.dtype | None = None
    device: torch.device | str | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        self.loss_fn  # noqa: B018 - an unknown loss name fails here, with the valid ones
        if not (isinstance(self.f_scale, int | float) and math.isfinite(self.f_scale)):
            raise OptionError(f"f_scale must be a finite number > 0, got {self.f_scale!r}")
        if not self.f_scale > 0:
            raise OptionError(f"f_scale must be > 0, got {self.f_scale}")
        if self.optimizer not in OPTIMIZERS:
            raise unknown_name("optimizer", self.optimizer, OPTIMIZERS)
        if self.lr is not None and not self.lr > 0:
            raise OptionError(f"lr must be > 0, got {self.lr}")
        if self.epochs is not None and not self.epochs >= 1:
            raise OptionError(
                f"epochs must be >= 1 (or left out for the default), got {self.epochs}"
            )
        if self.tol is not None and not math.isfinite(self.tol):  # < 0: never stop on it
            raise OptionError(f"tol must be a finite number, got {self.tol}")
        parse_ties(self.ties)
        if self.nan_policy not in NAN_POLICIES:
            raise OptionError(
                f"nan_policy must be one of {', '.join(NAN_POLICIES)}, got {self.nan_policy!r}"
            )

    @property
    def loss_fn(self) -> Loss:
        """The loss as a ``Loss`` with ``f_scale`` (sigma is the data's business)."""
        return get_loss(self.loss).with_options(f_scale=self.f_scale)

    def resolve(self, *, batched: bool) -> str:
        """The optimizer to run, or a clear refusal: the one place ``auto`` is decided.

        ``auto`` is ``lm`` for least-squares losses (plain and robust); otherwise ``lbfgs``
        for one fit (full-batch quasi-Newton) and ``adam`` for ``fit_batch``, which does not
        batch lbfgs (every curve would need its own line search).
        """
        loss = self.loss_fn
        name = self.optimizer
        if name == "auto":
            name = "lm" if loss.least_squares else ("adam" if batched else "lbfgs")
        if name == "lm" and not loss.least_squares:
            alternative = "adam" if batched else "lbfgs or adam"
            raise OptionError(
                f"optimizer 'lm' needs a least-squares loss, not {loss.name!r}; use {alternative}"
            )
        if batched and name == "lbfgs":
            raise OptionError(
                "fit_batch does not batch lbfgs (each curve would need its own line search); "
                "use lm, gd, sgd or adam, or gradfit.fit curve by curve"
            )
        return name

    def learning_rate(self, optimizer: str) -> float | None:
        """``lr``, or ``optimizer``'s default; None for ``lm``, which chooses its own steps."""
        if optimizer == "lm":
            return None
        return DEFAULT_LR[optimizer] if self.lr is None else float(self.lr)

    def epoch_limit(self, optimizer: str) -> int | None:
        """``epochs``, or the first-order default; None lets LM and lbfgs choose theirs."""
        if self.epochs is not None:
            return self.epochs
        return DEFAULT_EPOCHS if optimizer in FIRST_ORDER else None

    def replace(self, **changes: Any) -> FitOptions:
        """A copy with ``changes`` (validated again)."""
        return dataclasses.replace(self, **changes)


def options_from(options: FitOptions | None, **given: Any) -> FitOptions:
    """``options``, or one built from keyword options; both at once is refused.

    ``given`` are the keyword options of ``fit``/``fit_batch`` as the caller passed them; those
    left at FitOptions' defaults do not count as given.
    """
    if options is None:
        return FitOptions(**given)
    defaults = FitOptions()
    clashing = [name for name, value in given.items() if not _same(value, getattr(defaults, name))]
    if clashing:
        raise OptionError(
            f"give the options either as options=FitOptions(...) or as keywords, not both "
            f"(also given: {', '.join(clashing)})"
        )
    return options


def _same(value: Any, default: Any) -> bool:
    # identity first: tensors and arrays do not compare to None with ==
    return value is default or (isinstance(value, str | int | float | bool) and value == default)
