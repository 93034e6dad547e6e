"""Checkpoints: a running fit's ``LoopState`` saved atomically, and resumed exactly.

A checkpoint holds the free parameters, the optimizer's state, the epoch, the loss history,
the best parameters so far and the RNG state, plus an *identity*: named components (model,
parameters, bounds, fixed values, loss, optimizer, learning rate, dtype, a hash of each data
array, and what else the caller passes, such as ``tol`` and ``p0``) so that a checkpoint is
never resumed into a different problem, and the refusal names what changed. It is written with
``torch.save`` to a temporary file and moved into place (``files.write_with``): a kill at any
moment leaves the last complete one. It is read with ``torch.load(weights_only=True)``:
tensors, numbers, strings and containers only, never pickled code.

What may change on resume: the epoch limit (raised, the run continues; a run that had
converged stays converged), where and how often checkpoints are saved, ``absolute_sigma``
(statistics only, computed after the fit), the seed (the RNG state comes from the checkpoint)
and the outputs. Everything in the identity must be as it was.

Resuming ``gd``, ``sgd``, ``adam`` and ``lbfgs`` continues bit for bit (on the same device).
Levenberg–Marquardt restarts from the saved (best) parameters with a fresh damping factor,
so its continuation is close to, but not bit for bit, the uninterrupted run.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gradfit.errors import CheckpointError, OptionError
from gradfit.io.files import check_parent, write_with
from gradfit.model.models import Model
from gradfit.model.parameters import ParameterSpace
from gradfit.optim.problem import Hook, LoopState, Problem

Tensor = torch.Tensor
FORMAT = "gradfit-checkpoint"
VERSION = 2  # 2: the identity's named components (tol, p0, per-array data hashes)
#: default ``checkpoint_every``: first-order epochs take microseconds, LM/LBFGS steps more
DEFAULT_EVERY = {"gd": 1000, "sgd": 1000, "adam": 1000, "lbfgs": 1, "lm": 1}
#: above this many values an array option (a per-curve p0) is stored as a hash
_LISTED = 16


def identify(problem: Problem, optimizer: str, lr: float | None, **options: Any) -> dict[str, Any]:
    """What a checkpoint belongs to: resuming with anything different is refused.

    ``options`` are further components that decide the result (``fit`` passes ``tol`` and
    the starting ``p0``); each is stored under its own name, so a refusal can name it.
    """
    identity = model_identity(problem.model, problem.space)
    identity |= {"loss": problem.loss.name, "f_scale": problem.loss.f_scale}
    identity |= {"optimizer": optimizer, "lr": lr}
    identity |= {name: plain(value) for name, value in options.items()}
    identity["dtype"] = str(problem.y.dtype)
    identity["data"] = data_hashes({"x": problem.x, "y": problem.y, "sigma": problem.loss.sigma})
    return identity


def model_identity(model: Model, space: ParameterSpace) -> dict[str, Any]:
    """The model and its parameter space as plain, comparable components."""
    names = space.names
    bounded = zip(names, space.lower, space.upper, strict=True)
    return {
        "model": model_label(model),
        "parameters": list(names),
        "bounds": {n: [lo, hi] for n, lo, hi in bounded if lo is not None or hi is not None},
        "fixed": {n: v for n, v in zip(names, space.fixed, strict=True) if v is not None},
    }


def model_label(model: Model) -> str:
    """A built-in's name, an expression's text, a function's or module's qualified name."""
    if model.module is not None:
        kind = type(model.module)
        return f"{kind.__module__}.{kind.__qualname__}"
    if model.expression is None:  # a Python function: its name alone could be any lambda
        fn = getattr(model, "_fn", None)
        return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', model.name)}"
    return model.name


def data_hashes(arrays: Mapping[str, Any]) -> dict[str, str | None]:
    """``{name: hash}`` of each array (a mapping of arrays, such as named x columns, by
    ``name['column']``), so a refusal can say which one changed."""
    hashes: dict[str, str | None] = {}
    for name, values in arrays.items():
        if isinstance(values, Mapping):
            hashes |= {f"{name}[{k!r}]": digest(v) for k, v in sorted(values.items())}
        else:
            hashes[name] = digest(values)
    return hashes


def digest(values: Any) -> str | None:
    """A SHA-256 of an array's dtype, shape and bytes (None stays None); SHA-256 runs in
    hardware on current CPUs, twice BLAKE2b's speed here (1.1 GB/s).

    Example:
        >>> digest(np.arange(3.0)) == digest(torch.arange(3.0, dtype=torch.float64))
        True
    """
    if values is None:
        return None
    if isinstance(values, Tensor):
        values = values.detach().cpu().numpy()
    array = np.ascontiguousarray(values)
    hasher = hashlib.sha256()
    hasher.update(f"{array.dtype.str}{array.shape}".encode())
    if array.dtype == object:  # e.g. string keys: an object array's bytes are pointers
        hasher.update("\x00".join(map(repr, array.ravel().tolist())).encode())
    else:
        hasher.update(array.data.cast("B"))  # the array's buffer (a memoryview), as bytes
    return hasher.hexdigest()[:32]  # 128 bits: ample to tell data sets apart


def plain(value: Any) -> Any:
    """``value`` as JSON-like data (numbers, strings, lists, dicts) that compares by value;
    an array of more than a few values becomes its hash.

    Example:
        >>> plain({"a": np.float64(1.5), "b": (0, None)}), plain(torch.tensor([1.0, 2.0]))
        ({'a': 1.5, 'b': [0, None]}, [1.0, 2.0])
    """
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, Tensor):
        value = value.detach().cpu().numpy()
    if isinstance(value, np.ndarray):
        return f"an array with hash {digest(value)}" if value.size > _LISTED else value.tolist()
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, torch.dtype):
        return str(value)
    return value


def mismatch(saved: Mapping[str, Any], given: Mapping[str, Any]) -> str | None:
    """What differs between a saved identity and the one given now, in words; None if none.

    Example:
        >>> mismatch({"model": "gaussian", "lr": 0.1}, {"model": "lorentzian", "lr": 0.1})
        "model 'gaussian', not 'lorentzian'"
        >>> mismatch({"data": {"x": "1", "y": "2"}}, {"data": {"x": "1", "y": "3"}})
        'different data (y changed)'
    """
    for key, value in given.items():
        if key not in saved:
            return f"a fit that did not record {key} (now {value!r})"
        there = saved[key]
        if there == value:
            continue
        if key == "data" and isinstance(there, Mapping) and isinstance(value, Mapping):
            changed = [n for n in {**there, **value} if there.get(n) != value.get(n)]
            return f"different data ({', '.join(changed)} changed)"
        return f"{key} {there!r}, not {value!r}"
    return None


def save_checkpoint(
    path: str | Path,
    state: LoopState,
    identity: dict[str, Any],
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write ``state`` to ``path`` atomically (a kill leaves the previous checkpoint whole).

    ``extra``: what a loop carries besides ``state`` (mini-batch training: the position in the
    epoch and the batches' generator, ``minibatch.EpochPosition``); tensors, numbers, lists.
    """
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
        "extra": extra or {},
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


def load_checkpoint(
    path: str | Path,
    identity: dict[str, Any],
    device: torch.device,
    extra: dict[str, Any] | None = None,
) -> LoopState:
    """The ``LoopState`` saved in ``path``, after checking it belongs to ``identity``;
    ``extra`` (a dict) receives what ``save_checkpoint`` was given as its ``extra``.

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
    different = mismatch(payload.get("identity", {}), identity)
    if different is not None:
        raise CheckpointError(
            f"{path} was written for {different}; resume with the original options, "
            "or drop --resume to start over"
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
        if extra is not None:
            extra.update(payload["extra"])
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


def checkpoint_interval(every: int | None, optimizer: str, path: str | Path) -> int:
    """How often (epochs, or batches in mini-batch training) to save to ``path``, checked
    now: the folder must take the file, and ``every`` be >= 1 (default per optimizer)."""
    check_parent(Path(path), "checkpoint")  # fail now, not at the first save
    every = DEFAULT_EVERY[optimizer] if every is None else every
    if not every >= 1:
        raise OptionError(f"checkpoint_every must be >= 1, got {every}")
    return int(every)
