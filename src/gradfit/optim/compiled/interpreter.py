"""An expression :class:`~gradfit.program.Program` as arrays, and its evaluator in Numba.

The compiled LM kernel (``lm_compiled``) fits one curve after another inside one native
loop, so it cannot call back into PyTorch. It interprets the same straight-line program the
PyTorch path runs: one opcode per step, applied to all of a curve's points in a tight loop
(the dispatch costs once per step, not per point). Nothing is generated or executed from the
user's text: the program is data, and the interpreter is fixed code compiled (and cached on
disk) once per installation.

Steps are evaluated at three rates: once per curve (functions of x alone, such as ``x**2``),
once per evaluation as one number (functions of the parameters alone), and once per
evaluation over the points.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, TypedDict, cast

import numba
import numpy as np
from llvmlite import ir  # type: ignore[import-untyped]
from numba import types
from numba.extending import intrinsic

from gradfit.model import expr
from gradfit.model.program import BIN as BIN_STEP
from gradfit.model.program import CALL as CALL_STEP
from gradfit.model.program import NUM as NUM_STEP
from gradfit.model.program import POW_NUM as POW_NUM_STEP
from gradfit.model.program import VAR as VAR_STEP
from gradfit.model.program import Program

# Opcodes. Their numbers are this file's own (Numba's disk cache is keyed on this file's
# text: numbers taken from another module could go stale in compiled code); the tables below
# map the expression language's names to them.
NUM, X, PARAM, POW_NUM, ADD, SUB, MUL, DIV, POW = range(9)
EXP, LOG, LOG10, SQRT, SIN, COS, TAN, ARCSIN, ARCCOS, ARCTAN = range(16, 26)
SINH, COSH, TANH, ABS, ERF, SIGN = range(26, 32)
#: what ``_binary`` and ``_unary`` compute, by ``expr.OPERATORS``'s and ``expr.FUNCTIONS``'s names
OPERATOR_OPCODES = {"+": ADD, "-": SUB, "*": MUL, "/": DIV, "**": POW}
FUNCTION_OPCODES = {
    "exp": EXP, "log": LOG, "log10": LOG10, "sqrt": SQRT, "sin": SIN, "cos": COS, "tan": TAN,
    "arcsin": ARCSIN, "arccos": ARCCOS, "arctan": ARCTAN, "sinh": SINH, "cosh": COSH,
    "tanh": TANH, "abs": ABS, "erf": ERF, "sign": SIGN,
}  # fmt: skip
#: the language's operators and functions the interpreter compiles (built once, at import,
#: from ``expr``'s tables); a program using any other is not encoded (``encode`` gives None)
#: and its fit takes the PyTorch kernel
BINARY = {op: OPERATOR_OPCODES[op] for op in expr.OPERATORS if op in OPERATOR_OPCODES}
FUNCTIONS = {name: FUNCTION_OPCODES[name] for name in expr.FUNCTIONS if name in FUNCTION_OPCODES}
#: functions of ``expr.FUNCTIONS`` left to the PyTorch kernel on purpose: a test checks that
#: each of the language's functions is compiled or named here
NOT_COMPILED: frozenset[str] = frozenset()
# evaluation rates
SCALAR, PER_CURVE, PER_POINT = range(3)


@dataclass(frozen=True)
class Code:
    """A program as arrays: step s computes ``op[s]`` of slots ``a[s]``, ``b[s]`` or ``c[s]``."""

    op: np.ndarray  # int64 opcodes
    a: np.ndarray  # int64 first operand slot (PARAM: parameter index)
    b: np.ndarray  # int64 second operand slot
    c: np.ndarray  # float64 constant or exponent
    rate: np.ndarray  # int64 SCALAR, PER_CURVE or PER_POINT
    outputs: np.ndarray  # int64 slots of the program's roots

    @property
    def arrays(self) -> tuple[np.ndarray, ...]:
        """``(op, a, b, c, rate, outputs)``: the form the compiled functions take."""
        return self.op, self.a, self.b, self.c, self.rate, self.outputs


@functools.lru_cache(maxsize=512)  # programs are shared per expression (models._compile)
def encode(program: Program, independent: str, params: tuple[str, ...]) -> Code | None:
    """``program`` as a :class:`Code`, or None if it uses a name the kernel cannot bind or
    an operator or function it does not implement (the fit then takes the PyTorch kernel)."""
    n = program.n_steps
    op, a, b = (np.zeros(n, dtype=np.int64) for _ in range(3))
    c, rate = np.zeros(n, dtype=np.float64), np.zeros(n, dtype=np.int64)
    uses_params = np.zeros(n, dtype=bool)
    for s, (kind, arg, args) in enumerate(program.steps):
        if len(args) > 0:
            a[s] = args[0]
        if len(args) > 1:
            b[s] = args[1]
        if kind == NUM_STEP:
            op[s], c[s] = NUM, float(arg)  # type: ignore[arg-type]
        elif kind == VAR_STEP and arg == independent:
            op[s], rate[s] = X, PER_CURVE
        elif kind == VAR_STEP and arg in params:
            op[s], a[s], uses_params[s] = PARAM, params.index(arg), True
        elif kind == VAR_STEP:
            return None  # another independent variable or a constant name
        elif kind == POW_NUM_STEP:
            op[s], c[s] = POW_NUM, float(arg)  # type: ignore[arg-type]
        elif kind == BIN_STEP and arg in BINARY:
            op[s] = BINARY[arg]
        elif kind == CALL_STEP and arg in FUNCTIONS:
            op[s] = FUNCTIONS[arg]
        else:  # an operator or function the interpreter does not implement
            return None
        if kind in (POW_NUM_STEP, BIN_STEP, CALL_STEP):
            operands = args
            uses_params[s] = any(uses_params[i] for i in operands)
            varies = any(rate[i] != SCALAR for i in operands)
            if varies:
                rate[s] = PER_POINT if uses_params[s] else PER_CURVE
    return Code(op, a, b, c, rate, np.asarray(program.outputs, dtype=np.int64))


class JitOptions(TypedDict):
    """The keywords every ``numba.njit`` of the kernel takes (typed, so that njit's overloads
    match and the compiled functions keep their signatures for the type checker)."""

    cache: bool
    nogil: bool
    error_model: Literal["numpy"]
    fastmath: set[str]


# cached on disk; no GIL (fit_batch runs chunks in threads); x/0 gives inf, as in torch;
# reassociation and FMA let LLVM vectorise the sums (not nnan/ninf: NaN and inf keep meaning)
JIT: JitOptions = {
    "cache": True,
    "nogil": True,
    "error_model": "numpy",
    "fastmath": {"reassoc", "contract"},
}
# Functions that allocate nothing are compiled without Numba's reference counting: its atomic
# increments, on every array passed in a tuple, unpacked or sliced, took a third of a Gaussian
# fit's time. Their arrays belong to the caller, who holds them for the whole call; they must
# not return an array to a reference-counted caller (it would release a reference it was
# never given).
# (``_nrt`` is Numba's own option, not in its typed signature: hence the cast)
NO_REFCOUNT = cast(JitOptions, {**JIT, "_nrt": False})


# exp's range reduction (Cody–Waite: k·LN2_HI is exact for |k| < 2^11) and its domain
_INV_LN2 = 1.4426950408889634
_LN2_HI = 6.93147180369123816490e-01
_LN2_LO = 1.90821492927058770002e-10


@intrinsic
def _as_float(typingctx, bits):
    """The float64 whose bits are the int64 ``bits`` (a register move, vectorisable)."""
    signature = types.float64(types.int64)

    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], ir.DoubleType())

    return signature, codegen


# the intrinsic as the type checker should see it (the same object: Numba reads it by value)
_bits_float = cast(Callable[[np.int64], float], _as_float)


@numba.njit(inline="always", **NO_REFCOUNT)
def _exp(x: float) -> float:
    """exp(x) to 1 ulp without a branch, so that a loop over points vectorises (libm's exp
    is a call per point: 4x slower here, and the Gaussian's fits spend most time in it).

    x = k ln2 + r with |r| <= ln2/2; e^r by its Taylor series to r^13 (remainder below
    eps/30); 2^k as two factors 2^(k//2)·2^(k - k//2) so that subnormal results and k = 1024
    need no special case. Outside [-746, 710] the result is 0 or inf; NaN stays NaN.
    """
    xc = min(max(x, -746.0), 710.0)
    kf = math.floor(xc * _INV_LN2 + 0.5)
    r = (xc - kf * _LN2_HI) - kf * _LN2_LO
    p = 1 / 6227020800
    for c in (1 / 479001600, 1 / 39916800, 1 / 3628800, 1 / 362880, 1 / 40320, 1 / 5040,
              1 / 720, 1 / 120, 1 / 24, 1 / 6, 1 / 2, 1.0, 1.0):  # fmt: skip
        p = p * r + c
    k = np.int64(kf)
    half = k >> 1
    value: float = p * _bits_float((half + 1023) << 52) * _bits_float((k - half + 1023) << 52)
    return value if x == x else x


@numba.njit(**NO_REFCOUNT)
def _int_power(u: float, n: int) -> float:
    """u**n by repeated squaring: exact for negative bases, as torch's integer power."""
    k = abs(n)
    result, base = 1.0, u
    while k > 0:
        if k & 1:
            result *= base
        base *= base
        k >>= 1
    return 1.0 / result if n < 0 else result


@numba.njit(**NO_REFCOUNT)
def _unary(op: int, u: float, c: float) -> float:
    if op == POW_NUM:
        if c == 2.0:
            return u * u
        if c == math.floor(c) and abs(c) <= 64:
            return _int_power(u, int(c))
        if c == 0.5 or c == -0.5:  # torch takes sqrt and rsqrt here (-inf: NaN; -0.0: -0.0)
            root = math.sqrt(u) if u >= 0 else math.nan
            return root if c > 0 else 1.0 / root
        return u**c  # type: ignore[no-any-return]  # typeshed: float ** float may be complex
    if op == EXP:
        return _exp(u)
    if op == LOG:
        return math.log(u) if u > 0 else (-math.inf if u == 0 else math.nan)
    if op == LOG10:
        return math.log10(u) if u > 0 else (-math.inf if u == 0 else math.nan)
    if op == SQRT:
        return math.sqrt(u) if u >= 0 else math.nan
    if op == SIN:
        return math.sin(u)
    if op == COS:
        return math.cos(u)
    if op == TAN:
        return math.tan(u)
    if op == ARCSIN:
        return math.asin(u) if abs(u) <= 1 else math.nan
    if op == ARCCOS:
        return math.acos(u) if abs(u) <= 1 else math.nan
    if op == ARCTAN:
        return math.atan(u)
    if op == SINH:
        return math.sinh(u)
    if op == COSH:
        return math.cosh(u)
    if op == TANH:
        return math.tanh(u)
    if op == ABS:
        return abs(u)
    if op == ERF:
        return math.erf(u)
    if op == SIGN:
        return 1.0 if u > 0 else (-1.0 if u < 0 else 0.0)  # as torch: 0 for ±0 and NaN
    return math.nan  # pragma: no cover - encode emits no other opcode


@numba.njit(**NO_REFCOUNT)
def _binary(op: int, u: float, v: float) -> float:
    if op == MUL:
        return u * v
    if op == ADD:
        return u + v
    if op == SUB:
        return u - v
    if op == DIV:
        return u / v
    return u**v  # type: ignore[no-any-return]  # typeshed: float ** float may be complex


@numba.njit(**NO_REFCOUNT)
def run(code, rate, x, n, params, regs):
    """Evaluate ``code``'s steps of ``rate`` (PER_CURVE: with x; PER_POINT: with ``params``).

    ``regs = (scalars (S,), points (S, N))`` are the registers: per-curve steps stay in them
    between evaluations. ``n`` of the N columns are used.
    """
    code_op, code_a, code_b, code_c, code_rate = code[0], code[1], code[2], code[3], code[4]
    scalars, points = regs
    for s in range(code_op.shape[0]):
        r = code_rate[s]
        op = code_op[s]
        if r == SCALAR:  # one number: cheap enough to refresh in every pass
            if op == NUM:
                scalars[s] = code_c[s]
            elif op == PARAM:
                scalars[s] = params[code_a[s]]
            elif op >= ADD and op <= POW:
                scalars[s] = _binary(op, scalars[code_a[s]], scalars[code_b[s]])
            else:
                scalars[s] = _unary(op, scalars[code_a[s]], code_c[s])
            continue
        if r != rate:
            continue
        if op == X:
            for i in range(n):
                points[s, i] = x[i]
        elif op >= ADD and op <= POW:
            ia, ib = code_a[s], code_b[s]
            if code_rate[ia] != SCALAR and code_rate[ib] != SCALAR:
                _binary_points(op, points, ia, ib, s, n)
            elif code_rate[ia] != SCALAR:
                _binary_scalar(op, points, ia, scalars[ib], s, n, False)
            else:
                _binary_scalar(op, points, ib, scalars[ia], s, n, True)
        else:
            _unary_points(op, points, code_a[s], code_c[s], s, n)


# One loop per operation (not one branch per point): the loops vectorise.
@numba.njit(**NO_REFCOUNT)
def _binary_points(op, p, a, b, s, n):
    """Row s of the registers ``p`` = row a ``op`` row b."""
    if op == MUL:
        for i in range(n):
            p[s, i] = p[a, i] * p[b, i]
    elif op == ADD:
        for i in range(n):
            p[s, i] = p[a, i] + p[b, i]
    elif op == SUB:
        for i in range(n):
            p[s, i] = p[a, i] - p[b, i]
    elif op == DIV:
        for i in range(n):
            p[s, i] = p[a, i] / p[b, i]
    else:
        for i in range(n):
            p[s, i] = p[a, i] ** p[b, i]


@numba.njit(**NO_REFCOUNT)
def _binary_scalar(op, p, a, w, s, n, swapped):
    """Row s of ``p`` = row a ``op`` w for a number w; w ``op`` row a if ``swapped``."""
    if op == MUL:
        for i in range(n):
            p[s, i] = p[a, i] * w
    elif op == ADD:
        for i in range(n):
            p[s, i] = p[a, i] + w
    elif op == SUB and swapped:
        for i in range(n):
            p[s, i] = w - p[a, i]
    elif op == SUB:
        for i in range(n):
            p[s, i] = p[a, i] - w
    elif op == DIV and swapped:
        for i in range(n):
            p[s, i] = w / p[a, i]
    elif op == DIV:
        for i in range(n):
            p[s, i] = p[a, i] / w
    else:
        for i in range(n):
            p[s, i] = _binary(op, w, p[a, i]) if swapped else _binary(op, p[a, i], w)


@numba.njit(**NO_REFCOUNT)
def _unary_points(op, p, a, c, s, n):
    if op == POW_NUM and c == 2.0:
        for i in range(n):
            p[s, i] = p[a, i] * p[a, i]
    elif op == EXP:
        for i in range(n):
            p[s, i] = _exp(p[a, i])
    else:
        for i in range(n):
            p[s, i] = _unary(op, p[a, i], c)
