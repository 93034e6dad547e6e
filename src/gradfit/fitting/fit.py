"""``gradfit.fit``: one model, one data set, any loss and optimizer, honest statistics."""

from __future__ import annotations

import contextlib
import math
import secrets
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gradfit.errors import DataError, ModelError, OptionError, unknown_name
from gradfit.fitting import checkpoint as checkpoints
from gradfit.fitting import distributed, minibatch
from gradfit.fitting.loop import run_loop
from gradfit.fitting.minibatch import Rows
from gradfit.fitting.progress import progress_bar
from gradfit.fitting.training import train
from gradfit.io.tables import prepare_data
from gradfit.model.losses import Loss
from gradfit.model.models import (
    BUILTINS,
    Model,
    as_model,
    check_uses_independent,
    get_builtin,
    numpy_gradient_message,
)
from gradfit.model.parameters import Bound, ParameterSpace
from gradfit.model.ties import Tied, apply_ties, reduce_p0, tied_values
from gradfit.optim import FIRST_ORDER
from gradfit.optim.lbfgs import run_lbfgs
from gradfit.optim.problem import Hook, LoopOutcome, LoopState, Problem, chain_hooks
from gradfit.options import FitOptions, options_from
from gradfit.results import stats
from gradfit.results.fit_result import FitResult
from gradfit.results.jacobian import prediction_and_jacobian

Tensor = torch.Tensor


