"""Several expression trees as one straight-line program in which shared subtrees run once.

A model's value and its symbolic derivatives repeat work: every derivative of a Gaussian
contains its exponential.  Value numbering turns the trees into a list of steps, each computed
once per evaluation with the same torch operations, in the same order, as
:meth:`gradfit.expr.Node.evaluate` (so the results are bit for bit the same).  Intermediate
tensors are released after their last use, which keeps the working set small for big batches.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from .errors import ExpressionError
from .expr import _ALL_FUNCTIONS, _CONSTANTS, _OPS, BinOp, Call, Const, Neg, Node, Num, Value, Var
from .expr import _power as power

# step kinds
_NUM, _VAR, _NEG, _POW_NUM, _BIN, _CALL = range(6)
Step = tuple[int, object, tuple[int, ...]]


class Program:
    """Evaluate several trees at once, sharing common subexpressions.

    Example:
        >>> from gradfit.expr import parse_expression
        >>> e = parse_expression("a*exp(-k*x)")
        >>> roots = [e.root, e.diff("a").root, e.diff("k").root]
        >>> program = Program(roots)
        >>> program.n_steps < sum(_size(r) for r in roots)  # exp(-k*x) is computed once
        True
        >>> [float(v) for v in program.run({"x": torch.tensor(0.0), "a": 2.0, "k": 1.0})]
        [2.0, 1.0, -0.0]
    """

    def __init__(self, roots: Sequence[Node]) -> None:
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

    def _number(self, node: Node) -> int:
        slot = self._by_id.get(id(node))
        if slot is not None:
            return slot
        if isinstance(node, Num):
            # -0.0 == 0.0, so the sign is part of the key
            key: tuple[object, ...] = (_NUM, node.value, str(node.value))
            step: Step = (_NUM, node.value, ())
        elif isinstance(node, Const):
            key, step = (_NUM, node.name), (_NUM, _CONSTANTS[node.name], ())
        elif isinstance(node, Var):
            key, step = (_VAR, node.name), (_VAR, node.name, ())
        elif isinstance(node, Neg):
            args = (self._number(node.arg),)
            key, step = (_NEG, args), (_NEG, None, args)
        elif isinstance(node, BinOp) and node.op == "**" and isinstance(node.right, Num):
            args = (self._number(node.left),)
            exponent = node.right.value
            key, step = (_POW_NUM, exponent, args), (_POW_NUM, exponent, args)
        elif isinstance(node, BinOp):
            args = (self._number(node.left), self._number(node.right))
            key, step = (_BIN, node.op, args), (_BIN, node.op, args)
        elif isinstance(node, Call):
            args = (self._number(node.arg),)
            key, step = (_CALL, node.func, args), (_CALL, node.func, args)
        else:  # pragma: no cover - the parser builds no other node types
            raise ExpressionError(f"cannot compile node {node!r}")
        slot = self._slots.get(key)
        if slot is None:
            slot = self._slots[key] = len(self._steps)
            self._steps.append(step)
        self._by_id[id(node)] = slot
        self._keep.append(node)
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
            if kind == _VAR:
                value = env[arg]  # type: ignore[index]
            elif kind == _NUM:
                value = arg  # type: ignore[assignment]
            elif kind == _NEG:
                value = -values[args[0]]  # type: ignore[operator]
            elif kind == _POW_NUM:
                value = power(values[args[0]], arg)  # type: ignore[arg-type]
            elif kind == _BIN:
                left, right = values[args[0]], values[args[1]]
                if not isinstance(left, torch.Tensor) and not isinstance(right, torch.Tensor):
                    left = torch.tensor(left, dtype=torch.float64)  # as Node.evaluate does
                value = _OPS[arg](left, right)  # type: ignore[index, arg-type]
            else:
                operand = values[args[0]]
                if not isinstance(operand, torch.Tensor):
                    operand = torch.tensor(operand, dtype=torch.float64)
                value = _ALL_FUNCTIONS[arg][0](operand)  # type: ignore[index]
            values[index] = value
            for slot in self._release[index]:
                values[slot] = None
        return [values[i] for i in self.outputs]  # type: ignore[misc]


def _size(node: Node) -> int:
    """Number of nodes in a tree, counting shared subtrees every time (for the doctest)."""
    return 1 + sum(_size(child) for child in node.children)
