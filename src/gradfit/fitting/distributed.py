"""One fit across processes: ``torchrun`` (or any launcher that sets ``WORLD_SIZE`` and
``RANK``) and ``torch.distributed``.

``group()`` sees the process group: one the caller has initialised, or one it initialises
from the environment (gloo for CPU data, nccl for CUDA) with a timeout on every collective,
so that a rank that fails makes the others fail too instead of waiting for ever
(``GRADFIT_COLLECTIVE_TIMEOUT`` seconds, default 120).

Data parallel, every rank taking its part of the rows:

* mini-batch gd, sgd, adam: every rank draws the same order of the rows (the same seed) and
  takes its part of each batch; ``SharedStep`` sums the gradients weighted by each part's
  share of the batch, so every rank takes the step one process takes on the whole batch;
* Levenberg–Marquardt (``run_lm_shared``): every rank evaluates its part of the residuals and
  the PyTorch kernel (``optim/lm.py``) sums [J r]ᵀ[J r] (JᵀJ, Jᵀr and the cost) and the
  geodesic correction's Jᵀu across ranks through its ``reduce`` hook: every rank takes the
  same step.

Rank 0 alone writes outputs (checkpoints, the CLI's files) and prints.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from gradfit.errors import GradfitError, OptionError
from gradfit.fitting.loop import apply_step
from gradfit.optim.first_order import State
from gradfit.optim.problem import Hook, LoopOutcome, LoopState, Problem

Tensor = torch.Tensor
#: seconds a collective waits for the other ranks before it fails (a rank that died)
DEFAULT_TIMEOUT = 120.0


class PeerFailed(GradfitError):
    """A collective failed: another rank of the group died, stopped, or timed out."""


@contextlib.contextmanager
def _collective(rank: int) -> Iterator[None]:
    """Turn a failed collective (gloo's "Connection closed by peer", a timeout) into one
    clear line on the ranks that did not fail themselves."""
    try:
        yield
    except RuntimeError as error:  # torch's DistBackendError and gloo's errors are these
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise PeerFailed(
            f"rank {rank}: another rank of the torchrun group failed or stopped (see its "
            f"error); this one's collective gave up: {first[:200]}"
        ) from None


@dataclass(frozen=True)
class Group:
    """This process's place in the group, and the collectives a fit needs."""

    rank: int
    world: int

    @property
    def leader(self) -> bool:
        """Rank 0: the one that writes and prints."""
        return self.rank == 0

    def all_sum(self, values: Tensor) -> Tensor:
        """``values`` summed over the ranks, in place (every rank gets the sum)."""
        with _collective(self.rank):
            dist.all_reduce(values, op=dist.ReduceOp.SUM)
        return values

    def broadcast_int(self, value: int) -> int:
        """Rank 0's ``value`` on every rank."""
        box = [value]
        with _collective(self.rank):
            dist.broadcast_object_list(box, src=0)
        return int(box[0])

    def check_same(self, what: str, value: Tensor) -> None:
        """Refuse, on every rank alike, when ranks were given different ``value`` (their data
        or options): the fit would otherwise mix problems."""
        mine = value.detach().to(torch.float64).reshape(-1)
        low, high = mine.clone(), mine.clone()
        with _collective(self.rank):
            dist.all_reduce(low, op=dist.ReduceOp.MIN)
            dist.all_reduce(high, op=dist.ReduceOp.MAX)
        if not torch.equal(low, high):
            raise OptionError(f"the ranks were given different {what}; give every rank the same")


def timeout() -> float:
    """The collectives' timeout in seconds (``GRADFIT_COLLECTIVE_TIMEOUT``)."""
    text = os.environ.get("GRADFIT_COLLECTIVE_TIMEOUT", "")
    try:
        value = float(text) if text else DEFAULT_TIMEOUT
    except ValueError:
        raise OptionError(f"GRADFIT_COLLECTIVE_TIMEOUT must be seconds, got {text!r}") from None
    if not value > 0:
        raise OptionError(f"GRADFIT_COLLECTIVE_TIMEOUT must be > 0, got {text!r}")
    return value


def world_size() -> int:
    """The launcher's ``WORLD_SIZE`` (1 when not under one)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    text = os.environ.get("WORLD_SIZE", "1")
    try:
        return int(text)
    except ValueError:
        raise OptionError(f"WORLD_SIZE must be a whole number, got {text!r}") from None


def group(device: torch.device) -> Group | None:
    """The process group (initialised here from the environment if needed), or None for one
    process."""
    if world_size() <= 1:
        return None
    if not dist.is_available():
        raise OptionError("WORLD_SIZE > 1 but this torch has no torch.distributed")
    if not dist.is_initialized():
        for name in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
            if name not in os.environ:
                raise OptionError(
                    f"WORLD_SIZE is {os.environ['WORLD_SIZE']} but {name} is not set: launch "
                    "with torchrun, or initialise torch.distributed yourself"
                )
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            local = int(os.environ.get("LOCAL_RANK", "0"))
            torch.cuda.set_device(local)
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout()))
        atexit.register(_close)  # gloo's threads left running abort the interpreter's exit
    return Group(dist.get_rank(), dist.get_world_size())


def _close() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def quiet_unless_leader(where: Group | None) -> None:
    """Ranks other than 0 print nothing on stdout (their errors still reach stderr)."""
    if where is not None and not where.leader:
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - for the rest of this process


@dataclass
class SharedStep:
    """``apply_step`` across ranks: the optimizer's ``update`` gets the whole batch's
    gradient. For mean losses each rank's gradient and loss are weighted by its rows, summed
    over the ranks and divided by the batch's rows; sum losses are summed. Every rank then
    updates alike. Wraps one of ``optim/first_order.py``'s steps."""

    inner: Any
    where: Group
    mean: bool = True
    rows: int = 0  # this rank's rows in the batch
    loss: Tensor | None = None  # this rank's loss on its part, set by the problem
    total: float = 0.0  # the whole batch's loss after the sum
    batch_rows: int = 0  # the whole batch's rows after the sum

    def init(self, params: Tensor) -> State:
        state: State = self.inner.init(params)
        return state

    def update(self, params: Tensor, grad: Tensor, state: State) -> State:
        loss = params.new_zeros(()) if self.loss is None else self.loss.detach()
        weight = float(self.rows) if self.mean else 1.0
        rows = params.new_tensor([float(self.rows)])
        packed = torch.cat([grad.reshape(-1) * weight, loss.reshape(1) * weight, rows])
        self.where.all_sum(packed)  # one collective per step: gradient, loss and rows
        self.batch_rows = int(packed[-1])
        scale = 1.0 / max(self.batch_rows, 1) if self.mean else 1.0
        self.total = float(packed[-2]) * scale
        state = self.inner.update(params, (packed[:-2] * scale).view_as(grad), state)
        return state


@dataclass
class _Recording(Problem):
    """A ``Problem`` that hands its loss to the shared step (which sums it with the gradient)."""

    sink: SharedStep | None = field(default=None)

    def objective(self, theta: Tensor) -> Tensor:
        loss = super().objective(theta)
        assert self.sink is not None
        self.sink.loss = loss
        return loss


def shared_step(optimizer: Any, where: Group) -> Any:
    """A ``minibatch.StepRunner`` whose steps sum the gradient over the ranks."""
    shared = SharedStep(optimizer, where)

    def run(problem: Problem, theta: Tensor, state: State, rows: int) -> tuple[float, int]:
        shared.mean, shared.rows = problem.loss.reduction != "sum", rows
        shared.loss = None
        if rows == 0:  # this rank has no part in a batch smaller than the group
            shared.update(theta, torch.zeros_like(theta), state)
        else:
            recording = _Recording(**vars(problem), sink=shared)
            apply_step(recording, theta, shared, state)
        return shared.total, shared.batch_rows

    return run


def agreed_hook(hook: Hook | None, where: Group) -> Hook:
    """``hook`` on every rank, stopping all of them when it asks to stop on any one."""

    def agreed(epoch: int, loss: float) -> bool:
        stop = bool(hook(epoch, loss)) if hook is not None else False
        flag = torch.tensor([1.0 if stop else 0.0], dtype=torch.float64)
        return bool(where.all_sum(flag)[0] > 0)

    return agreed


def my_part(n: int, where: Group) -> Tensor:
    """This rank's rows of ``n`` (contiguous, as even as possible)."""
    return torch.arange(n).tensor_split(where.world)[where.rank]


def run_lm_shared(
    problem: Problem,
    share: Problem,
    start: LoopState,
    where: Group,
    *,
    max_iter: int | None,
    tol: float | None,
    hook: Hook | None = None,
) -> LoopOutcome:
    """Levenberg–Marquardt with ``share``'s rows on this rank and the normal equations summed
    over the ranks (``problem`` holds every row: its loss's reduction and size). Plain least
    squares (mse, sse, chi2); every rank returns the same parameters. ``hook`` runs after
    every iteration on every rank; a stop asked on any rank stops them all."""
    from gradfit.optim.least_squares import _message, _status, residual_functions
    from gradfit.optim.lm import DEFAULT_MAX_ITER, autodiff_jacobian, levenberg_marquardt

    loss = problem.loss
    if loss.name not in ("mse", "sse", "chi2"):
        raise OptionError(
            f"under torchrun, lm takes a plain least-squares loss (mse, sse, chi2), not "
            f"{loss.name!r}: a robust loss's scaling would differ between ranks"
        )
    n_total = int(problem.y.shape[-1])
    to_loss = 2.0 if loss.reduction == "sum" else 2.0 / n_total
    residuals, stacked = residual_functions(share)
    history = start.history
    epoch0 = start.epoch
    agreed = agreed_hook(hook, where)
    stopped: list[int] = []

    def callback(iteration: int, cost: Tensor) -> bool:
        history.append(float(cost[0]) * to_loss)
        start.epoch += 1
        if agreed(start.epoch - 1, history[-1]):
            stopped.append(start.epoch - 1)
            return True
        return False

    evaluation: dict[str, Any] = (
        {"stacked": stacked} if stacked is not None else {"jacobian": autodiff_jacobian(residuals)}
    )
    options: dict[str, Any] = {} if tol is None else {"ftol": tol}
    result = levenberg_marquardt(
        residuals,
        start.theta.detach().unsqueeze(0),
        **evaluation,
        callback=callback,
        max_iter=max(0, (max_iter or DEFAULT_MAX_ITER) - epoch0),
        reduce=where.all_sum,
        **options,
    )
    theta = result.theta[0].detach().clone()
    start.theta = start.best_theta = theta
    start.best_loss = float(result.cost[0]) * to_loss
    code = int(result.status[0])
    status, message = _status(code), _message(code, tol, start.epoch)
    if stopped:
        status, message = "interrupted", f"the hook asked to stop after iteration {stopped[0]}"
    return LoopOutcome(
        theta, start.best_loss, list(history), status, message, n_eval=int(result.n_eval)
    )
