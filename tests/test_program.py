"""Straight-line programs compute what the expression trees compute.

The trees' own evaluation (``Node.evaluate``) is the reference: a program shares
subexpressions and regroups products, so it may differ from it by rounding only.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import assume, given
from test_expr import _ENV, _HYPOTHESIS, _TREES, _parse_with_some_parameter

from gradfit.errors import ExpressionError
from gradfit.expr import _FUNCTIONS, parse_expression
from gradfit.program import _VAR, Program


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
        varies.append(arg == "x" if kind == _VAR else any(varies[i] for i in args))
    return sum(v and kind != _VAR for v, (kind, _, _) in zip(varies, program._steps, strict=True))


def _run_into_rows(program: Program, env: dict, shape: tuple[int, int]) -> list[torch.Tensor]:
    """Each root written into a row of one [K, R, N] block, as the LM kernel's rows are."""
    block = torch.full((shape[0], len(program.outputs), shape[1]), -7.0, dtype=torch.float64)
    rows = list(block.unbind(1))
    program.run(env, out=rows)
    return rows


@_HYPOTHESIS
@given(_TREES)
def test_writing_roots_into_given_tensors_changes_no_value(tree):
    text, _ = tree
    try:
        expr = _parse_with_some_parameter(text)
    except ExpressionError:
        assume(False)
        return
    trees = [expr.root, *(expr.diff(n).root for n in expr.param_names)]
    program = Program(trees, expr.independent)
    K, N = 3, 9
    env = {k: torch.tensor(v) for k, v in _ENV.items()}
    for i, name in enumerate(expr.param_names):  # per-curve parameters, [K, 1]
        env[name] = env[name][:K].unsqueeze(-1) + i
    plain = [torch.as_tensor(v, dtype=torch.float64) for v in program.run(env)]
    written = _run_into_rows(program, env, (K, N))
    for want, got in zip(plain, written, strict=True):
        torch.testing.assert_close(got, want.expand(K, N), rtol=0, atol=0, equal_nan=True)


def test_roots_are_computed_in_place_not_copied():
    expr = parse_expression("amplitude*exp(-(x - center)**2/(2*width**2)) + offset")
    roots = [expr.root, *(expr.diff(n).root for n in expr.param_names)]
    program = Program(roots, ("x",))
    x = torch.linspace(-3, 3, 7, dtype=torch.float64)
    env = {"x": x, **{n: torch.rand(4, 1, dtype=torch.float64) + 0.5 for n in expr.param_names}}
    block = torch.empty(4, len(roots), 7, dtype=torch.float64)
    rows = list(block.unbind(1))
    values = program.run(env, out=rows)
    # f and the derivatives in amplitude, center and width are steps over the points: each
    # wrote its own row; d/d offset = 1 is a number, filled in
    assert [v is r for v, r in zip(values, rows, strict=True)] == [True, True, True, True, False]
    assert values[4] == 1.0 and bool((block[:, 4] == 1.0).all())


@pytest.mark.parametrize("name", sorted(_FUNCTIONS))
def test_every_function_writes_into_given_tensors(name):
    expr = parse_expression(f"{name}(a*x) + b")
    program = Program([expr.root, *(expr.diff(n).root for n in expr.param_names)], ("x",))
    x = torch.linspace(0.1, 0.9, 9, dtype=torch.float64)
    env = {"x": x, "a": torch.tensor([[0.5], [0.9]], dtype=torch.float64), "b": 1.0}
    plain = [torch.as_tensor(v, dtype=torch.float64) for v in program.run(env)]
    written = _run_into_rows(program, env, (2, 9))
    for want, got in zip(plain, written, strict=True):
        torch.testing.assert_close(got, want.expand(2, 9), rtol=0, atol=0, equal_nan=True)
