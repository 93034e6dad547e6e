"""Several expression trees as one straight-line program in which shared subtrees run once.

A model's value and its symbolic derivatives repeat work: every derivative of a Gaussian
contains its exponential.  Value numbering turns the trees into a list of steps, each computed
once per evaluation.  Two more things make a batch of curves cheap to evaluate:

* Products are regrouped so that factors free of the independent variables (one number per
  curve, ``[K, 1]``) are multiplied together first and applied to the point-wise factors
  (``[K, N]``) once: ``4*(x-c)**2*w/(2*w**2)**2`` costs one pass over the points instead of
  four.  The regrouping changes results only by rounding (per-curve factors are formed in
  the parameters' dtype, which gradfit always makes that of the data).
* Intermediate tensors are released after their last use, which keeps the working set small.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from gradfit.errors import ExpressionError
from gradfit.model.expr import (
    CONSTANTS,
    FUNCTIONS,
    OPERATORS,
    BinOp,
    Call,
    Const,
    Neg,
    Node,
    Num,
    Value,
    Var,
    power,
)

#: step kinds (unary minus folds into products); a step's argument is a number (NUM, the
#: exponent of POW_NUM), a name (VAR), a key of ``expr.OPERATORS`` (BIN) or of
#: ``expr.FUNCTIONS`` (CALL)
NUM, VAR, POW_NUM, BIN, CALL = range(5)
Step = tuple[int, object, tuple[int, ...]]


class Program:
    """Evaluate several trees at once, sharing common subexpressions.

    Example:
        >>> from gradfit.model.expr import parse_expression
        >>> e = parse_expression("a*exp(-k*x)")
        >>> roots = [e.root, e.diff("a").root, e.diff("k").root]
        >>> program = Program(roots)
        >>> program.n_steps < sum(_size(r) for r in roots)  # exp(-k*x) is computed once
        True
        >>> [float(v) for v in program.run({"x": torch.tensor(0.0), "a": 2.0, "k": 1.0})]
        [2.0, 1.0, -0.0]
    """

    def __init__(self, roots: Sequence[Node], independent: Sequence[str] = ()) -> None:
        self._independent = frozenset(independent)
        self._steps: list[Step] = []
        self._slots: dict[tuple[object, ...], int] = {}  # structural key -> slot
        self._by_id: dict[int, int] = {}  # the same node object is numbered once
        self._keep: list[Node] = []  # keeps numbered nodes alive so their ids stay unique
        try:
            self.outputs = tuple(self._number(root) for root in roots)
        except RecursionError:
            raise ExpressionError("expression is nested too deeply to process") from None
        self._release = self._last_uses()

    @property
    def n_steps(self) -> int:
        return len(self._steps)

    @property
    def steps(self) -> tuple[Step, ...]:
        """``(kind, argument, operand slots)`` per step, in evaluation order."""
        return tuple(self._steps)

    def _number(self, node: Node) -> int:
        slot = self._by_id.get(id(node))
        if slot is not None:
            return slot
        if isinstance(node, Num):
            # -0.0 == 0.0, so the sign is part of the key
            slot = self._emit(NUM, node.value, (), key=(node.value, str(node.value)))
        elif isinstance(node, Const):
            slot = self._emit(NUM, CONSTANTS[node.name], (), key=node.name)
        elif isinstance(node, Var):
            slot = self._emit(VAR, node.name, ())
        elif isinstance(node, Neg) or (isinstance(node, BinOp) and node.op in "*/"):
            slot = self._product(node)
        elif isinstance(node, BinOp) and node.op == "**" and isinstance(node.right, Num):
            slot = self._emit(POW_NUM, node.right.value, (self._number(node.left),))
        elif isinstance(node, BinOp):
            slot = self._emit(BIN, node.op, (self._number(node.left), self._number(node.right)))
        elif isinstance(node, Call):
            slot = self._emit(CALL, node.func, (self._number(node.arg),))
        else:  # pragma: no cover - the parser builds no other node types
            raise ExpressionError(f"cannot compile node {node!r}")
        self._by_id[id(node)] = slot
        self._keep.append(node)
        return slot

    def _emit(self, kind: int, arg: object, args: tuple[int, ...], key: object = None) -> int:
        """The slot of this step, shared with an equal step emitted before."""
        full_key = (kind, arg if key is None else key, args)
        slot = self._slots.get(full_key)
        if slot is None:
            slot = self._slots[full_key] = len(self._steps)
            self._steps.append((kind, arg, args))
        return slot

    def _product(self, node: Node) -> int:
        """A product/quotient chain: per-curve factors first, then one pass over the points."""
        coefficient, factors = _flatten(node)
        varies = [any(n in self._independent for n in f.names) for f, _ in factors]
        scale = self._chain([fe for fe, v in zip(factors, varies, strict=True) if not v])
        points = self._chain([fe for fe, v in zip(factors, varies, strict=True) if v])
        if coefficient != 1.0 or (scale is None and points is None):
            number = self._emit(NUM, coefficient, (), key=(coefficient, str(coefficient)))
            scale = number if scale is None else self._emit(BIN, "*", (number, scale))
        if points is None:
            return scale  # type: ignore[return-value]
        if scale is None:
            return points
        return self._emit(BIN, "*", (points, scale))

    def _chain(self, factors: list[tuple[Node, int]]) -> int | None:
        """``Π num / Π den`` left to right, numerators first; None for no factors."""
        ordered = [f for f in factors if f[1] > 0] + [f for f in factors if f[1] < 0]
        slot = None
        for factor, sign in ordered:
            operand = self._number(factor)
            if slot is None and sign > 0:
                slot = operand
            elif slot is None:
                one = self._emit(NUM, 1.0, (), key=(1.0, "1.0"))
                slot = self._emit(BIN, "/", (one, operand))
            else:
                slot = self._emit(BIN, "*" if sign > 0 else "/", (slot, operand))
        return slot

    def _last_uses(self) -> list[tuple[int, ...]]:
        """For each step, the slots no later step reads (outputs are never released)."""
        last: dict[int, int] = {}
        for index, (_, _, args) in enumerate(self._steps):
            for arg in args:
                last[arg] = index
        release: list[list[int]] = [[] for _ in self._steps]
        for slot, index in last.items():
            if slot not in self.outputs:
                release[index].append(slot)
        return [tuple(r) for r in release]

    def run(self, env: Mapping[str, Value]) -> list[Value]:
        """Values of the roots; a root without any tensor in it comes back as a float."""
        values: list[Value | None] = [None] * len(self._steps)
        for index, (kind, arg, args) in enumerate(self._steps):
            if kind == VAR:
                value = env[arg]  # type: ignore[index]
            elif kind == NUM:
                value = arg  # type: ignore[assignment]
            elif kind == POW_NUM:
                value = power(values[args[0]], arg)  # type: ignore[arg-type]
            elif kind == BIN:
                left, right = values[args[0]], values[args[1]]
                if not isinstance(left, torch.Tensor) and not isinstance(right, torch.Tensor):
                    left = torch.tensor(left, dtype=torch.float64)  # as Node.evaluate does
                value = OPERATORS[arg](left, right)  # type: ignore[index, arg-type]
            else:
                operand = values[args[0]]
                if not isinstance(operand, torch.Tensor):
                    operand = torch.tensor(operand, dtype=torch.float64)
                value = FUNCTIONS[arg].evaluate(operand)  # type: ignore[index]
            values[index] = value
            for slot in self._release[index]:
                values[slot] = None
        return [values[i] for i in self.outputs]  # type: ignore[misc]


def _flatten(node: Node) -> tuple[float, list[tuple[Node, int]]]:
    """``node`` as ``coefficient * Π factor**(±1)``, looking through ``*``, ``/`` and unary -."""
    coefficient, factors = 1.0, []
    stack: list[tuple[Node, int]] = [(node, 1)]
    while stack:
        item, power = stack.pop()
        if isinstance(item, BinOp) and item.op in "*/":
            stack.append((item.right, power if item.op == "*" else -power))
            stack.append((item.left, power))
        elif isinstance(item, Neg):
            coefficient = -coefficient
            stack.append((item.arg, power))
        elif isinstance(item, Num | Const) and (power > 0 or _number_value(item) != 0):
            value = _number_value(item)
            coefficient = coefficient * value if power > 0 else coefficient / value
        else:
            factors.append((item, power))
    return coefficient, factors


def _number_value(node: Num | Const) -> float:
    return node.value if isinstance(node, Num) else CONSTANTS[node.name]


def _size(node: Node) -> int:
    """Number of nodes in a tree, counting shared subtrees every time (for the doctest)."""
    return 1 + sum(_size(child) for child in node.children)
