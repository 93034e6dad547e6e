"""Checkpoints: a running fit's ``LoopState`` saved atomically, and resumed exactly.

A checkpoint holds the free parameters, the optimizer's state, the epoch, the loss history,
the best parameters so far and the RNG state, plus an *identity* (model, parameters, bounds,
optimizer, learning rate, loss, dtype and a hash of the data) so that a checkpoint is never
resumed into a different problem. It is written with ``torch.save`` to a temporary file and
moved into place (``files.write_with``): a kill at any moment leaves the last complete one.
It is read with ``torch.load(weights_only=True)``: tensors, numbers, strings and containers
only, never pickled code.

Resuming ``gd``, ``sgd``, ``adam`` and ``lbfgs`` continues bit for bit (on the same device).
Levenberg–Marquardt restarts from the saved (best) parameters with a fresh damping factor,
so its continuation is close to, but not bit for bit, the uninterrupted run.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointError
from .files import write_with
from .loop import Hook, LoopState, Problem

Tensor = torch.Tensor
FORMAT = "gradfit-checkpoint"
VERSION = 1
#: default ``checkpoint_every``: first-order epochs take microseconds, LM/LBFGS steps more
DEFAULT_EVERY = {"gd": 1000, "sgd": 1000, "adam": 1000, "lbfgs": 1, "lm": 1}


def identify(problem: Problem, optimizer: str, lr: float | None) -> dict[str, Any]:
    """What a checkpoint belongs to: resuming with anything different is refused."""
    space = problem.space
    return {
        "model": str(getattr(problem.model, "formula", problem.model)),
        "param_names": list(space.names),
        "bounds": [[lo, hi] for lo, hi in zip(space.lower, space.upper, strict=True)],
        "fixed": list(space.fixed),
        "optimizer": optimizer,
        "lr": lr,
        "loss": problem.loss.name,
        "f_scale": problem.loss.f_scale,
        "dtype": str(problem.y.dtype),
        "data": fingerprint(problem.x, problem.y, problem.loss.sigma),
    }


def fingerprint(x: Tensor | dict[str, Tensor], y: Tensor, sigma: Tensor | None) -> str:
    """A SHA-256 of the data's bytes (x columns by name, y, sigma)."""
    digest = hashlib.sha256()
    columns = sorted(x.items()) if isinstance(x, dict) else [("x", x)]
    for name, values in [*columns, ("y", y), ("sigma", sigma)]:
        digest.update(name.encode())
        if values is not None:
            digest.update(values.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def save_checkpoint(path: str | Path, state: LoopState, identity: dict[str, Any]) -> Path:
    """Write ``state`` to ``path`` atomically (a kill leaves the previous checkpoint whole)."""
    assert state.best_theta is not None
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "identity": identity,
        "epoch": state.epoch,
        "theta": state.theta.detach(),
        "optimizer_state": state.optimizer_state,
        # a float64 tensor holds Python floats exactly and saves far faster than a list
        "history": torch.tensor(state.history, dtype=torch.float64),
        "best_loss": state.best_loss,
        "best_theta": state.best_theta.detach(),
        "rng_state": torch.get_rng_state(),
    }
    return write_with(Path(path), lambda tmp: _save_synced(payload, tmp))


def _save_synced(payload: dict[str, Any], tmp: Path) -> None:
    with open(tmp, "wb") as handle:
        torch.save(payload, handle)
        handle.flush()
        os.fsync(handle.fileno())  # on disk before the rename, so a crash leaves no empty file


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """The raw contents of a checkpoint (tensors, numbers, strings, containers)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for files it cannot read
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"{path}: not a readable gradfit checkpoint ({first})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a gradfit checkpoint")
    if payload.get("version") != VERSION:
        raise CheckpointError(
            f"{path}: checkpoint version {payload.get('version')!r}, this gradfit reads {VERSION}"
        )
    return payload


def load_checkpoint(path: str | Path, identity: dict[str, Any], device: torch.device) -> LoopState:
    """The ``LoopState`` saved in ``path``, after checking it belongs to ``identity``.

    Parameters go to ``device``; the optimizer state stays on the CPU for the optimizer to
    restore into its own layout (``fitting`` copies it into a fresh ``init``).

    Example:
        >>> import tempfile
        >>> path = Path(tempfile.mkdtemp()) / "fit.pt"
        >>> _ = save_checkpoint(path, LoopState(torch.zeros(2), epoch=7), {"lr": 0.1})
        >>> load_checkpoint(path, {"lr": 0.1}, torch.device("cpu")).epoch
        7
    """
    payload = read_checkpoint(path)
    saved = payload.get("identity", {})
    for key, value in identity.items():
        if saved.get(key) != value:
            there = "a different hash" if key == "data" else repr(saved.get(key))
            here = "the data given now" if key == "data" else repr(value)
            raise CheckpointError(
                f"{path}: the checkpoint belongs to a different fit ({key} is {there} there, "
                f"{here} here); resume with the original options or start without --resume"
            )
    try:
        state = LoopState(
            theta=payload["theta"].to(device).requires_grad_(),  # a fresh leaf for autograd
            optimizer_state=payload["optimizer_state"],
            epoch=int(payload["epoch"]),
            history=payload["history"].tolist(),
            best_loss=float(payload["best_loss"]),
            best_theta=payload["best_theta"].to(device),
        )
        torch.set_rng_state(payload["rng_state"])
    except (KeyError, TypeError, AttributeError, ValueError, RuntimeError) as error:
        raise CheckpointError(f"{path}: incomplete or damaged checkpoint ({error!r})") from None
    return state


def restore_into(fresh: dict[str, Tensor], saved: dict[str, Any]) -> dict[str, Tensor]:
    """Copy a saved optimizer state into ``fresh`` (from ``init``: its devices and dtypes)."""
    if saved and set(saved) != set(fresh):
        raise CheckpointError(
            f"the checkpoint's optimizer state has {sorted(saved)}, expected {sorted(fresh)}"
        )
    for key, value in saved.items():
        fresh[key].copy_(value)
    return fresh


def checkpoint_hook(
    path: str | Path, state: LoopState, identity: dict[str, Any], every: int
) -> Hook:
    """A loop hook that saves ``state`` to ``path`` after every ``every``-th epoch."""
    path = Path(path)

    def save_every(epoch: int, loss: float) -> bool:
        if (epoch + 1) % every == 0:  # other epochs cost one modulo
            save_checkpoint(path, state, identity)
        return False

    return save_every
