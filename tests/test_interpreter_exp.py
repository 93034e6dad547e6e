"""The compiled interpreter's branch-free exp (it vectorises; libm's does not) is libm's to
1 ulp, with libm's zeros, infinities, NaN and subnormals."""

import numpy as np

from gradfit.optim.compiled import interpreter


def compiled_exp(values):
    registers = np.stack([values, np.empty_like(values)])  # row 0 in, row 1 out
    interpreter._unary_points(interpreter.EXP, registers, 0, 0.0, 1, len(values))
    out = registers[1]
    scalars = np.array([interpreter._unary(interpreter.EXP, v, 0.0) for v in values[:200]])
    np.testing.assert_array_equal(scalars, out[:200])  # one number or a point: the same exp
    return out


def test_exp_within_one_ulp_over_the_whole_range():
    rng = np.random.default_rng(0)
    values = np.concatenate(
        [rng.uniform(-708, 709.7, 50_000), rng.normal(0, 2, 50_000), rng.uniform(-1e-8, 1e-8, 1000)]
    )
    got, want = compiled_exp(values), np.exp(values)
    assert np.all(np.abs(got - want) <= np.spacing(want))


def test_exp_at_the_ends_of_its_domain():
    edges = np.array(
        [0.0, -0.0, 709.78, 709.79, 710.0, 1e4, np.inf, -np.inf, np.nan, -745.13, -745.2, -800.0,
         -708.5, -720.0, -740.0, 1e-300, -1e-300]
    )  # fmt: skip
    with np.errstate(over="ignore", under="ignore"):
        want = np.exp(edges)
    got = compiled_exp(edges)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    finite = ~np.isnan(want)
    # subnormal results (below 2.2e-308) may differ by one unit of the smallest subnormal
    np.testing.assert_allclose(got[finite], want[finite], rtol=2.3e-16, atol=5e-324)
    assert got[2] == want[2] and np.isinf(got[3]) and got[11] == 0.0
