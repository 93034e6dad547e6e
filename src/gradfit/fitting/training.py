"""One mini-batch training run, rows in memory or streamed: resume from a checkpoint, save
every few batches, the epoch bar, and the epochs themselves (``minibatch.run_epochs``)."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch

from gradfit.errors import CheckpointError
from gradfit.fitting import checkpoint as checkpoints
from gradfit.fitting import distributed, minibatch
from gradfit.fitting.minibatch import Batches, EpochPosition, Validation
from gradfit.fitting.progress import epoch_bar
from gradfit.optim.problem import Hook, LoopOutcome, LoopState, Problem
from gradfit.options import FitOptions


def train(
    problem: Problem,
    theta: torch.Tensor,
    step: Any,
    optimizer: str,
    opts: FitOptions,
    batches: Batches,
    generator: torch.Generator,
    validation: Validation | None,
    *,
    identity: dict[str, Any],
    where: distributed.Group | None,
    hook: Hook | None,
    progress: bool,
    checkpoint: str | Path | None,
    checkpoint_every: int | None,
    resume: str | Path | None,
) -> tuple[LoopOutcome, EpochPosition]:
    """Run ``step``'s epochs over ``batches`` from ``theta`` (or from ``resume``); the outcome
    and where the epochs stood (its ``validation_history``)."""
    position = EpochPosition(generator.get_state())
    if resume is not None:
        saved: dict[str, Any] = {}
        state = checkpoints.load_checkpoint(resume, identity, theta.device, extra=saved)
        if "minibatch" not in saved:
            raise CheckpointError(f"{resume}: not a mini-batch checkpoint")
        position = EpochPosition.from_payload(saved["minibatch"])
    else:
        state = LoopState(theta.detach().clone().requires_grad_())
    state.optimizer_state = checkpoints.restore_into(step.init(state.theta), state.optimizer_state)
    leader = where is None or where.leader
    save, every = None, 0
    if checkpoint is not None and leader:
        every = checkpoints.checkpoint_interval(checkpoint_every, optimizer, checkpoint)

        def save() -> None:
            extra = {"minibatch": position.to_payload()}
            checkpoints.save_checkpoint(checkpoint, state, identity, extra=extra)

    runner = minibatch.local_step(step) if where is None else distributed.shared_step(step, where)
    epochs = opts.epoch_limit(optimizer)
    assert epochs is not None
    shown = epoch_bar(hook, epochs, position.validation_history)
    bar = progress and leader
    with shown if bar else contextlib.nullcontext((hook, None)) as (hooks, on_step):
        if where is not None:  # a stop asked on any rank stops every rank at the same epoch
            hooks = distributed.agreed_hook(hooks, where)
        outcome = minibatch.run_epochs(
            problem, state, position, batches, runner, generator, epochs=epochs, tol=opts.tol,
            hook=hooks, validation=validation, save=save, save_every=every, on_step=on_step,
            stop_now=minibatch.asks_stop(hook) if where is None else None,
        )  # fmt: skip
    if save is not None and outcome.status != "diverged":  # resumable where it stopped
        save()
    return outcome, position
