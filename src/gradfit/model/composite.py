"""Composite models: ``Model + Model``, ``-``, ``*``, ``/`` with lmfit's ``prefix=`` convention.

A composite of expression models (built-ins included) is itself an expression model: its text
is the parenthesised combination of its operands' texts with their (prefixed) parameter names,
so it keeps the symbolic Jacobian, the compiled LM kernel, ``fit_batch`` and ``fit-many``.
Its parameters are the left operand's, then the right operand's not already listed: a name
that appears in both operands is one shared parameter (as in lmfit, which shares by name and
refuses nothing); give the operands different ``prefix=`` to keep them apart. A composite has
no built-in guess (the guess of a sum is not the sum of guesses): it starts from ``p0`` (a
mapping may name the prefixed parameters) or from ones.

Python-function and ``nn.Module`` models cannot be combined (yet): they are refused with a
``ModelError``.

Example:
    >>> from gradfit.model.models import Model
    >>> m = Model("gaussian", prefix="p1_") + Model("gaussian", prefix="p2_") + Model("linear")
    >>> m.param_names[:4], m.param_names[-2:]
    (('p1_amplitude', 'p1_center', 'p1_width', 'p1_offset'), ('a', 'b'))
"""

from __future__ import annotations

import dataclasses
import re
from typing import TYPE_CHECKING

from gradfit.errors import ModelError
from gradfit.model.expr import CONSTANTS, BinOp, Call, Neg, Node, Var

if TYPE_CHECKING:
    from gradfit.model.models import Model

#: the operators a composite may join its operands with
OPERATORS = ("+", "-", "*", "/")
_SUPPORTED = (
    "composites are made of expression models and built-ins (Model('a*x + b'), "
    "Model('gaussian', prefix='p1_'))"
)


def _expression_text(model: Model, role: str) -> str:
    if model.expression is None:
        kind = "an nn.Module" if model.module is not None else "a Python function"
        raise ModelError(
            f"cannot {role} the model {model.name}: it is {kind}; {_SUPPORTED}; write it as "
            "an expression to combine it"
        )
    return str(model.expression)


def _rename(node: Node, names: dict[str, str]) -> Node:
    """``node`` with every variable in ``names`` renamed (the tree is immutable: a copy)."""
    if isinstance(node, Var):
        return Var(names.get(node.name, node.name))
    if isinstance(node, Neg | Call):
        return dataclasses.replace(node, arg=_rename(node.arg, names))
    if isinstance(node, BinOp):
        left, right = _rename(node.left, names), _rename(node.right, names)
        return dataclasses.replace(node, left=left, right=right)
    return node  # numbers and constants


def apply_prefix(model: Model, prefix: str) -> None:
    """Rename ``model``'s parameters ``name`` -> ``prefix + name``, in place (``Model``'s
    ``prefix=``); a built-in keeps its guess (the order of its parameters is unchanged)."""
    if not isinstance(prefix, str) or not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]*", prefix):
        raise ModelError(
            f"prefix must be letters, digits and '_' starting with a letter, got {prefix!r}"
        )
    _expression_text(model, "prefix")
    assert model.expression is not None
    names = {n: prefix + n for n in model.param_names}
    clash = sorted(set(names.values()) & (set(CONSTANTS) | set(model.independent)))
    if clash:
        raise ModelError(f"prefix {prefix!r} makes the parameter name(s) {clash} a reserved name")
    text = str(_rename(model.expression.root, names))
    name, guess_fn, description = model.name, model.guess_fn, model.description
    model._init_expression(text, model.independent, [names[n] for n in model.param_names])
    if description is not None:  # a built-in: "gaussian(prefix=p1_)", with its guess
        model.name, model.guess_fn, model.description = (
            f"{name}(prefix={prefix})",
            guess_fn,
            description,
        )


def combine(left: Model, op: str, right: Model) -> Model:
    """``left op right`` as one expression model (``Model.__add__`` and friends call this)."""
    from gradfit.model.models import Model

    if op not in OPERATORS:
        raise ModelError(f"models combine with {' '.join(OPERATORS)}, got {op!r}")
    texts = _expression_text(left, "combine"), _expression_text(right, "combine")
    if left.independent != right.independent:
        raise ModelError(
            f"cannot combine models of different independent variables: "
            f"{list(left.independent)} and {list(right.independent)}"
        )
    order = list(dict.fromkeys((*left.param_names, *right.param_names)))  # shared by name
    return Model(f"({texts[0]}) {op} ({texts[1]})", params=order, independent=left.independent)


_BUILTIN_TERM = re.compile(
    r"\s*([A-Za-z]\w*)\s*(?:\(\s*prefix\s*=\s*(['\"]?)([A-Za-z]\w*)\2\s*\))?\s*", re.ASCII
)


