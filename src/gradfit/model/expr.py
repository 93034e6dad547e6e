"""A small, safe expression language for model formulas, compiled to torch operations.

Text is parsed with :func:`ast.parse` and walked with an explicit whitelist of node types;
it is never given to ``eval``, ``exec`` or ``compile``.  The result is an immutable tree that
evaluates with whole-tensor torch operations, differentiates symbolically, and prints back
to text that parses to the same tree.
"""

from __future__ import annotations

import ast
import keyword
import math
import operator
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import cast

import torch

from gradfit.errors import ExpressionError

Value = torch.Tensor | float

MAX_LENGTH = 2000
MAX_DEPTH = 100

#: the named constants, by name
CONSTANTS = {"pi": math.pi, "e": math.e}
# Not dangerous (nothing is ever executed), but confusing as parameter names.
_RESERVED = frozenset(
    {"sign", "eval", "exec", "compile", "open", "globals", "locals", "vars", "getattr"}
    | {"setattr", "delattr", "input", "breakpoint"}
)
#: the binary operators, by the symbol the program's steps carry
OPERATORS: dict[str, Callable[[Value, Value], Value]] = {
    "+": operator.add,
    "-": operator.sub,
    "*": operator.mul,
    "/": operator.truediv,
    "**": operator.pow,
}
_AST_OPS = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/", ast.Pow: "**"}
_OTHER_OPS: dict[type[ast.AST], str] = {
    ast.Mod: "%",
    ast.FloorDiv: "//",
    ast.MatMult: "@",
    ast.LShift: "<<",
}
_OTHER_OPS |= {ast.RShift: ">>", ast.BitOr: "|", ast.BitXor: "^", ast.BitAnd: "&"}
_OTHER_OPS |= {ast.Not: "not", ast.Invert: "~"}
_DESCRIPTIONS = {
    ast.Attribute: "attribute access", ast.Subscript: "subscript", ast.Slice: "slice",
    ast.Lambda: "lambda", ast.ListComp: "comprehension", ast.SetComp: "comprehension",
    ast.DictComp: "comprehension", ast.GeneratorExp: "generator expression",
    ast.JoinedStr: "f-string", ast.FormattedValue: "f-string", ast.Starred: "starred argument",
    ast.NamedExpr: "assignment expression (:=)", ast.Compare: "comparison",
    ast.BoolOp: "boolean operator", ast.IfExp: "conditional expression (if/else)",
    ast.Tuple: "tuple", ast.List: "list", ast.Dict: "dict", ast.Set: "set", ast.Await: "await",
    ast.Yield: "yield", ast.YieldFrom: "yield",
}  # fmt: skip
# Precedence levels for printing: a child is parenthesized when it binds more loosely.
_PREC = {"+": 1, "-": 1, "*": 2, "/": 2, "**": 4}
_UNARY, _ATOM = 3, 5


class Node:
    """Base class of the immutable expression tree (subclasses are frozen dataclasses)."""

    prec: int = _ATOM
    names: tuple[str, ...]  # free names in order of first appearance, left to right

    def __post_init__(self) -> None:
        # Computed once, bottom-up as the tree is built, so no later call recurses for it.
        object.__setattr__(self, "names", self._names())

    def _names(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(n for child in self.children for n in child.names))

    @property
    def children(self) -> tuple[Node, ...]:
        """Direct subtrees, left to right."""
        return ()

    def evaluate(self, env: Mapping[str, Value]) -> Value:
        """Value of this subtree; a Python float while no tensor is involved."""
        raise NotImplementedError

    def diff(self, name: str) -> Node:
        """Simplified symbolic derivative with respect to ``name``."""
        # Subtrees that do not mention ``name`` are skipped, so derivatives stay small.
        return self._diff(name) if name in self.names else ZERO

    def _diff(self, name: str) -> Node:
        raise NotImplementedError


