"""``loss.backward()`` for the loop's scalar losses, without torch's Python argument handling.

``Tensor.backward`` reaches the C++ autograd engine through ``torch.autograd.backward``,
whose argument normalisation (tuples, shape checks, a ``ones_like`` seed, logging and
tensor-subclass hooks) costs ~25 µs per call here: a fifth of the post's whole step on its
100 points. For the case the loop has — a plain, scalar, CPU tensor — we make the same
engine call that ``torch.autograd.backward`` makes, and fall back to it for anything else
(subclasses, GPU tensors, a torch without the engine handle).
"""

from __future__ import annotations

import torch

_ENGINE = getattr(torch.autograd.Variable, "_execution_engine", None)
_SEEDS: dict[torch.dtype, torch.Tensor] = {}  # d loss / d loss = 1, one per dtype


def backward(loss: torch.Tensor) -> None:
    """Accumulate ``d loss / d leaf`` into every leaf's ``.grad``, as ``loss.backward()``."""
    if (
        _ENGINE is None
        or type(loss) is not torch.Tensor
        or not loss.is_cpu
        or loss.dim() != 0
        or torch._C._are_functorch_transforms_active()
    ):
        loss.backward()
        return
    seed = _SEEDS.get(loss.dtype)
    if seed is None:
        seed = _SEEDS[loss.dtype] = torch.ones((), dtype=loss.dtype)
    # the call torch.autograd.backward ends in: (outputs, grads, retain_graph, create_graph,
    # inputs), accumulating into .grad
    _ENGINE.run_backward(
        (loss,), (seed,), False, False, (), allow_unreachable=True, accumulate_grad=True
    )
