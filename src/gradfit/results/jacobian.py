"""The model's prediction and Jacobian at given parameters, for the statistics of a result.

``fitting`` (a fit's covariance when the optimizer left no Jacobian behind) and
``FitResult.confidence_band`` both need it; it lives here, below both, so neither imports
the other for it (``fitting`` builds results; results never import ``fitting``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from gradfit.model.models import Model

Tensor = torch.Tensor


def prediction_and_jacobian(model: Model, x: Any, params: Tensor) -> tuple[Tensor, Tensor]:
    """``(y_pred [N], J [N, P])`` at ``params`` (all parameters, fixed ones included), detached.

    The model's own derivatives where it has them (expression models), else forward-mode
    autodiff (``torch.func.jacfwd``) through the model.
    """
    symbolic = model.jacobian(x, params)
    if symbolic is not None:
        return symbolic[0].detach(), symbolic[1].detach()
    with torch.enable_grad():
        J = torch.func.jacfwd(lambda p: model(x, p))(params)  # (N, P)
        y_pred = model(x, params)
    return y_pred.detach(), J.detach()