@dataclass(frozen=True)
class Num(Node):
    """A float64 number."""

    value: float

    @property
    def prec(self) -> int:  # type: ignore[override]
        # A negative number prints with a leading '-', so it binds like unary minus.
        return _UNARY if math.copysign(1.0, self.value) < 0 else _ATOM

    def evaluate(self, env: Mapping[str, Value]) -> Value:
        return self.value

    def __str__(self) -> str:
        if self.value == 0 and math.copysign(1.0, self.value) < 0:
            return "-0.0"
        if self.value.is_integer() and abs(self.value) < 1e16:
            return str(int(self.value))
        return repr(self.value)


@dataclass(frozen=True)
class Const(Node):
    """A named mathematical constant (``pi``, ``e``)."""

    name: str

    def evaluate(self, env: Mapping[str, Value]) -> Value:
        return CONSTANTS[self.name]

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True)
class Var(Node):
    """A parameter or independent variable, looked up by name at evaluation."""

    name: str

    def _names(self) -> tuple[str, ...]:
        return (self.name,)

    def evaluate(self, env: Mapping[str, Value]) -> Value:
        return env[self.name]

    def _diff(self, name: str) -> Node:
        return ONE

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True)
class Neg(Node):
    """Unary minus."""

    arg: Node
    prec = _UNARY

    @property
    def children(self) -> tuple[Node, ...]:
        return (self.arg,)

    def evaluate(self, env: Mapping[str, Value]) -> Value:
        return -self.arg.evaluate(env)

    def _diff(self, name: str) -> Node:
        return _neg(self.arg.diff(name))

    def __str__(self) -> str:
        return "-" + _wrap(self.arg, self.arg.prec < _UNARY)


@dataclass(frozen=True)
class BinOp(Node):
    """A binary operation: one of ``+ - * / **``."""

    op: str
    left: Node
    right: Node

    @property
    def prec(self) -> int:  # type: ignore[override]
        return _PREC[self.op]

    @property
    def children(self) -> tuple[Node, ...]:
        return (self.left, self.right)

    def evaluate(self, env: Mapping[str, Value]) -> Value:
        left = self.left.evaluate(env)
        if self.op == "**" and isinstance(self.right, Num):
            return power(left, self.right.value)
        right = self.right.evaluate(env)
        if not isinstance(left, torch.Tensor) and not isinstance(right, torch.Tensor):
            # Python floats raise on 1/0 and turn complex on (-8)**(1/3); torch gives inf/nan.
            left = torch.tensor(left, dtype=torch.float64)
        return OPERATORS[self.op](left, right)

    def _diff(self, name: str) -> Node:
        u, v = self.left, self.right
        du, dv = u.diff(name), v.diff(name)
        if self.op in "+-":
            return _add(du, dv) if self.op == "+" else _sub(du, dv)
        if self.op == "*":
            return _add(_mul(du, v), _mul(u, dv))
        if self.op == "/":
            return _sub(_div(du, v), _div(_mul(u, dv), _pow(v, TWO)))
        if name not in v.names:  # power rule for an exponent that is constant here
            return _mul(_mul(v, _pow(u, _sub(v, ONE))), du)
        log_u = ONE if u == Const("e") else _call("log", u)
        return _mul(self, _add(_mul(dv, log_u), _div(_mul(v, du), u)))

    def __str__(self) -> str:
        prec = _PREC[self.op]
        if self.op == "**":  # right-associative; the exponent may be a unary minus
            left = _wrap(self.left, self.left.prec <= prec)
            return f"{left}**{_wrap(self.right, self.right.prec < _UNARY)}"
        # Left-associative: an equal-precedence right operand needs parentheses to round-trip.
        left = _wrap(self.left, self.left.prec < prec)
        right = _wrap(self.right, self.right.prec <= prec)
        return f"{left} {self.op} {right}" if prec == 1 else f"{left}{self.op}{right}"


@dataclass(frozen=True)
class Call(Node):
    """A call of one of the whitelisted one-argument functions."""

    func: str
    arg: Node

    @property
    def children(self) -> tuple[Node, ...]:
        return (self.arg,)

    def evaluate(self, env: Mapping[str, Value]) -> Value:
        arg = self.arg.evaluate(env)
        if not isinstance(arg, torch.Tensor):
            arg = torch.tensor(arg, dtype=torch.float64)
        return FUNCTIONS[self.func].evaluate(arg)

    def _diff(self, name: str) -> Node:
        return FUNCTIONS[self.func].derivative(self.arg, self.arg.diff(name))

    def __str__(self) -> str:
        return f"{self.func}({self.arg})"