def fit(
    model: Model | str | Callable[..., Tensor] | nn.Module,
    x: Any,
    y: Any,
    *,
    sigma: Any = None,
    p0: Mapping[str, float] | Any = None,
    bounds: Mapping[str, Bound] | None = None,
    fixed: Mapping[str, float] | None = None,
    ties: Mapping[str, str] | None = None,
    loss: str | Loss | Callable[[Tensor, Tensor], Tensor] = "mse",
    f_scale: float = 1.0,
    optimizer: str = "auto",
    lr: float | None = None,
    epochs: int | None = None,
    tol: float | None = None,
    absolute_sigma: bool = False,
    nan_policy: str = "raise",
    seed: int | None = None,
    batch_size: int | None = None,
    shuffle: bool = True,
    validation: float | tuple[Any, Any] | None = None,
    patience: int | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    progress: bool = False,
    hook: Hook | None = None,
    checkpoint: str | Path | None = None,
    checkpoint_every: int | None = None,
    resume: str | Path | None = None,
    options: FitOptions | None = None,
) -> FitResult:
    """Fit ``model`` to ``(x, y)`` by minimising ``loss``.

    Args:
        model: expression string, built-in name, ``Model``, function ``f(x, params)`` (wrap it
            in ``Model(f, params=[...])`` to name its parameters) or ``nn.Module``.
        x, y: the data (``x`` may be a mapping name -> array for several variables).
        sigma: per-point (or one) standard deviation of ``y``; residuals become ``r / sigma``.
        p0: starting values (mapping or vector); default: the built-in's guess, the module's
            current values, else ones (as ``curve_fit``).
        bounds, fixed: ``{name: (lo, hi)}`` (None = unbounded) and ``{name: value}``.
        ties: ``{name: expression}`` (lmfit's ``expr``): each tied parameter is substituted by
            its expression of the other parameters (expression models; ``model/ties.py``); the
            result reports it too (``result.tied``), with its delta-method stderr.
        loss: ``mse`` (the post's), ``sse``, ``chi2``, ``mae``, ``huber``, ``soft_l1``,
            ``cauchy``, ``arctan`` or a callable ``loss(y_pred, y_true)``.
        optimizer: ``auto`` (``lm`` for least-squares losses, else ``lbfgs``), ``lm``, ``gd``,
            ``sgd``, ``adam``, ``lbfgs``.
        lr, epochs, tol: learning rate, epoch (LM: iteration) limit, relative loss-change stop.
        absolute_sigma: take ``sigma`` as absolute (do not rescale the covariance by χ²ᵣ).
        seed: the random seed; with ``batch_size`` also the batches' order and the held-out
            validation rows (a generator of their own: ``fitting/minibatch.py``).
        batch_size, shuffle: mini-batch training for gd, sgd, adam (``auto``: adam): one step
            per batch of ``batch_size`` rows, a new order every epoch unless ``shuffle`` is
            False; ``history`` is the mean training loss per epoch, ``epochs`` defaults to 100.
        validation, patience: a fraction of the rows to hold out (by ``seed``), or
            ``(x_val, y_val)`` (or with ``sigma_val``): the validation loss per epoch in
            ``result.validation_history``; the parameters with the best one are the result
            (and its statistics are those of the training rows); ``patience`` epochs without
            a better one stop the fit with status ``"early_stopped"`` (not converged).
            Under ``torchrun`` (``WORLD_SIZE`` > 1) each process takes its part of each batch
            (``fitting/distributed.py``); lm takes its part of the rows.
        dtype: float64 unless given.
        progress: a bar on a terminal for gd, sgd, adam and lbfgs; none for lm, whose fits
            take milliseconds and whose compiled kernel has no per-iteration hook.
        hook: called as ``hook(epoch, loss)`` after every epoch; returning True stops the fit
            with status ``"interrupted"`` (``signals.stop_on_signals`` makes one for Ctrl-C).
            For lm it takes the PyTorch kernel, unless it has a true ``stop_only`` attribute
            (it only asks "stop?", as the Ctrl-C one): then the compiled kernel, where it
            applies, asks it once, when it returns (``optim/dispatch.py``).
        checkpoint, checkpoint_every: save the loop's state to this file every N epochs
            (default 1000 for gd/sgd/adam, every iteration for lm/lbfgs) and at the end
            (lm then runs its PyTorch kernel, which returns after every iteration).
        options: a ready ``FitOptions`` instead of the keyword options above (not both).
        resume: continue from this checkpoint; it must come from the same model, data and
            options (exact for gd/sgd/adam/lbfgs; LM restarts from the saved parameters).

    Example:
        >>> import gradfit as gf
        >>> x, y = gf.datasets.quadratic(seed=0)
        >>> result = gf.fit("a*x**2 + b*x + c", x, y)
        >>> result.converged, round(result.params["a"])  # the noisy data's optimum, not 20
        (True, 18)
    """
    opts = options_from(
        options, loss=loss, f_scale=f_scale, optimizer=optimizer, lr=lr, epochs=epochs,
        tol=tol, p0=p0, bounds=bounds, fixed=fixed, ties=ties, absolute_sigma=absolute_sigma,
        nan_policy=nan_policy, dtype=dtype, device=device, seed=seed, batch_size=batch_size,
        shuffle=shuffle, validation=validation, patience=patience,
    )  # fmt: skip
    if opts.seed is not None:
        torch.manual_seed(opts.seed)
    if isinstance(model, str):
        check_model_name(model)
    model = as_model(model)
    tied = None
    if opts.ties:  # the tied parameters substituted away: a smaller expression model
        tied = apply_ties(model, opts.ties, opts.fixed, opts.bounds)
        model, opts = tied.model, opts.replace(p0=reduce_p0(tied, opts.p0))
    dtype = opts.dtype or torch.float64
    data = prepare_data(
        x, y, sigma, independent=model.independent, nan_policy=opts.nan_policy, dtype=dtype,
        device=opts.device,
    )  # fmt: skip
    check_uses_independent(model)
    if opts.loss_fn.name == "chi2" and data.sigma is None:
        raise OptionError("loss 'chi2' needs sigma (per-point standard deviations)")
    loss_fn = opts.loss_fn.with_options(sigma=data.sigma)
    optimizer = opts.resolve(batched=False)
    space = ParameterSpace.build(model.param_names, opts.bounds, opts.fixed)
    if data.n_points < len(space.free):
        raise OptionError(
            f"{data.n_points} data points cannot determine {len(space.free)} free parameters "
            f"({', '.join(space.free_names)}); fix some or give more points"
        )
    p_start = _starting_params(model, opts.p0, data.x, data.y, dtype, data.y.device)
    space.check_start(p_start)
    _check_model_output(model, data.x, data.y, p_start)  # also decides model.numerical
    if model.numerical and optimizer != "lm":
        raise OptionError(f"optimizer {optimizer!r}: {numpy_gradient_message(model.name)}")
    problem = Problem(model, data.x, data.y, loss_fn, space)
    theta = space.to_theta(p_start.unsqueeze(0))[0]
    lr = opts.learning_rate(optimizer)
    where = distributed.group(data.y.device)
    if where is not None:
        _check_distributable(where, optimizer, opts, data.y, bool(checkpoint or resume))
    if opts.batch_size is not None:
        return _fit_minibatch(
            problem, theta, p_start, optimizer, opts, where, data.n_omitted, hook=hook,
            progress=progress, checkpoint=checkpoint, checkpoint_every=checkpoint_every,
            resume=resume, tied=tied,
        )  # fmt: skip
    identity = {}
    if checkpoint or resume:  # tol and the start decide the result as much as the model does
        identity = checkpoints.identify(problem, optimizer, lr, tol=opts.tol, p0=p_start)
    if resume is not None:
        state = checkpoints.load_checkpoint(resume, identity, theta.device)
    else:
        state = LoopState(theta.detach().clone().requires_grad_(optimizer != "lm"))
    leader = where is None or where.leader  # rank 0 alone writes
    if checkpoint is not None and leader:
        every = checkpoints.checkpoint_interval(checkpoint_every, optimizer, checkpoint)
        hook = chain_hooks(hook, checkpoints.checkpoint_hook(checkpoint, state, identity, every))
    epoch_limit = opts.epoch_limit(optimizer)
    # no bar for lm: it would need every iteration, which would cost it its compiled kernel
    bar = progress and optimizer != "lm" and leader
    if where is not None:  # lm (_check_distributable): this rank's part of the rows
        share = Rows(data.x, data.y, data.sigma).take(distributed.my_part(data.n_points, where))
        outcome = distributed.run_lm_shared(
            problem, share.problem(problem), state, where, max_iter=epoch_limit, tol=opts.tol,
            hook=hook,
        )  # fmt: skip
    else:
        with progress_bar(hook, epoch_limit or 0) if bar else contextlib.nullcontext(hook) as hk:
            outcome = _optimise(problem, state, optimizer, lr, epoch_limit, opts.tol, hk)
    if checkpoint is not None and outcome.status != "diverged" and leader:  # resumable there
        checkpoints.save_checkpoint(checkpoint, state, identity)
    result = _result(problem, outcome, optimizer, data.n_omitted, opts.absolute_sigma, p_start)
    if model.numerical:  # said in message too, which results.json keeps
        result.jacobian = "numerical"
        result.message += "; Jacobian by finite differences (a NumPy model)"
    return result if tied is None else _with_tied(result, tied)