def _split_terms(text: str) -> tuple[list[str], list[str]] | None:
    """``text`` split on ``+ - * /`` outside parentheses (``**`` stays inside its term);
    None if the parentheses do not balance (the expression parser then says why)."""
    terms, ops, depth, start, i = [], [], 0, 0, 0
    while i < len(text):
        char = text[i]
        if char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
            if depth < 0:
                return None
        elif depth == 0 and char == "*" and text.startswith("**", i):
            i += 2
            continue
        elif depth == 0 and char in "+-*/":
            terms.append(text[start:i])
            ops.append(char)
            start = i + 1
        i += 1
    return ([*terms, text[start:]], ops) if depth == 0 else None


def _parenthesised(term: str) -> str | None:
    """The inside of ``( ... )`` when those parentheses enclose the whole term, else None."""
    term = term.strip()
    if not (term.startswith("(") and term.endswith(")")):
        return None
    depth = 0
    for i, char in enumerate(term):
        depth += {"(": 1, ")": -1}.get(char, 0)
        if depth == 0 and i < len(term) - 1:
            return None  # "(a) + (b)" closes early: not one parenthesised term
    return term[1:-1]


def _in_variable(model: Model, variable: str) -> Model:
    """A built-in (written in ``x``) rewritten in ``variable``; it keeps no guess."""
    from gradfit.model.models import Model

    if model.independent == (variable,):
        return model
    if variable in model.param_names:
        raise ModelError(
            f"the built-in {model.name} has a parameter {variable!r}, the name of the x "
            "column: give it a prefix, gaussian(prefix=p1_)"
        )
    assert model.expression is not None
    text = str(_rename(model.expression.root, {model.independent[0]: variable}))
    return Model(text, params=model.param_names, independent=variable)


def parse_composite(text: str, variable: str = "x") -> Model | None:
    """The CLI's composite form, parsed without ``eval``; None when ``text`` is not one.

    ``text`` is split on ``+ - * /`` outside parentheses; each term is a built-in name with an
    optional ``(prefix=...)`` or a parenthesised expression in ``variable``, joined left to
    right with Python's precedence (``*`` and ``/`` before ``+`` and ``-``). It is the
    composite form when every term is one of those and at least one is a built-in (one term
    alone only with a prefix); anything else is left to the expression parser, except a term
    with ``(prefix=...)`` beside one that is neither, which is refused with a ``ModelError``.

    Example:
        >>> m = parse_composite("gaussian(prefix=p1_) + gaussian(prefix=p2_) + linear")
        >>> m.param_names[:2], m.param_names[-2:]
        (('p1_amplitude', 'p1_center'), ('a', 'b'))
        >>> parse_composite("a*x + b") is None
        True
    """
    from gradfit.model.models import Model, get_builtin

    split = _split_terms(text)
    if split is None:
        return None
    terms, ops = split
    models: list[Model | None] = []
    builtin, prefixed = False, re.search(r"\(\s*prefix\s*=", text) is not None
    for term in terms:
        inside = _parenthesised(term)
        match = _BUILTIN_TERM.fullmatch(term)
        model = get_builtin(match.group(1)) if match else None
        if match and model is not None:
            builtin, prefixed = True, prefixed or match.group(3) is not None
            if match.group(3) is not None:
                apply_prefix(model, match.group(3))
            models.append(model)
        elif inside is not None and inside.strip():
            models.append(Model(inside, independent=variable))
        else:
            models.append(None)
    if not builtin or (len(terms) == 1 and not prefixed):
        return None
    bad = [t.strip() for t, m in zip(terms, models, strict=True) if m is None]
    if bad and not prefixed:
        return None
    if bad:
        raise ModelError(
            f"{bad[0]!r} is not a term of a composite model: write each term as a built-in "
            "(gaussian, gaussian(prefix=p1_); see `gradfit models`) or a parenthesised "
            "expression, (a*x + b), joined by + - * /"
        )
    parts = [m for m in models if m is not None]
    if len(parts) == 1:
        return parts[0]  # one prefixed built-in: it keeps its guess
    parts = [_in_variable(m, variable) for m in parts]
    return _fold(parts, ops)


def _fold(parts: list[Model], ops: list[str]) -> Model:
    """Join ``parts`` with ``ops`` left to right, ``*`` and ``/`` first."""
    sums, sum_ops = [parts[0]], []
    for op, part in zip(ops, parts[1:], strict=True):
        if op in "*/":
            sums[-1] = combine(sums[-1], op, part)
        else:
            sums.append(part)
            sum_ops.append(op)
    result = sums[0]
    for op, part in zip(sum_ops, sums[1:], strict=True):
        result = combine(result, op, part)
    return result