ZERO, ONE, TWO = Num(0.0), Num(1.0), Num(2.0)


def _wrap(node: Node, parens: bool) -> str:
    return f"({node})" if parens else str(node)


def power(base: Value, exponent: float) -> Value:
    """``base ** exponent`` for a number ``exponent``, as trees and programs evaluate it."""
    if not isinstance(base, torch.Tensor):
        base = torch.tensor(base, dtype=torch.float64)
    if exponent == 2:
        return base * base  # the most common exponent, and the cheapest kernel
    if exponent.is_integer() and abs(exponent) <= 64:
        return base ** int(exponent)  # integer exponents keep negative bases real
    return base**exponent


def _d_sqrt1m(u: Node) -> Node:
    return _call("sqrt", _sub(ONE, _pow(u, TWO)))


@dataclass(frozen=True, slots=True)
class Function:
    """One function of the language: how it evaluates, folds and differentiates."""

    evaluate: Callable[[torch.Tensor], torch.Tensor]  # whole tensors
    fold: Callable[[float], float]  # float64, to fold a constant argument
    derivative: Callable[[Node, Node], Node]  # d f(u) = derivative(u, du)
    in_text: bool = True  # False: only derivatives produce it (sign); user text may not call it


#: The language's functions, by name: the one table (the parser, evaluation, constant folding,
#: differentiation, ``program.Program`` and the compiled kernel's interpreter read it).
FUNCTIONS: dict[str, Function] = {
    "exp": Function(torch.exp, math.exp, lambda u, du: _mul(_call("exp", u), du)),
    "log": Function(torch.log, math.log, lambda u, du: _div(du, u)),
    "log10": Function(
        torch.log10, math.log10, lambda u, du: _div(du, _mul(Num(math.log(10.0)), u))
    ),
    "sqrt": Function(torch.sqrt, math.sqrt, lambda u, du: _div(du, _mul(TWO, _call("sqrt", u)))),
    "sin": Function(torch.sin, math.sin, lambda u, du: _mul(_call("cos", u), du)),
    "cos": Function(torch.cos, math.cos, lambda u, du: _neg(_mul(_call("sin", u), du))),
    "tan": Function(torch.tan, math.tan, lambda u, du: _div(du, _pow(_call("cos", u), TWO))),
    "arcsin": Function(torch.asin, math.asin, lambda u, du: _div(du, _d_sqrt1m(u))),
    "arccos": Function(torch.acos, math.acos, lambda u, du: _neg(_div(du, _d_sqrt1m(u)))),
    "arctan": Function(torch.atan, math.atan, lambda u, du: _div(du, _add(ONE, _pow(u, TWO)))),
    "sinh": Function(torch.sinh, math.sinh, lambda u, du: _mul(_call("cosh", u), du)),
    "cosh": Function(torch.cosh, math.cosh, lambda u, du: _mul(_call("sinh", u), du)),
    "tanh": Function(
        torch.tanh, math.tanh, lambda u, du: _mul(_sub(ONE, _pow(_call("tanh", u), TWO)), du)
    ),
    "abs": Function(torch.abs, math.fabs, lambda u, du: _mul(_call("sign", u), du)),
    "erf": Function(
        torch.special.erf,
        math.erf,
        lambda u, du: _mul(
            _mul(Num(2.0 / math.sqrt(math.pi)), _call("exp", _neg(_pow(u, TWO)))), du
        ),
    ),
    # only in derivatives (d|u|/du)
    "sign": Function(
        torch.sign, lambda v: float((v > 0) - (v < 0)), lambda u, du: ZERO, in_text=False
    ),
}
_ALLOWED = (
    "allowed are numbers, names, + - * / **, unary -, the constants pi and e, "
    f"and the functions {', '.join(n for n, f in FUNCTIONS.items() if f.in_text)} "
    "with one argument"
)


