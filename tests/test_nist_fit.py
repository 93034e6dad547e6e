"""All 27 NIST StRD nonlinear problems, both starts, through `gradfit.fit(optimizer="lm")`.

Agreement is NIST's log relative error (matching significant digits) against the certified
values: at least 6 for parameters and 4 for standard deviations. Lanczos1's certified
residual sum of squares (~1.4e-25) is below what float64 residuals resolve, so its standard
deviations are not comparable (see the data's README).
"""

import numpy as np
import pytest
from nist import NAMES, load, lre

import gradfit as gf


@pytest.mark.parametrize("start", ["start1", "start2"])
@pytest.mark.parametrize("name", NAMES)
def test_nist_certified_values(name, start):
    problem = load(name)
    names = [f"b{i + 1}" for i in range(problem.n_params)]
    model = gf.Model(problem.model, independent=problem.independent, params=names)
    x = problem.x if len(problem.independent) > 1 else problem.x[problem.independent[0]]
    result = gf.fit(model, x, problem.y, p0=getattr(problem, start), optimizer="lm")
    values = np.array([result.params[n] for n in names])
    digits = lre(values, problem.certified)
    assert digits.min() >= 6, f"{name} {start}: parameter LRE {digits.round(1)}; {result.message}"
    assert result.chi2 == pytest.approx(problem.rss, rel=1e-6)
    # n - P; (Rat43's header says 9 degrees of freedom for 15 points and 4 parameters)
    assert result.dof == len(problem.y) - problem.n_params
    if name != "Lanczos1":
        stderr = np.array([result.stderr[n] for n in names])
        digits = lre(stderr, problem.certified_stderr)
        assert digits.min() >= 4, f"{name} {start}: stderr LRE {digits.round(1)}"
