"""Mini-batch epochs: the post's ``apply_step`` once per batch of rows, an epoch a full pass.

The order of the rows is reproducible from the seed and never touches the global RNG: it
comes from a ``torch.Generator`` of its own, used in exactly this sequence (a reference loop
written from this text takes the same batches):

1. ``generator.manual_seed(seed)``;
2. ``validation=f``: ``perm = torch.randperm(n, generator=generator)``; the first
   ``max(1, round(f * n))`` entries of ``perm``, sorted, are the validation rows, the rest,
   sorted, the training rows (in-memory data);
3. every epoch, with ``shuffle``: ``order = torch.randperm(n_train, generator=generator)``
   (else ``arange``); the batches are ``order.split(batch_size)`` (the last one may be
   smaller), as positions in the training rows.

``history`` holds, per epoch, ``Σ_b loss_b · n_b / Σ_b n_b`` for mean losses (mse, huber,
...: the mean training loss over the epoch, each batch's loss at the parameters it was taken
at) and ``Σ_b loss_b`` for sum losses (sse, chi2). With validation, the validation loss at the
end of every epoch goes to ``validation_history``; the parameters with the best one are the
result, and ``patience`` epochs without a better one stop the fit with ``"early_stopped"``.

Under ``torchrun`` (``distributed.py``) every rank draws the same order and takes its part of
each batch (``batch.tensor_split(world)[rank]``); the gradients, weighted by each part's share,
are summed across ranks, so each step is the one a single process takes on the whole batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import torch

from gradfit.fitting.loop import apply_step
from gradfit.optim.first_order import State
from gradfit.optim.problem import Hook, LoopOutcome, LoopState, Problem
from gradfit.optim.status import diverged_message, small_change

Tensor = torch.Tensor
#: rows evaluated at once when a loss is only scored (validation, the final training loss)
EVAL_ROWS = 1 << 16


@dataclass
class Rows:
    """Data rows: ``x`` (array or name -> array), ``y`` and ``sigma``, indexable together."""

    x: Tensor | dict[str, Tensor]
    y: Tensor
    sigma: Tensor | None

    @property
    def n(self) -> int:
        return int(self.y.shape[-1])

    def take(self, index: Tensor) -> Rows:
        x = {k: v[index] for k, v in self.x.items()} if isinstance(self.x, dict) else self.x[index]
        sigma = None if self.sigma is None else self.sigma[index]
        return Rows(x, self.y[index], sigma)

    def problem(self, like: Problem) -> Problem:
        """``like``'s model, loss and parameters on these rows."""
        return replace(like, x=self.x, y=self.y, loss=replace(like.loss, sigma=self.sigma))


def new_generator(seed: int | None) -> torch.Generator:
    """The batches' own generator (the global RNG is never drawn from)."""
    generator = torch.Generator()
    if seed is None:
        generator.seed()  # a fresh, unpredictable seed
    else:
        generator.manual_seed(int(seed))
    return generator