def _fold(op: str, a: float, b: float, strict: bool) -> float | None:
    """``a op b`` in float64, or None when the result is not a finite number."""
    try:
        # math.pow, never int pow: 9**9**9**9 must fail fast instead of building a huge int.
        # two floats in, a float out (OPERATORS also take tensors)
        value = math.pow(a, b) if op == "**" else cast(float, OPERATORS[op](a, b))
    except OverflowError:
        if strict:
            raise ExpressionError(
                f"constant exponent too large: {Num(a)}**{Num(b)} overflows"
            ) from None
        return None
    except (ValueError, ZeroDivisionError):
        return None  # left unfolded: torch gives the same nan/inf at evaluation
    return value if math.isfinite(value) else None


def _binop(op: str, a: Node, b: Node, strict: bool = False) -> Node:
    if isinstance(a, Num) and isinstance(b, Num):
        value = _fold(op, a.value, b.value, strict)
        if value is not None:
            return Num(value)
    return BinOp(op, a, b)


def _call(func: str, arg: Node) -> Node:
    if isinstance(arg, Num):
        try:
            value = FUNCTIONS[func].fold(arg.value)
        except (ValueError, OverflowError):
            value = math.nan
        if math.isfinite(value):
            return Num(value)
    return Call(func, arg)


def _is(node: Node, value: float) -> bool:
    return isinstance(node, Num) and node.value == value


# Simplifying constructors used by ``diff``; each applies a few local rules only.
def _neg(a: Node) -> Node:
    if isinstance(a, Num):
        return Num(-a.value)
    if isinstance(a, Neg):
        return a.arg
    if isinstance(a, BinOp) and a.op in "*/":  # -(u*v) == (-u)*v exactly
        return _binop(a.op, _neg(a.left), a.right)
    if isinstance(a, BinOp) and a.op == "-":
        return _sub(a.right, a.left)
    return Neg(a)


def _add(a: Node, b: Node) -> Node:
    if _is(a, 0):
        return b
    if _is(b, 0):
        return a
    if isinstance(b, Neg):
        return _sub(a, b.arg)
    if isinstance(b, Num) and b.value < 0:
        return _sub(a, Num(-b.value))
    return _binop("+", a, b)


def _sub(a: Node, b: Node) -> Node:
    if _is(b, 0):
        return a
    if _is(a, 0):
        return _neg(b)
    if a == b:
        return ZERO
    if isinstance(b, Neg):
        return _add(a, b.arg)
    return _binop("-", a, b)


def _mul(a: Node, b: Node) -> Node:
    if _is(a, 0) or _is(b, 0):
        return ZERO
    if _is(a, 1) or _is(b, 1):
        return b if _is(a, 1) else a
    if _is(a, -1) or _is(b, -1):
        return _neg(b if _is(a, -1) else a)
    if isinstance(b, Num) and not isinstance(a, Num):
        return _mul(b, a)  # numbers first: "2*x", and lets 2*(3*x) fold below
    if isinstance(b, BinOp) and b.op == "*":  # left-nested products print without parentheses
        return _mul(_mul(a, b.left), b.right)
    if isinstance(b, Neg):  # a sign in front reads better than "a*-b"
        return _neg(_mul(a, b.arg))
    return _binop("*", a, b)


def _div(a: Node, b: Node) -> Node:
    if _is(a, 0):
        return ZERO
    if _is(b, 1):
        return a
    return _binop("/", a, b)


def _pow(a: Node, b: Node) -> Node:
    if _is(b, 0) or _is(a, 1):
        return ONE
    if _is(b, 1):
        return a
    return _binop("**", a, b)


