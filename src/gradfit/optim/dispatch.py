"""Which Levenberg–Marquardt kernel fits a problem: the one place that decides.

``gradfit.fit`` (``least_squares.run_lm``), the CLI's ``gradfit fit`` (which goes through
``fit``) and ``fit_batch`` (``batch/fit_batch.py:_lm_chunk``) all ask :func:`lm_kernel`, so
the same problem gets the same kernel, and so the same digits, however it is asked.

The rule. The compiled kernel (``optim/compiled``, Numba) runs when all of these hold:

- ``GRADFIT_COMPILED`` is not ``0`` (read at each call) and Numba imports and can cache;
- the model is an expression (it has ``programs``) of one independent variable, which the
  kernel can interpret; ``x`` given as a mapping of that one name (as ``gradfit fit`` gives
  it, naming the column) counts: :func:`one_variable` hands the kernel the array;
- the loss is plain least squares (``mse``, ``sse``, ``chi2``, with or without sigma) or one
  of the robust losses the kernel knows (``huber``, ``soft_l1``, ``cauchy``, ``arctan``);
- float64 on the CPU;
- the caller does not need control after every iteration (``per_iteration``), see below;
- a requested cost history fits the kernel's buffer (``history`` ≤ 10⁶ iterations).

``bridge.supports`` is the capability check for the model, loss, dtype and device. Otherwise
the PyTorch kernel (``optim/lm.py``) runs; both give the same answer to rounding, not bit
for bit.

Hooks. The compiled kernel runs all its iterations without returning to Python, so a hook
that must see every iteration takes the PyTorch kernel: a user's ``hook=``, a checkpoint
(``checkpoint=`` saves every N iterations; LM resumes from the saved best parameters, so a
checkpointed LM fit runs the PyTorch kernel from start to end), or anything chained with
them (``problem.chain_hooks`` builds a new function, which is per-iteration). A hook that only
asks "stop?" says so with a true ``stop_only`` attribute (``cli/signals.py``'s
``StopRequest.hook`` does): it does not force the PyTorch kernel. On the compiled kernel it
is asked once, when the kernel returns, as if after the last iteration; a Ctrl-C or SIGTERM
that arrives while the kernel runs is handled by Python when it returns (an LM fit takes
milliseconds), and the fit then ends ``"interrupted"`` with the finished fit's parameters
(on the PyTorch kernel: after the iteration in progress). A second signal is handled at the
same moment, so "interrupted twice" stops without writing, as it does on either kernel.

Progress. ``fit(progress=True)`` shows no bar for LM on either kernel: a bar needs a
per-iteration hook, and an LM fit is over in milliseconds to seconds, in tens of
iterations, before a bar that advances every 100 would have moved.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import replace
from types import ModuleType
from typing import TYPE_CHECKING

from gradfit.optim import compiled_lm

if TYPE_CHECKING:
    import torch

    from gradfit.optim.problem import Hook, Problem

#: the longest cost history the compiled kernel keeps (a float per iteration: 8 MB)
COMPILED_MAX_HISTORY = 1_000_000


def stop_only(hook: Hook | None) -> bool:
    """Whether ``hook`` is absent or only asks "stop?" (a true ``stop_only`` attribute)."""
    return hook is None or bool(getattr(hook, "stop_only", False))


def lm_kernel(
    problem: Problem,
    robust: object,
    theta0: torch.Tensor,
    *,
    per_iteration: bool,
    history: int = 0,
) -> ModuleType | None:
    """The compiled kernel's module (``optim/compiled/bridge.py``) where it fits ``problem``
    (give it ``one_variable(problem)``), else None: run ``lm.levenberg_marquardt``. The rule
    is in this module's docstring.

    Args:
        problem: what is fitted (model, data, loss, parameter space).
        robust: None for plain least squares, else the loss's ``rho``.
        theta0: the starting (transformed) parameters ``[K, F]``: their dtype and device.
        per_iteration: the caller needs control after every iteration (a hook that is not
            :func:`stop_only`, a checkpoint); forces the PyTorch kernel.
        history: how many per-iteration costs the caller wants kept (``run_lm``: its
            iteration limit); 0 for none.
    """
    if per_iteration or history > COMPILED_MAX_HISTORY:
        return None
    if os.environ.get("GRADFIT_COMPILED", "1") == "0":  # before importing Numba (~0.2 s)
        return None
    if problem.model.programs is None:  # not an expression: nothing the kernel can interpret
        return None
    bridge = compiled_lm()
    if bridge is None or not bridge.supports(one_variable(problem), robust, theta0):
        return None
    return bridge


def one_variable(problem: Problem) -> Problem:
    """``problem`` with ``x = {name: values}`` of the model's one variable as ``values``.

    ``gradfit fit`` passes its x column by name; the model evaluates either form alike, and
    the compiled kernel reads an array.
    """
    x = problem.x
    if isinstance(x, Mapping) and len(x) == 1 and tuple(x) == tuple(problem.model.independent):
        return replace(problem, x=next(iter(x.values())))
    return problem
