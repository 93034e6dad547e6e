"""The curve-fit-shaped Moré–Garbow–Hillstrom least-squares problems as gradfit expressions.

J. J. Moré, B. S. Garbow, K. E. Hillstrom, "Testing unconstrained optimization software",
ACM TOMS 7(1), 1981, 17-41. Twelve of its problems are sums of squares of one formula over
data points, f_i(x) = g(t_i; x) - y_i: each is written here as an expression in one
independent variable ``x`` (the paper's t_i, u_i or i) with parameters ``x1..xn`` (the
paper's names), data ``x``, targets ``y`` and the paper's standard start ``x0``, so that
``gradfit.fit(problem.expression, problem.x, problem.y, p0=...)`` minimises Σ f_i². The
residual model(x_i) - y_i is ± the paper's f_i. Problems whose targets are 0 carry their
known terms in the expression (Box 3D, Brown–Dennis); Gulf R&D's data-dependent y_i is the
independent variable and t_i the target; Bard's w_i = min(i, 16 - i) is ``8 - abs(x - 8)``.

Sizes: Jennrich–Sampson m = 10, Gulf R&D m = 99 (the paper allows 3 <= m <= 100; at
m = 100, y_100 = 25 = x2* makes |y - x2| exactly 0 at the solution, where the x3 derivative
of |y - x2|**x3 is 0 * log 0), Box 3D m = 10, Brown–Dennis m = 20, Biggs EXP6 m = 13 (the
sizes at which the paper quotes its minima, and MINPACK-1's test size for Box 3D).

Starts: x0, 10·x0 and 100·x0 (the MGH / MINPACK-1 testing practice) for every problem but
one: Jennrich–Sampson from 100·x0 = (30, 40) has residuals of order e^400, whose squares
overflow float64 (gradfit stops there with "non_finite", SciPy with an infinite cost), so
that start is dropped: 35 starts in all. Gulf R&D's 10·x0 = (50, 25, 1.5) is its solution.

Known minima: ``f_paper`` is the minimum as the paper prints it (cut, not rounded, to six
digits: Meyer's 87.945855 is printed 87.9458); ``f_star`` is the same minimum to ten digits,
computed here with SciPy (``python tests/mgh.py`` prints SciPy's results from every start and
its best; tests/test_mgh.py checks that f_star is the paper's value and SciPy's best).
``other_minima`` lists the paper's other finite local minima (Biggs EXP6's 5.65565e-3
with m = 13, whose global minimum is 0 at (1, 10, 1, 5, 4, 3)) and ``at_infinity`` the
minima it gives at infinite parameters, as printed (Bard's 17.4286: the limit Σ(y - ȳ)² =
17.4286933; Kowalik–Osborne's 1.02734e-3), approached but never reached.

Every problem also has a NumPy ``residuals(p)`` in the paper's own form and sign, written
independently of the expression (tests compare the two), for SciPy; ``reference`` runs
MINPACK's LM (``scipy.optimize.least_squares(method="lm")``, finite-difference Jacobian,
i.e. MINPACK's lmdif) with tight tolerances from a start.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache

import numpy as np
from scipy.optimize import least_squares

#: ``sse <= f_star * (1 + REACH_RTOL) + REACH_ATOL`` counts as reaching ``f_star``.
#: The relative part: near a minimum the cost is quadratic in the parameters' error, so 1e-6
#: of f* means the fit is in the minimum's basin and has converged to ~1e-3 of its weakest
#: direction; it is far above the cost's rounding (~1e-13 relative) and far below the gaps
#: between the problems' distinct minima (Biggs 5.66e-3 vs 0, Kowalik–Osborne 1.03e-3 vs
#: 3.08e-4). The absolute part decides the zero-residual problems (Beale, Gulf, Box 3D,
#: Biggs from some starts): their starting sums of squares are 1e-1..1e3 and an LM fit
#: converging to a zero residual ends far below 1e-20 (residuals of 1e-10, parameters good
#: to ~1e-10), while any other stopping point is far above it.
REACH_RTOL = 1e-6
REACH_ATOL = 1e-20
FACTORS = (1.0, 10.0, 100.0)


@dataclass(frozen=True, eq=False)  # hashed by identity (for caches)
class Problem:
    """One MGH problem as data, an expression and its minima (see the module docstring)."""

    number: int  # the paper's number
    name: str
    expression: str  # in x; parameters x1..xn
    x: np.ndarray
    y: np.ndarray
    x0: tuple[float, ...]
    f_paper: float  # the minimum as the paper prints it
    f_star: float  # the same, to about ten digits (SciPy, see reference_minimum)
    residuals: Callable[[np.ndarray], np.ndarray] = field(repr=False)  # the paper's f_i
    factors: tuple[float, ...] = FACTORS  # starts: factor * x0
    other_minima: tuple[float, ...] = ()  # finite local minima above f_star
    at_infinity: tuple[float, ...] = ()  # minima at infinite parameters

    @property
    def params(self) -> tuple[str, ...]:
        return tuple(f"x{i + 1}" for i in range(len(self.x0)))

    @property
    def m(self) -> int:
        return len(self.y)

    def start(self, factor: float) -> dict[str, float]:
        """``factor * x0`` as ``{name: value}`` (gradfit's ``p0``)."""
        return {n: factor * v for n, v in zip(self.params, self.x0, strict=True)}

    def sse(self, p: np.ndarray) -> float:
        r = self.residuals(np.asarray(p, dtype=np.float64))
        return float(r @ r)

    def reaches(self, sse: float, minimum: float | None = None) -> bool:
        """Whether ``sse`` is at ``minimum`` (default ``f_star``) or below, within tolerance."""
        f = self.f_star if minimum is None else minimum
        return bool(sse <= f * (1 + REACH_RTOL) + REACH_ATOL)

    @property
    def finite_minima(self) -> tuple[float, ...]:
        return (self.f_star, *self.other_minima)


def _i(m: int) -> np.ndarray:
    return np.arange(1, m + 1, dtype=np.float64)


# (5) Beale: f_i = y_i - x1 (1 - x2^i), i = 1..3
_BEALE_Y = np.array([1.5, 2.25, 2.625])


def _beale(p: np.ndarray) -> np.ndarray:
    return _BEALE_Y - p[0] * (1 - p[1] ** _i(3))


# (6) Jennrich–Sampson: f_i = 2 + 2i - (e^{i x1} + e^{i x2})
def _jennrich(p: np.ndarray) -> np.ndarray:
    i = _i(10)
    return 2 + 2 * i - (np.exp(i * p[0]) + np.exp(i * p[1]))


# (8) Bard: f_i = y_i - (x1 + u_i / (v_i x2 + w_i x3)), u_i = i, v_i = 16 - i, w_i = min(u, v)
_BARD_Y = np.array(
    [0.14, 0.18, 0.22, 0.25, 0.29, 0.32, 0.35, 0.39, 0.37, 0.58, 0.73, 0.96, 1.34, 2.10, 4.39]
)


def _bard(p: np.ndarray) -> np.ndarray:
    u = _i(15)
    v = 16 - u
    w = np.minimum(u, v)
    return _BARD_Y - (p[0] + u / (v * p[1] + w * p[2]))


# (9) Gaussian: f_i = x1 exp(-x2 (t_i - x3)^2 / 2) - y_i, t_i = (8 - i) / 2
_GAUSSIAN_Y = np.array([
    0.0009, 0.0044, 0.0175, 0.0540, 0.1295, 0.2420, 0.3521, 0.3989,
    0.3521, 0.2420, 0.1295, 0.0540, 0.0175, 0.0044, 0.0009,
])  # fmt: skip
_GAUSSIAN_T = (8 - _i(15)) / 2


def _gaussian(p: np.ndarray) -> np.ndarray:
    t = _GAUSSIAN_T
    return p[0] * np.exp(-p[1] * (t - p[2]) ** 2 / 2) - _GAUSSIAN_Y


# (10) Meyer: f_i = x1 exp(x2 / (t_i + x3)) - y_i, t_i = 45 + 5i
_MEYER_Y = np.array([
    34780, 28610, 23650, 19630, 16370, 13720, 11540, 9744,
    8261, 7030, 6005, 5147, 4427, 3820, 3307, 2872,
], dtype=np.float64)  # fmt: skip
_MEYER_T = 45 + 5 * _i(16)


def _meyer(p: np.ndarray) -> np.ndarray:
    return p[0] * np.exp(p[1] / (_MEYER_T + p[2])) - _MEYER_Y


# (11) Gulf research and development: f_i = exp(-|y_i - x2|^x3 / x1) - t_i,
# t_i = i / 100, y_i = 25 + (-50 ln t_i)^(2/3)
_GULF_T = _i(99) / 100
_GULF_Y = 25 + (-50 * np.log(_GULF_T)) ** (2 / 3)


def _gulf(p: np.ndarray) -> np.ndarray:
    return np.exp(-(np.abs(_GULF_Y - p[1]) ** p[2]) / p[0]) - _GULF_T


# (12) Box three-dimensional: f_i = e^{-t_i x1} - e^{-t_i x2} - x3 (e^{-t_i} - e^{-10 t_i}),
# t_i = 0.1 i
_BOX_T = 0.1 * _i(10)


def _box(p: np.ndarray) -> np.ndarray:
    t = _BOX_T
    return np.exp(-t * p[0]) - np.exp(-t * p[1]) - p[2] * (np.exp(-t) - np.exp(-10 * t))


# (15) Kowalik–Osborne: f_i = y_i - x1 (u_i^2 + u_i x2) / (u_i^2 + u_i x3 + x4)
_KOWALIK_Y = np.array(
    [0.1957, 0.1947, 0.1735, 0.1600, 0.0844, 0.0627, 0.0456, 0.0342, 0.0323, 0.0235, 0.0246]
)
_KOWALIK_U = np.array([4, 2, 1, 0.5, 0.25, 0.167, 0.125, 0.1, 0.0833, 0.0714, 0.0625])


def _kowalik(p: np.ndarray) -> np.ndarray:
    u = _KOWALIK_U
    return _KOWALIK_Y - p[0] * (u**2 + u * p[1]) / (u**2 + u * p[2] + p[3])


# (16) Brown–Dennis: f_i = (x1 + t_i x2 - e^{t_i})^2 + (x3 + x4 sin t_i - cos t_i)^2, t_i = i/5
_BROWN_T = _i(20) / 5


def _brown_dennis(p: np.ndarray) -> np.ndarray:
    t = _BROWN_T
    return (p[0] + t * p[1] - np.exp(t)) ** 2 + (p[2] + p[3] * np.sin(t) - np.cos(t)) ** 2


# (17) Osborne 1: f_i = y_i - (x1 + x2 e^{-t_i x4} + x3 e^{-t_i x5}), t_i = 10 (i - 1)
_OSBORNE1_Y = np.array([
    0.844, 0.908, 0.932, 0.936, 0.925, 0.908, 0.881, 0.850, 0.818, 0.784, 0.751,
    0.718, 0.685, 0.658, 0.628, 0.603, 0.580, 0.558, 0.538, 0.522, 0.506, 0.490,
    0.478, 0.467, 0.457, 0.448, 0.438, 0.431, 0.424, 0.420, 0.414, 0.411, 0.406,
])  # fmt: skip
_OSBORNE1_T = 10 * (_i(33) - 1)


def _osborne1(p: np.ndarray) -> np.ndarray:
    t = _OSBORNE1_T
    return _OSBORNE1_Y - (p[0] + p[1] * np.exp(-t * p[3]) + p[2] * np.exp(-t * p[4]))


# (18) Biggs EXP6: f_i = x3 e^{-t_i x1} - x4 e^{-t_i x2} + x6 e^{-t_i x5} - y_i, t_i = 0.1 i,
# y_i = e^{-t_i} - 5 e^{-10 t_i} + 3 e^{-4 t_i}
_BIGGS_T = 0.1 * _i(13)
_BIGGS_Y = np.exp(-_BIGGS_T) - 5 * np.exp(-10 * _BIGGS_T) + 3 * np.exp(-4 * _BIGGS_T)


def _biggs(p: np.ndarray) -> np.ndarray:
    t = _BIGGS_T
    return p[2] * np.exp(-t * p[0]) - p[3] * np.exp(-t * p[1]) + p[5] * np.exp(-t * p[4]) - _BIGGS_Y


# (19) Osborne 2: f_i = y_i - (x1 e^{-t_i x5} + x2 e^{-(t_i - x9)^2 x6}
#                             + x3 e^{-(t_i - x10)^2 x7} + x4 e^{-(t_i - x11)^2 x8}),
# t_i = (i - 1) / 10
_OSBORNE2_Y = np.array([
    1.366, 1.191, 1.112, 1.013, 0.991, 0.885, 0.831, 0.847, 0.786, 0.725, 0.746, 0.679, 0.608,
    0.655, 0.616, 0.606, 0.602, 0.626, 0.651, 0.724, 0.649, 0.649, 0.694, 0.644, 0.624,
    0.661, 0.612, 0.558, 0.533, 0.495, 0.500, 0.423, 0.395, 0.375, 0.372, 0.391, 0.396,
    0.405, 0.428, 0.429, 0.523, 0.562, 0.607, 0.653, 0.672, 0.708, 0.633, 0.668, 0.645,
    0.632, 0.591, 0.559, 0.597, 0.625, 0.739, 0.710, 0.729, 0.720, 0.636, 0.581, 0.428,
    0.292, 0.162, 0.098, 0.054,
])  # fmt: skip
_OSBORNE2_T = (_i(65) - 1) / 10


def _osborne2(p: np.ndarray) -> np.ndarray:
    t = _OSBORNE2_T
    model = (
        p[0] * np.exp(-t * p[4])
        + p[1] * np.exp(-((t - p[8]) ** 2) * p[5])
        + p[2] * np.exp(-((t - p[9]) ** 2) * p[6])
        + p[3] * np.exp(-((t - p[10]) ** 2) * p[7])
    )
    return _OSBORNE2_Y - model


PROBLEMS: tuple[Problem, ...] = (
    Problem(
        5, "Beale", "x1*(1 - x2**x)", _i(3), _BEALE_Y, (1.0, 1.0),
        0.0, 0.0, _beale,
    ),
    Problem(
        6, "Jennrich-Sampson", "exp(x*x1) + exp(x*x2)", _i(10), 2 + 2 * _i(10), (0.3, 0.4),
        124.362, 124.3621824, _jennrich, factors=(1.0, 10.0),
    ),
    Problem(
        8, "Bard", "x1 + x/((16 - x)*x2 + (8 - abs(x - 8))*x3)", _i(15), _BARD_Y,
        (1.0, 1.0, 1.0), 8.21487e-3, 8.214877307e-3, _bard, at_infinity=(17.4286,),
    ),
    Problem(
        9, "Gaussian", "x1*exp(-x2*(x - x3)**2/2)", _GAUSSIAN_T, _GAUSSIAN_Y, (0.4, 1.0, 0.0),
        1.12793e-8, 1.127932770e-8, _gaussian,
    ),
    Problem(
        10, "Meyer", "x1*exp(x2/(x + x3))", _MEYER_T, _MEYER_Y, (0.02, 4000.0, 250.0),
        87.9458, 87.94585517, _meyer,
    ),
    Problem(
        11, "Gulf R&D", "exp(-abs(x - x2)**x3/x1)", _GULF_Y, _GULF_T, (5.0, 2.5, 0.15),
        0.0, 0.0, _gulf,
    ),
    Problem(
        12, "Box 3D", "exp(-x*x1) - exp(-x*x2) - x3*(exp(-x) - exp(-10*x))", _BOX_T,
        np.zeros(10), (0.0, 10.0, 20.0), 0.0, 0.0, _box,
    ),
    Problem(
        15, "Kowalik-Osborne", "x1*(x**2 + x*x2)/(x**2 + x*x3 + x4)", _KOWALIK_U, _KOWALIK_Y,
        (0.25, 0.39, 0.415, 0.39), 3.07505e-4, 3.075056038e-4, _kowalik,
        at_infinity=(1.02734e-3,),
    ),
    Problem(
        16, "Brown-Dennis", "(x1 + x*x2 - exp(x))**2 + (x3 + x4*sin(x) - cos(x))**2", _BROWN_T,
        np.zeros(20), (25.0, 5.0, -5.0, -1.0), 85822.2, 85822.20163, _brown_dennis,
    ),
    Problem(
        17, "Osborne 1", "x1 + x2*exp(-x*x4) + x3*exp(-x*x5)", _OSBORNE1_T, _OSBORNE1_Y,
        (0.5, 1.5, -1.0, 0.01, 0.02), 5.46489e-5, 5.464894697e-5, _osborne1,
    ),
    Problem(
        18, "Biggs EXP6", "x3*exp(-x*x1) - x4*exp(-x*x2) + x6*exp(-x*x5)", _BIGGS_T, _BIGGS_Y,
        (1.0, 2.0, 1.0, 1.0, 1.0, 1.0), 0.0, 0.0, _biggs, other_minima=(5.655649925e-3,),
    ),
    Problem(
        19, "Osborne 2",
        "x1*exp(-x*x5) + x2*exp(-(x - x9)**2*x6) + x3*exp(-(x - x10)**2*x7)"
        " + x4*exp(-(x - x11)**2*x8)",
        _OSBORNE2_T, _OSBORNE2_Y, (1.3, 0.65, 0.65, 0.7, 0.6, 3.0, 5.0, 7.0, 2.0, 4.5, 5.5),
        4.01377e-2, 4.013773629e-2, _osborne2,
    ),
)  # fmt: skip
#: every (problem, factor) start: 35
CASES: tuple[tuple[Problem, float], ...] = tuple((p, f) for p in PROBLEMS for f in p.factors)


def case_id(problem: Problem, factor: float) -> str:
    return f"{problem.name}-{factor:g}x0"


def by_name(name: str) -> Problem:
    return next(p for p in PROBLEMS if p.name == name)


def _tight(n: int) -> dict[str, float | int]:
    return {"xtol": 1e-15, "ftol": 1e-15, "gtol": 1e-15, "max_nfev": 2000 * (n + 1)}


def reference_fit(problem: Problem, start: float | np.ndarray) -> tuple[np.ndarray, float, int]:
    """SciPy's MINPACK LM from ``start`` (a factor of x0, or a vector): ``(p, sse, nfev)``.

    A start where the residuals overflow ends at once with an infinite SSE.
    """
    p0 = np.asarray(start * np.asarray(problem.x0) if np.isscalar(start) else start, float)
    with np.errstate(all="ignore"):
        if not np.isfinite(problem.sse(p0)):
            return p0, math.inf, 1
        fit = least_squares(problem.residuals, p0, method="lm", **_tight(len(p0)))
    sse = float(fit.fun @ fit.fun)
    return fit.x, sse if math.isfinite(sse) else math.inf, int(fit.nfev)


@cache
def reference(problem: Problem, start: float) -> tuple[float, int]:
    """SciPy's MINPACK LM (``least_squares(method="lm")``) from ``start`` * x0: (sse, nfev)."""
    _, sse, nfev = reference_fit(problem, start)
    return sse, nfev


def reference_minimum(problem: Problem) -> float:
    """The smallest SSE SciPy finds from the problem's starts (then polished once more)."""
    best = min((reference_fit(problem, f) for f in problem.factors), key=lambda r: r[1])
    return reference_fit(problem, best[0])[1]


if __name__ == "__main__":
    for problem in PROBLEMS:
        found = reference_minimum(problem)
        rows = [f"{case_id(problem, f)}: {reference(problem, f)[0]:.6e}" for f in problem.factors]
        print(f"{problem.name:18s} SciPy's best {found:.12e}  paper {problem.f_paper:g}  ")
        print("    " + "  ".join(rows))
