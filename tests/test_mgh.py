"""The Moré–Garbow–Hillstrom least-squares problems (tests/mgh.py) through ``gradfit.fit``.

Requirement: from each of the 35 standard starts (x0, 10·x0, 100·x0), ``gradfit.fit(...,
optimizer="lm")`` with default settings reaches the problem's known minimum wherever SciPy's
MINPACK LM (``least_squares(method="lm")``, run here from the same start) does, on both
Levenberg–Marquardt kernels (the compiled Numba one and the PyTorch one); a fit that ends at
a known minimum says "converged"; and a start SciPy improves on, gradfit improves on too.
"Reaches" is ``Problem.reaches``: within 1e-6 relative of f*, or below 1e-20 for zero
minima (see ``mgh.REACH_RTOL``). Cases a requirement does not apply to are skipped (SciPy
does not reach f* or leave the start; the fit ends at no known minimum). SciPy runs in this
module (cached per start); nothing of gradfit's output is stored.
"""

from __future__ import annotations

import math
from functools import cache

import numpy as np
import pytest
import torch
from mgh import CASES, PROBLEMS, REACH_ATOL, REACH_RTOL, Problem, by_name, case_id, reference

import gradfit as gf
from gradfit.optim import compiled_lm
from gradfit.optim.compiled import bridge as lm_compiled

pytestmark = pytest.mark.usefixtures("one_thread")
KERNELS = ("compiled", "torch")
CASE_PARAMS = [pytest.param(p, f, id=case_id(p, f)) for p, f in CASES]


def fit_on(kernel: str, problem: Problem, p0: dict[str, float]) -> gf.FitResult:
    """``gradfit.fit`` with default LM settings on the named kernel (checked, not assumed)."""
    if kernel == "compiled" and compiled_lm() is None:
        pytest.skip("the compiled kernel needs Numba")
    calls: list[int] = []
    original = lm_compiled.fit_curves
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(lm_compiled, "ENABLED", kernel == "compiled")
        patch.setattr(
            lm_compiled, "fit_curves", lambda *a, **k: calls.append(1) or original(*a, **k)
        )
        result = gf.fit(problem.expression, problem.x, problem.y, p0=p0, optimizer="lm")
    assert bool(calls) == (kernel == "compiled"), f"the {kernel} kernel did not run"
    return result


@cache
def fitted(problem: Problem, factor: float, kernel: str) -> gf.FitResult:
    return fit_on(kernel, problem, problem.start(factor))


def truncated(value: float, digits: int = 6) -> float:
    """``value`` cut (not rounded) to ``digits`` significant digits, as the paper prints."""
    if value == 0.0:
        return 0.0
    unit = 10.0 ** (math.floor(math.log10(value)) - digits + 1)
    return float(f"{math.floor(value / unit * (1 + 1e-12)) * unit:.{digits - 1}e}")


def describe(result: gf.FitResult) -> str:
    return f"SSE {result.chi2:.6e}, {result.status} after {result.n_iter} iterations"


SIZES = {  # name: (n, m)
    "Beale": (2, 3), "Jennrich-Sampson": (2, 10), "Bard": (3, 15), "Gaussian": (3, 15),
    "Meyer": (3, 16), "Gulf R&D": (3, 99), "Box 3D": (3, 10), "Kowalik-Osborne": (4, 11),
    "Brown-Dennis": (4, 20), "Osborne 1": (5, 33), "Biggs EXP6": (6, 13), "Osborne 2": (11, 65),
}  # fmt: skip


def test_the_papers_35_starts():
    assert {p.name: (len(p.x0), p.m) for p in PROBLEMS} == SIZES
    assert len(CASES) == 35
    assert by_name("Jennrich-Sampson").factors == (1.0, 10.0)  # 100·x0 overflows
    assert all(p.factors == (1.0, 10.0, 100.0) for p in PROBLEMS if p.name != "Jennrich-Sampson")