def _check_distributable(
    where: distributed.Group, optimizer: str, opts: FitOptions, y: Tensor, checkpoint: bool
) -> None:
    """Under torchrun: lm, or mini-batch gd/sgd/adam, on the same data on every rank."""
    if opts.batch_size is None and optimizer != "lm":
        raise OptionError(
            f"under torchrun (WORLD_SIZE={where.world}), fit runs lm or mini-batch gd, sgd, "
            f"adam: give batch_size for {optimizer!r}"
        )
    if opts.batch_size is None and checkpoint:
        raise OptionError(
            "under torchrun, lm takes no checkpoint (it restarts from the saved parameters "
            "anyway; run it again)"
        )
    # every rank holds the arrays it was given: they must be the same arrays
    where.check_same("data (y)", torch.stack([y.new_tensor(y.numel()), y.sum(), y.square().sum()]))


def _fit_minibatch(
    problem: Problem,
    theta: Tensor,
    p_start: Tensor,
    optimizer: str,
    opts: FitOptions,
    where: distributed.Group | None,
    n_omitted: int,
    *,
    hook: Hook | None,
    progress: bool,
    checkpoint: str | Path | None,
    checkpoint_every: int | None,
    resume: str | Path | None,
    tied: Tied | None,
) -> FitResult:
    """``fit`` with ``batch_size``: ``fitting/minibatch.py``'s epochs on rows in memory."""
    assert opts.batch_size is not None
    seed = opts.seed
    if seed is None and where is not None:  # every rank must draw the same batches
        seed = where.broadcast_int(secrets.randbits(62))
    generator = minibatch.new_generator(seed)
    rows = Rows(problem.x, problem.y, problem.loss.sigma)
    validation = None
    if isinstance(opts.validation, tuple | list):
        held = _validation_rows(problem, opts.validation, opts)
        validation = minibatch.Validation.of_rows(held, opts.patience)
    elif opts.validation is not None:
        kept, held_out = minibatch.split_validation(rows.n, float(opts.validation), generator)
        device = problem.y.device
        if len(kept) < len(problem.space.free):
            raise OptionError(
                f"validation={opts.validation} leaves {len(kept)} training rows for "
                f"{len(problem.space.free)} free parameters"
            )
        held_rows = rows.take(held_out.to(device))
        validation = minibatch.Validation.of_rows(held_rows, opts.patience)
        rows = rows.take(kept.to(device))
        problem = rows.problem(problem)  # the statistics are the training rows'
    step = FIRST_ORDER[optimizer](lr=opts.learning_rate(optimizer))
    identity: dict[str, Any] = {}
    if checkpoint or resume:
        held_id = (
            checkpoints.data_hashes(dict(zip(("x", "y", "sigma"), opts.validation, strict=False)))
            if isinstance(opts.validation, tuple | list)
            else opts.validation
        )
        identity = checkpoints.identify(
            problem, optimizer, step.lr, tol=opts.tol, p0=p_start, batch_size=opts.batch_size,
            shuffle=opts.shuffle, seed=opts.seed, validation=held_id,
        )  # fmt: skip
    rank, world = (0, 1) if where is None else (where.rank, where.world)
    batches = minibatch.InMemory(rows, opts.batch_size, opts.shuffle, rank, world)
    outcome, position = train(
        problem, theta, step, optimizer, opts, batches, generator, validation,
        identity=identity, where=where, hook=hook, progress=progress, checkpoint=checkpoint,
        checkpoint_every=checkpoint_every, resume=resume,
    )  # fmt: skip
    result = _result(problem, outcome, optimizer, n_omitted, opts.absolute_sigma, p_start)
    result.validation_history = list(position.validation_history)
    return result if tied is None else _with_tied(result, tied)


