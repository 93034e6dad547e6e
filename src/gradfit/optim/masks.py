"""Masks of valid points ``[K, N]``, and the one that says "every point valid" cheaply.

``fit_batch``'s tensors mark an all-valid chunk with one value broadcast (every stride 0):
these answer for it without a pass over ``K·N`` values.
"""

from __future__ import annotations

import torch

Tensor = torch.Tensor


def all_valid(mask: Tensor) -> bool:
    """Whether ``mask`` marks every point valid; a broadcast value is read once."""
    if mask.numel() > 0 and all(stride == 0 for stride in mask.stride()):
        return bool(mask.reshape(-1)[0])
    return bool(mask.all())


def count_valid(mask: Tensor) -> Tensor:
    """``mask.sum(-1)``, without a pass over an all-valid ``mask``."""
    if mask.numel() > 0 and all_valid(mask):
        return torch.full(mask.shape[:-1], mask.shape[-1], dtype=torch.int64, device=mask.device)
    return mask.sum(-1)
