"""Tied parameters: a parameter constrained to an expression of others (lmfit's ``expr``).

``ties={"p2_width": "p1_width", "p2_center": "p1_center + 1.4"}`` removes each tied
parameter from an expression model by substituting its expression (parsed by the safe
expression parser, never ``eval``) into the model's formula: the result is a new expression
model with fewer parameters, so the symbolic Jacobian and the compiled kernel keep working.
A tie may use only the model's other, untied parameters and numbers; ties of tied parameters
(cycles included), unknown names, the independent variable and ties of fixed or bounded
parameters are refused with an ``OptionError`` naming the tie. Python-function and
``nn.Module`` models are refused (for now).

After the fit, :func:`tied_values` gives each tied parameter's value and its stderr by the
delta method, ``sqrt(g C gᵀ)`` with ``g`` the tie's gradient with respect to the free
parameters and ``C`` their covariance.

Example:
    >>> from gradfit.model.models import Model
    >>> m = Model("gaussian", prefix="p1_") + Model("gaussian", prefix="p2_")
    >>> tied = apply_ties(m, {"p2_width": "p1_width", "p2_center": "p1_center + 1.4"})
    >>> "p2_width" in tied.model.param_names, len(tied.model.param_names)
    (False, 6)
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from gradfit.errors import ExpressionError, OptionError
from gradfit.model.expr import BinOp, Call, Expression, Neg, Node, Var, _build, _parse_ast
from gradfit.model.models import Model

Tensor = torch.Tensor


@dataclass(frozen=True)
class Tied:
    """A model with its tied parameters substituted away.

    ``original``: the model as given; ``model``: the reduced expression model (its
    parameters are the original's untied ones, in the same order); ``exprs``: tied name ->
    its expression in the free parameters; ``texts``: tied name -> the tie as given.
    """

    original: Model
    model: Model
    exprs: dict[str, Expression]
    texts: dict[str, str]

    @property
    def keep(self) -> list[int]:
        """Indices of the reduced model's parameters among the original's."""
        return [self.original.param_names.index(n) for n in self.model.param_names]


def parse_ties(ties: Mapping[str, str] | None) -> dict[str, str]:
    """Checked ``{name: expression text}`` (FitOptions' validation)."""
    if ties is None:
        return {}
    if not isinstance(ties, Mapping):
        raise OptionError(f"ties must be a mapping name -> expression, got {type(ties).__name__}")
    out = {}
    for name, text in ties.items():
        if not isinstance(name, str) or not isinstance(text, str) or not text.strip():
            raise OptionError(f"tie {name!r}: give a parameter name and an expression text")
        out[name] = text.strip()
    return out


def _substitute(node: Node, values: Mapping[str, Node]) -> Node:
    """``node`` with every variable in ``values`` replaced by its subtree (a copy)."""
    if isinstance(node, Var):
        return values.get(node.name, node)
    if isinstance(node, Neg | Call):
        return dataclasses.replace(node, arg=_substitute(node.arg, values))
    if isinstance(node, BinOp):
        left, right = _substitute(node.left, values), _substitute(node.right, values)
        return dataclasses.replace(node, left=left, right=right)
    return node


def apply_ties(
    model: Model,
    ties: Mapping[str, str],
    fixed: Mapping[str, float] | None = None,
    bounds: Mapping[str, Any] | None = None,
) -> Tied:
    """The expression model ``model`` with the ``ties`` substituted (see the module)."""
    ties = parse_ties(ties)
    if model.expression is None:
        kind = "an nn.Module" if model.module is not None else "a Python function"
        raise OptionError(
            f"ties work on expression models (and built-ins); the model {model.name} is {kind}: "
            "write it as an expression to tie its parameters"
        )
    names = model.param_names
    exprs: dict[str, Expression] = {}
    for name, text in ties.items():
        shown = f"tie {name}={text!r}"
        if name not in names:
            raise OptionError(f"{shown}: the model has no parameter {name!r}; valid: {names}")
        if fixed and name in fixed:
            raise OptionError(f"{shown}: {name!r} is fixed too; fix it or tie it, not both")
        if bounds and name in bounds:
            raise OptionError(f"{shown}: a tied parameter takes no bounds; bound the ones it uses")
        try:
            expr = Expression(_build(_parse_ast(text).body, 0), ())
        except ExpressionError as error:
            raise OptionError(f"{shown}: {error}") from None
        for used in expr.names:
            if used in model.independent:
                raise OptionError(
                    f"{shown}: a tie may use only parameters and numbers, not the variable {used!r}"
                )
            if used not in names:
                raise OptionError(f"{shown}: unknown parameter {used!r}; valid: {names}")
        exprs[name] = expr
    for name, expr in exprs.items():
        tied_used = [u for u in expr.names if u in exprs]
        if tied_used:
            path = _cycle(name, exprs)
            what = (
                f"the ties form a cycle ({' -> '.join(path)})"
                if path
                else (f"{tied_used[0]!r} is tied itself; write its expression instead")
            )
            raise OptionError(f"tie {name}={ties[name]!r}: {what}")
    free = [n for n in names if n not in exprs]
    if not free:
        raise OptionError("every parameter is tied: leave at least one free")
    assert model.expression is not None
    root = _substitute(model.expression.root, {n: e.root for n, e in exprs.items()})
    reduced = Model(str(root), params=free, independent=model.independent)
    missing = [n for n in free if n not in reduced.param_names]  # cannot happen: kept names
    assert not missing, missing
    tied = Tied(model, reduced, exprs, {n: ties[n] for n in exprs})
    if model.guess_fn is not None:  # a built-in keeps its guess, less the tied columns
        keep, guess = tied.keep, model.guess_fn

        def reduced_guess(x: Any, y: Tensor, mask: Tensor | None = None) -> Tensor:
            return guess(x, y, mask)[..., keep]

        reduced.guess_fn = reduced_guess
    return tied


def _cycle(start: str, exprs: Mapping[str, Expression]) -> list[str] | None:
    """A cycle of ties through ``start`` (``[a, b, a]``), or None."""
    stack: list[tuple[str, list[str]]] = [(start, [start])]
    seen: set[str] = set()
    while stack:
        name, path = stack.pop()
        for used in exprs[name].names:
            if used == start:
                return [*path, start]
            if used in exprs and used not in seen:
                seen.add(used)
                stack.append((used, [*path, used]))
    return None


def reduce_p0(tied: Tied, p0: Any) -> Any:
    """``p0`` for the reduced model: a mapping loses the tied names (their values follow from
    the ties), a vector (or ``[K, P]``) of the original's length loses their columns."""
    if p0 is None:
        return None
    if isinstance(p0, Mapping):
        return {k: v for k, v in p0.items() if k not in tied.exprs}
    shape = getattr(p0, "shape", None)
    n = len(tied.original.param_names)
    if shape is not None and len(shape) >= 1 and shape[-1] == n:
        return p0[..., tied.keep]
    if shape is None and isinstance(p0, Sequence) and len(p0) == n:
        return [p0[i] for i in tied.keep]
    return p0


def tied_values(
    tied: Tied, params: Tensor, covariance: Tensor | None
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Values and delta-method stderr of the tied parameters.

    ``params`` is ``[..., P]`` in the reduced model's order. With ``covariance``
    (``[..., P, P]``) the stderr is ``sqrt(g C gᵀ)``; without it (per-parameter variances
    only, as in ``fit_batch``), pass None and give the stderr through :func:`tied_stderr`.
    """
    env = {n: params[..., i] for i, n in enumerate(tied.model.param_names)}
    values: dict[str, Tensor] = {}
    stderr: dict[str, Tensor] = {}
    for name, expr in tied.exprs.items():
        values[name] = _evaluate(expr, env, params)
        if covariance is not None:
            g = gradient(tied, name, env, params)
            variance = ((g.unsqueeze(-2) @ covariance) @ g.unsqueeze(-1))[..., 0, 0]
            stderr[name] = variance.clamp_min(0).sqrt()
    return values, stderr


def gradient(tied: Tied, name: str, env: Mapping[str, Tensor], params: Tensor) -> Tensor:
    """``∂ tie / ∂ params``: ``[..., P]`` in the reduced model's order."""
    expr = tied.exprs[name]
    columns = [
        _evaluate(expr.diff(n), env, params)
        if n in expr.names
        else torch.zeros_like(params[..., 0])
        for n in tied.model.param_names
    ]
    return torch.stack(columns, dim=-1)


def tied_stderr(tied: Tied, name: str, params: Tensor, stderr: Tensor) -> Tensor:
    """Delta-method stderr from per-parameter stderr alone (no covariances): exact when the
    tie uses one parameter; NaN otherwise (the covariance would be needed)."""
    env = {n: params[..., i] for i, n in enumerate(tied.model.param_names)}
    used = [i for i, n in enumerate(tied.model.param_names) if n in tied.exprs[name].names]
    if len(used) > 1:
        return torch.full_like(params[..., 0], math.nan)
    if not used:
        return torch.zeros_like(params[..., 0])
    g = gradient(tied, name, env, params)[..., used[0]]
    return (g * stderr[..., used[0]]).abs()


def _evaluate(expr: Expression, env: Mapping[str, Tensor], like: Tensor) -> Tensor:
    out = expr.evaluate(env)
    return out.to(dtype=like.dtype, device=like.device).expand(like.shape[:-1]).clone()