def _validation_rows(problem: Problem, given: Any, opts: FitOptions) -> Rows:
    """An explicit ``(x_val, y_val[, sigma_val])``, checked as the training data are."""
    if len(given) not in (2, 3):
        raise OptionError(f"validation takes (x_val, y_val) or (x_val, y_val, sigma_val), "
                          f"got {len(given)} items")  # fmt: skip
    sigma = given[2] if len(given) == 3 else None
    if (sigma is None) != (problem.loss.sigma is None):
        raise OptionError(
            "validation data need sigma_val exactly when the fit has sigma: "
            "(x_val, y_val, sigma_val)"
        )
    try:
        held = prepare_data(
            given[0], given[1], sigma, independent=problem.model.independent,
            nan_policy=opts.nan_policy, dtype=problem.y.dtype, device=problem.y.device,
        )  # fmt: skip
    except DataError as error:
        raise DataError(f"validation data: {error}") from None
    return Rows(held.x, held.y, held.sigma)


def _with_tied(result: FitResult, tied: Tied) -> FitResult:
    """``result`` with the tied parameters in ``params`` and ``stderr`` (the original model's
    order; delta-method stderr, None where a parameter it uses is not determined)."""
    params = result.covariance.new_tensor([result.params[n] for n in result.param_names])
    values, stderr = tied_values(tied, params, result.covariance)
    names = tied.original.param_names
    result.params = {n: result.params[n] if n in result.params else float(values[n]) for n in names}
    sd: dict[str, float | None] = {}
    for n in names:
        if n in result.stderr:
            sd[n] = result.stderr[n]
        else:
            uses = [u for u in tied.exprs[n].names if u in result.stderr]
            value = float(stderr[n])
            undetermined = any(result.stderr[u] is None and u not in result.fixed for u in uses)
            sd[n] = None if undetermined or not math.isfinite(value) else value
    result.stderr, result.tied = sd, dict(tied.texts)
    return result


def check_model_name(text: str, independent: Sequence[str] = ("x",)) -> None:
    """Refuse a bare word that is not a built-in: it is a typo, not a constant model.

    An expression of one parameter alone would be a constant; written with the variable
    (``"c + 0*x"``) it still works.

    Example:
        >>> check_model_name("gausian")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        gradfit.errors.OptionError: unknown model 'gausian' (did you mean 'gaussian'?); ...
    """
    name = text.strip()
    if not name.isidentifier() or name in independent or get_builtin(name) is not None:
        return
    error = unknown_name("model", name, [*BUILTINS, "polynomialN"])
    var = independent[0]
    raise OptionError(f"{error}; or write an expression in {var}, such as 'a*{var} + b'")


def _starting_params(
    model: Model, p0: Any, x: Any, y: Tensor, dtype: torch.dtype, device: torch.device
) -> Tensor:
    names = model.param_names
    if p0 is None or isinstance(p0, Mapping):
        base = model.initial_params(dtype)
        if base is None:
            guess = model.guess(x, y)
            base = guess if guess is not None else torch.ones(len(names), dtype=dtype)
        base = base.to(dtype=dtype, device=device).clone()
        for name, value in (p0 or {}).items():
            if name not in names:
                raise unknown_name("parameter in p0", name, names)
            base[names.index(name)] = float(value)
        return base
    start = torch.as_tensor(p0, dtype=dtype, device=device).reshape(-1).clone()
    if start.numel() != len(names):
        raise OptionError(f"p0 has {start.numel()} values; the model has {len(names)}: {names}")
    return start