def split_validation(n: int, fraction: float, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """(training rows, validation rows), each sorted: the held-out ones are the first
    ``max(1, round(fraction * n))`` of a permutation drawn from ``generator``."""
    held = max(1, round(fraction * n))
    perm = torch.randperm(n, generator=generator)
    return perm[held:].sort().values, perm[:held].sort().values


@dataclass
class EpochPosition:
    """What mini-batch training carries besides ``LoopState``, saved in its checkpoints: where
    in the epoch it is, and the validation record (``LoopState.best_loss``/``best_theta`` hold
    the best validation loss and its parameters)."""

    generator_state: Tensor  # the generator before this epoch's order was drawn
    step: int = 0  # batches done in this epoch
    loss_sum: float = 0.0  # Σ loss_b · n_b (sum losses: Σ loss_b) so far this epoch
    rows: int = 0  # Σ n_b so far this epoch (every rank's)
    steps: int = 0  # batches done in all, across resumed runs (checkpoint_every counts them)
    validation_history: list[float] = field(default_factory=list)
    bad_epochs: int = 0  # epochs since the best validation loss

    def to_payload(self) -> dict[str, Any]:
        return {
            "generator_state": self.generator_state.clone(),
            "step": self.step,
            "loss_sum": self.loss_sum,
            "rows": self.rows,
            "steps": self.steps,
            "validation_history": torch.tensor(self.validation_history, dtype=torch.float64),
            "bad_epochs": self.bad_epochs,
        }

    @classmethod
    def from_payload(cls, saved: dict[str, Any]) -> EpochPosition:
        return cls(
            generator_state=saved["generator_state"],
            step=int(saved["step"]),
            loss_sum=float(saved["loss_sum"]),
            rows=int(saved["rows"]),
            steps=int(saved["steps"]),
            validation_history=saved["validation_history"].tolist(),
            bad_epochs=int(saved["bad_epochs"]),
        )


class Batches(Protocol):
    """Where an epoch's batches come from (rows in memory, or a streamed file)."""

    def epoch(self, position: EpochPosition, generator: torch.Generator) -> Iterator[Batch]:
        """This epoch's batches from ``position.step`` on; ``generator`` is at
        ``position.generator_state``."""
        ...

    def score(self, problem: Problem, theta: Tensor) -> float:
        """The loss over all the training rows at ``theta`` (no gradient)."""
        ...


@dataclass
class Batch:
    """One step's rows: this process's part of the batch."""

    rows: Rows


@dataclass
class InMemory:
    """Batches drawn from rows in memory (the order and split as the module says)."""

    rows: Rows
    batch_size: int
    shuffle: bool
    rank: int = 0
    world: int = 1

    def epoch(self, position: EpochPosition, generator: torch.Generator) -> Iterator[Batch]:
        n = self.rows.n
        order = torch.randperm(n, generator=generator) if self.shuffle else torch.arange(n)
        device = self.rows.y.device
        for part in order.split(self.batch_size)[position.step :]:
            mine = part if self.world == 1 else part.tensor_split(self.world)[self.rank]
            yield Batch(self.rows.take(mine.to(device)))

    def score(self, problem: Problem, theta: Tensor) -> float:
        return score(self.rows, problem, theta)


def score(rows: Rows, like: Problem, theta: Tensor) -> float:
    """``like``'s loss on ``rows`` at ``theta``, taken in chunks of ``EVAL_ROWS`` rows
    (exactly one evaluation when the rows fit in one)."""
    mean = like.loss.reduction != "sum"
    total = 0.0
    with torch.no_grad():
        for index in torch.arange(rows.n, device=rows.y.device).split(EVAL_ROWS):
            part = rows if rows.n <= EVAL_ROWS else rows.take(index)
            value = float(part.problem(like).objective(theta))
            total += value * part.n if mean else value
    return total / rows.n if mean else total


class StepRunner(Protocol):
    """One optimizer step on this process's part of a batch (``rows`` of them); returns the
    whole batch's loss and rows (every rank's)."""

    def __call__(
        self, problem: Problem, theta: Tensor, state: State, rows: int
    ) -> tuple[float, int]: ...


def local_step(optimizer: object) -> StepRunner:
    """One process: the post's ``apply_step``, unchanged."""

    def run(problem: Problem, theta: Tensor, state: State, rows: int) -> tuple[float, int]:
        return apply_step(problem, theta, optimizer, state).item(), rows

    return run


@dataclass
class Validation:
    """The validation loss at ``theta`` (``score(problem, theta)``), taken after every
    epoch, and the patience to wait for a better one."""

    score: Callable[[Problem, Tensor], float]
    patience: int | None

    @classmethod
    def of_rows(cls, rows: Rows, patience: int | None) -> Validation:
        return cls(lambda problem, theta: score(rows, problem, theta), patience)


def run_epochs(
    problem: Problem,
    state: LoopState,
    position: EpochPosition,
    batches: Batches,
    step: StepRunner,
    generator: torch.Generator,
    *,
    epochs: int,
    tol: float | None = None,
    hook: Hook | None = None,
    validation: Validation | None = None,
    save: Callable[[], None] | None = None,
    save_every: int = 0,
    on_step: Callable[[int], None] | None = None,
    stop_now: Callable[[], bool] | None = None,
) -> LoopOutcome:
    """Train from ``state`` and ``position`` (fresh, or restored from a checkpoint), its
    optimizer state initialised (``step``'s ``init``).

    ``problem`` is the fit's problem (model, loss, parameters); its rows are not used. ``hook``
    runs after every epoch, as ``run_loop``'s; ``save`` after every ``save_every`` batches
    (a checkpoint of the position within the epoch); ``on_step(step)`` after every batch
    (a progress bar); ``stop_now()`` after every batch: True stops the fit in the middle
    of the epoch (status ``"interrupted"``; the epoch is not recorded, and a checkpoint saved
    now resumes it where it stopped: a signal need not wait for the end of a long epoch).
    """
    theta, history, opt_state = state.theta, state.history, state.optimizer_state
    mean = problem.loss.reduction != "sum"
    check_change = tol is not None and tol >= 0
    status, message = "max_iter", f"stopped after the maximum of {epochs} epochs"
    patience = validation.patience if validation is not None else None
    if check_change and small_change(history, tol):  # resumed where a converged run stopped
        status, message = "converged", f"relative loss change below tol={tol}"
        return _outcome(problem, state, batches, validation, status, message)
    if patience is not None and position.bad_epochs >= patience:  # resumed after a stop
        return _outcome(problem, state, batches, validation, "early_stopped", _early(position))
    start_of_epoch = theta.detach().clone()  # kept when the loss becomes non-finite
    for epoch in range(state.epoch, epochs):
        generator.set_state(position.generator_state)
        start_of_epoch.copy_(theta.detach())
        diverged, stopped = None, False
        for batch in batches.epoch(position, generator):
            value, n_batch = step(batch.rows.problem(problem), theta, opt_state, batch.rows.n)
            position.step += 1
            position.steps += 1
            if not math.isfinite(value):
                diverged = value
                break
            position.loss_sum += value * n_batch if mean else value
            position.rows += n_batch
            if save is not None and save_every and position.steps % save_every == 0:
                save()
            if on_step is not None:
                on_step(position.step)
            if stop_now is not None and stop_now():
                stopped = True
                break
        if stopped:
            status = "interrupted"
            message = f"stopped in epoch {epoch} after {position.step} of its batches"
            break
        if diverged is not None:
            theta.data.copy_(start_of_epoch)
            status, message = "diverged", diverged_message(epoch, diverged)
            break
        loss = position.loss_sum / max(position.rows, 1) if mean else position.loss_sum
        history.append(loss)
        state.epoch = epoch + 1
        position.step, position.loss_sum, position.rows = 0, 0.0, 0
        position.generator_state = generator.get_state()
        if validation is not None:
            _validate(problem, state, position, validation)
        if check_change and small_change(history, tol):
            status, message = "converged", f"relative loss change below tol={tol}"
            break
        if patience is not None and position.bad_epochs >= patience:
            status, message = "early_stopped", _early(position)
            break
        if hook is not None and hook(epoch, loss):
            status, message = "interrupted", f"the hook asked to stop after epoch {epoch}"
            break
    return _outcome(problem, state, batches, validation, status, message)


def asks_stop(hook: Hook | None) -> Callable[[], bool] | None:
    """A hook that only asks "stop?" (a true ``stop_only`` attribute: the CLI's Ctrl-C one)
    as a question to ask after every batch; None for other hooks, which run per epoch."""
    if hook is None or not getattr(hook, "stop_only", False):
        return None
    return lambda: bool(hook(-1, math.nan))


def _validate(
    problem: Problem, state: LoopState, position: EpochPosition, validation: Validation
) -> None:
    value = validation.score(problem, state.theta.detach())
    position.validation_history.append(value)
    if value < state.best_loss:  # NaN is never better
        state.best_loss, state.best_theta = value, state.theta.detach().clone()
        position.bad_epochs = 0
    else:
        position.bad_epochs += 1


def _early(position: EpochPosition) -> str:
    best = len(position.validation_history) - position.bad_epochs
    return (
        f"stopped early: no better validation loss in the {position.bad_epochs} epochs after "
        f"epoch {best}, whose parameters are kept; the training loss had not converged"
    )


def _outcome(
    problem: Problem,
    state: LoopState,
    batches: Batches,
    validation: Validation | None,
    status: str,
    message: str,
) -> LoopOutcome:
    """The result's parameters: the best validation ones with validation, else the last;
    scored on all the training rows."""
    theta = state.theta.detach()
    if validation is not None and state.best_theta is not None and math.isfinite(state.best_loss):
        theta = state.best_theta
    final = theta.clone()
    return LoopOutcome(final, batches.score(problem, final), list(state.history), status, message)