@pytest.mark.parametrize("problem", PROBLEMS, ids=lambda p: p.name)
def test_the_expression_is_the_papers_function(problem):
    """model(x_i) - y_i = ± f_i (the NumPy form, written separately) at every start."""
    model = gf.Model(problem.expression)
    assert sorted(model.param_names) == sorted(problem.params)
    assert len(problem.x) == len(problem.y) == problem.m >= len(problem.params)
    x = torch.from_numpy(problem.x)
    for factor in (*problem.factors, 0.37):
        p0 = problem.start(factor)
        p = torch.tensor([p0[n] for n in model.param_names], dtype=torch.float64)
        r = (model(x, p) - torch.from_numpy(problem.y)).numpy()
        f = problem.residuals(np.array([p0[n] for n in problem.params]))
        sign = 1.0 if np.allclose(r, f, rtol=1e-12, atol=1e-14) else -1.0
        np.testing.assert_allclose(sign * r, f, rtol=1e-12, atol=1e-14, err_msg=f"{factor}x0")


@pytest.mark.parametrize("problem", PROBLEMS, ids=lambda p: p.name)
def test_the_known_minimum(problem):
    """f* is the paper's value (printed cut to six digits: Meyer's 87.945855 as 87.9458),
    and SciPy's best fit from the starts finds it."""
    assert truncated(problem.f_star) == problem.f_paper
    best = min(reference(problem, f)[0] for f in problem.factors)
    assert problem.reaches(best)
    assert best >= problem.f_star * (1 - 1e-9), "a lower minimum than the paper's"


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize(("problem", "factor"), CASE_PARAMS)
def test_reaches_the_known_minimum_where_scipy_does(problem, factor, kernel):
    scipy_sse, nfev = reference(problem, factor)
    if not problem.reaches(scipy_sse):
        pytest.skip(f"SciPy's LM ends at {scipy_sse:.6e}, not f* = {problem.f_paper:g}")
    result = fitted(problem, factor, kernel)
    assert problem.reaches(result.chi2), (
        f"{describe(result)}; f* = {problem.f_star:.10g} (SciPy: {scipy_sse:.6e}, {nfev} "
        f"evaluations); {result.message}"
    )


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize(("problem", "factor"), CASE_PARAMS)
def test_a_fit_at_a_known_minimum_says_converged(problem, factor, kernel):
    result = fitted(problem, factor, kernel)
    sse = result.chi2
    at = [f for f in problem.finite_minima if abs(sse - f) <= f * REACH_RTOL + REACH_ATOL]
    if not at:
        pytest.skip(f"ends at SSE {sse:.6e}, no known minimum")
    assert result.status == "converged", f"at the minimum {at[0]:g}: {describe(result)}"


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize(("problem", "factor"), CASE_PARAMS)
def test_leaves_a_start_that_scipy_improves_on(problem, factor, kernel):
    """A start SciPy's LM improves on is not a stationary point: gradfit must improve on it
    too, not stop there (as by calling a Jacobian with a zero column "singular")."""
    start_sse = problem.sse(factor * np.asarray(problem.x0))
    scipy_sse, _ = reference(problem, factor)
    if not scipy_sse < start_sse * (1 - REACH_RTOL):
        pytest.skip(f"SciPy's LM does not improve on the start's SSE {start_sse:.6e}")
    result = fitted(problem, factor, kernel)
    assert result.chi2 < start_sse * (1 - REACH_RTOL), (
        f"{describe(result)}; the start's SSE: {start_sse:.6e}; SciPy: {scipy_sse:.6e}"
    )


@pytest.mark.parametrize("kernel", KERNELS)
def test_beale_next_to_its_singular_start_does_not_stop_there_converged(kernel):
    """At x0 = (1, 1) the x1 column of the Jacobian is 0 (x2**i = 1); 1e-12 away it is
    tiny but not 0, and the fit must either reach the minimum 0 (SciPy does, in 9
    evaluations) or not say it converged while the SSE is still the start's 14.203125."""
    beale = by_name("Beale")
    result = fit_on(kernel, beale, {"x1": 1.0, "x2": 1.0 + 1e-12})
    assert beale.reaches(result.chi2) or not result.converged, describe(result)
    assert REACH_ATOL < 1e-12 * 14.203125  # "reaches" cannot mean the start