def _check_model_output(model: Model, x: Any, y: Tensor, p: Tensor) -> None:
    def values() -> str:
        return ", ".join(f"{n}={v:g}" for n, v in zip(model.param_names, p.tolist(), strict=True))

    with torch.no_grad():
        try:
            out = model(x, p)
        except ModelError:
            raise
        except Exception as error:
            raise ModelError(f"the model failed at p0 ({values()}): {error}") from None
    if not isinstance(out, Tensor) or out.shape != y.shape:
        shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ModelError(f"the model returned shape {shape}, expected {tuple(y.shape)} (like y)")
    if not torch.isfinite(out).all():
        row = int((~torch.isfinite(out)).nonzero()[0, 0])
        raise ModelError(
            f"the model is not finite at p0 ({values()}) at row {row}; choose another p0"
        )


def _optimise(
    problem: Problem,
    state: LoopState,
    optimizer: str,
    lr: float | None,
    epochs: int | None,
    tol: float | None,
    hook: Hook | None,
) -> LoopOutcome:
    """Run ``optimizer`` from ``state`` (fresh, or restored from a checkpoint)."""
    if optimizer == "lm":
        from gradfit.optim.least_squares import run_lm

        return run_lm(problem, state, max_iter=epochs, tol=tol, hook=hook)
    assert lr is not None
    if optimizer == "lbfgs":
        return run_lbfgs(
            problem,
            state,
            lr=lr,
            epochs=epochs or 100,
            tol=1e-12 if tol is None else tol,
            hook=hook,
        )
    step = FIRST_ORDER[optimizer](lr=lr)
    state.optimizer_state = checkpoints.restore_into(step.init(state.theta), state.optimizer_state)
    assert epochs is not None  # FitOptions.epoch_limit gives first-order optimizers one
    return run_loop(problem, state, step, epochs=epochs, tol=tol, hook=hook)


def _result(
    problem: Problem,
    outcome: LoopOutcome,
    optimizer: str,
    n_omitted: int,
    absolute_sigma: bool,
    start: Tensor,
) -> FitResult:
    space, model = problem.space, problem.model
    theta = outcome.theta.detach()
    params = space.to_params(theta.unsqueeze(0))[0]
    free, P = space.free, len(space.names)
    y: stats.Array  # tensors, or NumPy arrays for one fit on the CPU
    sigma: stats.Array | None
    y_pred: stats.Array
    J: stats.Array
    y, sigma = problem.y, problem.loss.sigma
    cpu = y.device.type == "cpu"  # one fit's small arrays: NumPy's per-operation cost is lower
    if cpu:
        y, sigma = y.numpy(), None if sigma is None else sigma.numpy()
    if outcome.rows is not None:  # the solver's [J; r] at theta, already divided by sigma
        J_free, residuals = outcome.rows[:-1].T, outcome.rows[-1]
        y_pred = y + (residuals if sigma is None else residuals * sigma)
    else:
        y_pred, J = prediction_and_jacobian(model, problem.x, params)
        if cpu:
            y_pred, J = y_pred.numpy(), J.numpy()
        residuals = y_pred - y if sigma is None else (y_pred - y) / sigma
        J_free = J if len(free) == P else J[..., free]
        if sigma is not None:
            J_free = J_free / sigma[..., None]
    fit_stats = stats.goodness(y, y_pred, residuals, len(free))
    scale = 1.0 if absolute_sigma else fit_stats["reduced_chi2"]  # as curve_fit: sigma=1 if unset
    if not math.isfinite(float(scale)):
        scale = math.inf
    estimability = stats.estimability(J_free)
    cov = torch.as_tensor(stats.scaled(estimability.covariance, scale), device=params.device)
    if len(free) < P:  # fixed parameters: zero rows and columns
        full = torch.zeros(P, P, dtype=params.dtype, device=params.device)
        full[[[i] for i in free], free] = cov
        cov = full
    return FitResult.build(
        model=model,
        problem=problem,
        params=params,
        covariance=cov,
        outcome=outcome,
        optimizer=optimizer,
        statistics=fit_stats,
        n_omitted=n_omitted,
        absolute_sigma=absolute_sigma,
        start=start,
        estimability=estimability,
    )
