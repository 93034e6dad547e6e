"""Straight-line programs compute what the expression trees compute.

The trees' own evaluation (``Node.evaluate``) is the reference: a program shares
subexpressions and regroups products, so it may differ from it by rounding only.
"""

from __future__ import annotations

import torch
from hypothesis import assume, given
from test_expr import _ENV, _HYPOTHESIS, _TREES, _parse_with_some_parameter

from gradfit.errors import ExpressionError
from gradfit.model.expr import parse_expression
from gradfit.model.program import VAR, Program


def _compare(text: str, env: dict[str, torch.Tensor]) -> None:
    expr = _parse_with_some_parameter(text)
    trees = [expr.root, *(expr.diff(n).root for n in expr.param_names)]
    program = Program(trees, expr.independent)
    for tree, got in zip(trees, program.run(env), strict=True):
        expected = torch.as_tensor(tree.evaluate(env), dtype=torch.float64)
        got = torch.as_tensor(got, dtype=torch.float64)
        expected, got = torch.broadcast_tensors(expected, got)
        # regrouping may turn an overflow into inf * 0 or similar: compare where both are finite
        finite = torch.isfinite(expected) & torch.isfinite(got)
        torch.testing.assert_close(got[finite], expected[finite], rtol=1e-9, atol=1e-12)
        assert torch.equal(torch.isnan(got) & torch.isfinite(expected), torch.zeros_like(finite))


@_HYPOTHESIS
@given(_TREES)
def test_random_trees_and_their_derivatives(tree):
    text, _ = tree
    try:
        _parse_with_some_parameter(text)
    except ExpressionError:
        assume(False)
        return
    _compare(text, {k: torch.tensor(v) for k, v in _ENV.items()})


def test_batched_parameters_broadcast_against_points():
    text = "amplitude*exp(-(x - center)**2/(2*width**2)) + offset"
    x = torch.linspace(-3, 3, 11, dtype=torch.float64)
    params = torch.tensor([[1.0, 0.1, 0.7, 0.2], [3.0, -1.0, 1.3, -0.5]], dtype=torch.float64)
    names = ("amplitude", "center", "width", "offset")
    env = {"x": x, **{n: params[:, i : i + 1] for i, n in enumerate(names)}}
    _compare(text, env)


def test_per_curve_factors_are_applied_once_per_point():
    # d/dwidth = amplitude*e*(4*(x-c)**2*w/(2*w**2)**2) with e = exp(-(x-c)**2/(2*w**2)):
    # per-curve factors multiply first, so 6 steps run over the points (10 with sharing alone)
    expr = parse_expression("amplitude*exp(-(x - center)**2/(2*width**2)) + offset")
    program = Program([expr.diff("width").root], ("x",))
    assert _point_wise_steps(program) == 6
    x = torch.linspace(-3, 3, 5, dtype=torch.float64)
    params = {"amplitude": 2.0, "center": 0.5, "width": 1.2, "offset": 0.0}
    env = {"x": x, **{k: torch.tensor([[v]], dtype=torch.float64) for k, v in params.items()}}
    (value,) = program.run(env)
    torch.testing.assert_close(value, expr.diff("width").evaluate(env), rtol=1e-13, atol=0)


def _point_wise_steps(program: Program) -> int:
    """Steps whose result depends on x, i.e. that run over every point."""
    varies: list[bool] = []
    for kind, arg, args in program._steps:
        varies.append(arg == "x" if kind == VAR else any(varies[i] for i in args))
    return sum(v and kind != VAR for v, (kind, _, _) in zip(varies, program._steps, strict=True))