@dataclass(frozen=True, repr=False)
class Expression:
    """A parsed model expression: an immutable tree, equal to another by structure.

    Example:
        >>> e = parse_expression("a*exp(-k*t) + c", independent=("t",))
        >>> e.param_names, e.independent
        (('a', 'k', 'c'), ('t',))
        >>> e == parse_expression(str(e), e.independent)
        True
    """

    root: Node
    independent: tuple[str, ...] = ("x",)
    param_names: tuple[str, ...] = field(init=False, compare=False)

    def __post_init__(self) -> None:
        params = tuple(n for n in self.root.names if n not in self.independent)
        object.__setattr__(self, "param_names", params)  # frozen: set the derived field once

    @property
    def names(self) -> tuple[str, ...]:
        """All free names used (parameters and independent variables), first appearance first."""
        return self.root.names

    def evaluate(self, variables: Mapping[str, Value]) -> torch.Tensor:
        """Evaluate with torch operations; values broadcast like torch.

        Example:
            >>> e = parse_expression("a*x**2 + b")
            >>> e.evaluate({"x": torch.tensor([1.0, 2.0]), "a": 2.0, "b": 1.0})
            tensor([3., 9.])
        """
        missing = [n for n in self.root.names if n not in variables]
        if missing:
            raise ExpressionError(
                f"no value given for {', '.join(map(repr, missing))} in expression {self}"
            )
        with _depth_guard():
            out = self.root.evaluate(variables)
        return out if isinstance(out, torch.Tensor) else torch.tensor(out, dtype=torch.float64)

    def diff(self, name: str) -> Expression:
        """Simplified symbolic derivative with respect to a parameter or variable.

        Example:
            >>> e = parse_expression("a*x**2 + b*x + c")
            >>> str(e.diff("a")), str(e.diff("x")), str(e.diff("c"))
            ('x**2', '2*a*x + b', '1')
        """
        with _depth_guard():
            return Expression(self.root.diff(name), self.independent)

    def is_constant(self) -> bool:
        """True if no free name appears (only numbers and constants).

        Example:
            >>> parse_expression("a*x + b").diff("b").is_constant()
            True
        """
        return not self.root.names

    def depends_on(self, name: str) -> bool:
        """True if ``name`` appears in the expression.

        Example:
            >>> parse_expression("a*x + b").diff("a").depends_on("x")
            True
        """
        return name in self.root.names

    def __str__(self) -> str:
        with _depth_guard():
            return str(self.root)

    def __repr__(self) -> str:
        return f"parse_expression({str(self)!r}, independent={self.independent!r})"


@contextmanager
def _depth_guard() -> Iterator[None]:
    # Parsed trees are at most MAX_DEPTH deep, but repeated diff() can grow them further.
    try:
        yield
    except RecursionError:
        raise ExpressionError("expression is nested too deeply to process") from None


def parse_expression(text: str, independent: Sequence[str] = ("x",)) -> Expression:
    """Parse ``text`` into an :class:`Expression`; never executes it.

    Args:
        text: Formula such as ``"a*exp(-k*t) + c"``.
        independent: Names of the independent variables (a single ``str`` is one name);
            every other free name is a parameter.

    Raises:
        ExpressionError: If the text is not in the safe language or has no parameters.

    Example:
        >>> e = parse_expression("a*exp(-k*t) + c", independent=("t",))
        >>> e.param_names
        ('a', 'k', 'c')
        >>> print(parse_expression("((a*x)) + -(2*3)"))
        a*x + -6
    """
    names = _check_independent(independent)
    expr = Expression(_build(_parse_ast(text).body, 0), names)
    if not expr.param_names:
        raise ExpressionError(f"expression has no parameters: {text.strip()!r}")
    return expr


def _check_independent(independent: Sequence[str]) -> tuple[str, ...]:
    names = (independent,) if isinstance(independent, str) else tuple(independent)
    for name in names:
        if not isinstance(name, str) or not name.isidentifier() or keyword.iskeyword(name):
            raise ExpressionError(f"invalid independent variable name {name!r}")
        if name in CONSTANTS:
            raise ExpressionError(f"invalid independent variable name {name!r}")
        _check_name(name)
    if len(set(names)) != len(names):
        raise ExpressionError(f"duplicate independent variable names: {names}")
    return names


