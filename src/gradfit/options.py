"""``FitOptions``: every option of a fit, validated once, passed whole.

``gradfit.fit`` and ``gradfit.fit_batch`` build one from their keyword arguments (or take a
ready one as ``options=``), the CLI builds one from its flags, and checkpoints and fit-many's
parts folders store its ``fingerprint`` so that a resumed run refuses changed options.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
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
#: the epoch limit of mini-batch training when none is given: an epoch is a pass over all rows
DEFAULT_MINIBATCH_EPOCHS = 100


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
        dtype, device, seed: float64 unless given; the data's device; the random seed
            (with ``batch_size`` it also decides the batches' order and the validation rows).
        batch_size: mini-batch training (gd, sgd, adam): one step per batch of this many rows,
            an epoch being one pass over the training rows (``fitting/minibatch.py``).
        shuffle: draw a new order of the rows every epoch (else the rows' own order).
        validation: a fraction in (0, 1) of the rows held out (chosen by ``seed``), or an
            explicit ``(x_val, y_val)``: the validation loss is recorded per epoch and the
            parameters with the best one are kept (mini-batch only).
        patience: stop after this many epochs without a better validation loss.

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
    batch_size: int | None = None
    shuffle: bool = True
    validation: float | tuple[Any, Any] | None = None
    patience: int | None = None

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
        self._check_minibatch()
        if self.nan_policy not in NAN_POLICIES:
            raise OptionError(
                f"nan_policy must be one of {', '.join(NAN_POLICIES)}, got {self.nan_policy!r}"
            )

    def _check_minibatch(self) -> None:
        """batch_size, shuffle, validation, patience: types and ranges (which optimizer may
        take them is ``resolve``'s business)."""
        size = self.batch_size
        if size is not None and not (_whole(size) and size >= 1):
            raise OptionError(f"batch_size must be a whole number >= 1, got {size!r}")
        if not isinstance(self.shuffle, bool):
            raise OptionError(f"shuffle must be True or False, got {self.shuffle!r}")
        if self.seed is not None and not _whole(self.seed):
            raise OptionError(f"seed must be a whole number, got {self.seed!r}")
        held = self.validation
        if isinstance(held, float | int) and not isinstance(held, bool):
            if not 0 < held < 1:
                raise OptionError(
                    f"validation must be a fraction in (0, 1) or (x_val, y_val), got {held}"
                )
        elif held is not None and not (isinstance(held, tuple | list) and len(held) in (2, 3)):
            raise OptionError(
                "validation must be a fraction in (0, 1), (x_val, y_val) or "
                f"(x_val, y_val, sigma_val), got {type(held).__name__} {_short(held)}"
            )
        patience = self.patience
        if patience is not None and not (_whole(patience) and patience >= 1):
            raise OptionError(f"patience must be a whole number >= 1, got {patience!r}")
        if size is None and (held is not None or patience is not None):
            given = "validation" if held is not None else "patience"
            raise OptionError(f"{given} needs mini-batch training: give batch_size too")
        if patience is not None and held is None:
            raise OptionError("patience counts epochs without a better validation loss: "
                              "give validation too")  # fmt: skip

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
        if name == "auto" and self.batch_size is not None:
            name = "adam"  # mini-batch training is first-order
        elif name == "auto":
            name = "lm" if loss.least_squares else ("adam" if batched else "lbfgs")
        if name == "lm" and not loss.least_squares:
            alternative = "adam" if batched else "lbfgs or adam"
            raise OptionError(
                f"optimizer 'lm' needs a least-squares loss, not {loss.name!r}; use {alternative}"
            )
        if self.batch_size is not None and not batched and name not in FIRST_ORDER:
            other = (
                "LM is full-batch: leave batch_size out (LM takes any number of rows)"
                if name == "lm"
                else "lbfgs needs the full batch for its line search"
            )
            raise OptionError(
                f"batch_size needs a first-order optimizer (gd, sgd, adam), not {name!r}; {other}"
            )
        if batched and self.batch_size is not None:
            raise OptionError("fit_batch does not take batch_size: it fits every curve whole")
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
        if self.batch_size is not None and optimizer in FIRST_ORDER:
            return DEFAULT_MINIBATCH_EPOCHS
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


def _short(value: Any) -> str:
    """A value as at most 40 characters of text (an error names arrays without printing them)."""
    text = repr(value) if not isinstance(value, tuple | list) else f"of {len(value)} items"
    return text if len(text) <= 40 else text[:37] + "..."


def _whole(value: Any) -> bool:
    """An integer (NumPy's too), not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _same(value: Any, default: Any) -> bool:
    # identity first: tensors and arrays do not compare to None with ==
    return value is default or (isinstance(value, str | int | float | bool) and value == default)
