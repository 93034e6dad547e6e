"""Type aliases shared across the package."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
import torch

Tensor = torch.Tensor
ArrayLike = Tensor | np.ndarray | list | tuple
#: x is one array, or a mapping name -> array for several independent variables.
XLike = ArrayLike | Mapping[str, ArrayLike]
#: ``f(x, params) -> y_pred``; params is a tensor ``[..., P]``.
ModelFn = Callable[..., Tensor]
#: ``loss(y_pred, y_true) -> scalar``.
LossFn = Callable[[Tensor, Tensor], Tensor]