def _parse_ast(text: str) -> ast.Expression:
    if not isinstance(text, str):
        raise ExpressionError(f"expression must be a string, not {type(text).__name__}")
    if len(text) > MAX_LENGTH:  # checked first: the parser's cost grows with the text
        raise ExpressionError(f"expression is too long ({len(text)} > {MAX_LENGTH} characters)")
    if not text.strip():
        raise ExpressionError("expression is empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. SyntaxWarning for "1if": we reject anyway
            return ast.parse(text, mode="eval")
    except SyntaxError as exc:
        where = f" at line {exc.lineno}, column {exc.offset}" if exc.lineno else ""
        msg = " ".join(str(exc.msg).split())  # keep the message on one line
        raise ExpressionError(f"invalid syntax{where}: {msg}") from None
    except (RecursionError, MemoryError, ValueError, OverflowError):
        raise ExpressionError("expression is too complex to parse") from None


def _build(node: ast.AST, depth: int) -> Node:
    """Translate one whitelisted AST node; everything else is rejected."""
    if depth > MAX_DEPTH:
        raise ExpressionError(f"expression is nested too deeply (more than {MAX_DEPTH} levels)")
    if isinstance(node, ast.BinOp) and type(node.op) in _AST_OPS:
        left, right = _build(node.left, depth + 1), _build(node.right, depth + 1)
        return _binop(_AST_OPS[type(node.op)], left, right, strict=True)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub | ast.UAdd):
        arg = _build(node.operand, depth + 1)
        if isinstance(node.op, ast.UAdd):
            return arg
        return Num(-arg.value) if isinstance(arg, Num) else Neg(arg)
    if isinstance(node, ast.Constant):
        return Num(_literal(node.value))
    if isinstance(node, ast.Name):
        _check_name(node.id)
        return Const(node.id) if node.id in CONSTANTS else Var(node.id)
    if isinstance(node, ast.Call):
        return _build_call(node, depth)
    raise ExpressionError(f"{_describe(node)} is not allowed; {_ALLOWED}")


def _build_call(node: ast.Call, depth: int) -> Node:
    if not isinstance(node.func, ast.Name):
        raise ExpressionError(f"call of {_describe(node.func)} is not allowed; {_ALLOWED}")
    name = node.func.id
    if name not in FUNCTIONS or not FUNCTIONS[name].in_text:
        raise ExpressionError(f"unknown function {name!r}; {_ALLOWED}")
    if node.keywords:
        raise ExpressionError(f"{name}() takes no keyword arguments; {_ALLOWED}")
    if any(isinstance(arg, ast.Starred) for arg in node.args):
        raise ExpressionError(f"starred arguments are not allowed in {name}(); {_ALLOWED}")
    if len(node.args) != 1:
        raise ExpressionError(f"{name}() takes exactly one argument ({len(node.args)} given)")
    return _call(name, _build(node.args[0], depth + 1))


def _literal(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        kind = {str: "string", bytes: "bytes", bool: "boolean", complex: "complex number"}
        what = kind.get(type(value), repr(value))
        raise ExpressionError(f"{what} literal is not allowed; {_ALLOWED}")
    try:
        number = float(value)
    except OverflowError:
        number = math.inf
    if not math.isfinite(number):
        raise ExpressionError("number literal is too large for float64")
    return number


def _check_name(name: str) -> None:
    if name.startswith("_"):
        raise ExpressionError(f"name {name!r} is not allowed: names may not start with '_'")
    if name in FUNCTIONS and FUNCTIONS[name].in_text:
        raise ExpressionError(f"{name!r} is a function; call it with one argument: {name}(...)")
    if name in _RESERVED:
        raise ExpressionError(f"name {name!r} is reserved; use another name")


def _describe(node: ast.AST) -> str:
    if isinstance(node, ast.BinOp | ast.UnaryOp):
        return f"operator {_OTHER_OPS.get(type(node.op), type(node.op).__name__)!r}"
    if isinstance(node, ast.Constant):
        return f"{type(node.value).__name__} literal"
    return _DESCRIPTIONS.get(type(node), type(node).__name__)
