"""The compiled kernel's tables follow their owners: ``model/expr.py`` (functions, operators),
``model/losses.py`` (robust losses) and ``model/parameters.py`` (bound transforms).

Numba needs code, so the compiled functions, rho and transforms are written out again in
``optim/compiled``; these tests fail when the two drift apart, or when the language or the
losses gain a member the compiled side neither supports nor names as unsupported.
"""

import math

import numpy as np
import pytest
import torch

import gradfit as gf
from gradfit.model import expr
from gradfit.model.expr import BinOp, Call, Neg, Num
from gradfit.model.losses import LOSSES, Loss, get_loss
from gradfit.model.models import as_model
from gradfit.model.parameters import ParameterSpace
from gradfit.model.program import Program
from gradfit.optim.compiled import bridge, interpreter, kernel
from gradfit.optim.problem import Problem


def assert_same(got, want, msg=""):
    """Equal to rounding, NaN where NaN, and zeros of the same sign (1/x tells them apart)."""
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    np.testing.assert_allclose(got, want, rtol=1e-14, atol=1e-300, equal_nan=True, err_msg=msg)
    zeros = want == 0
    np.testing.assert_array_equal(np.signbit(got[zeros]), np.signbit(want[zeros]), err_msg=msg)


# -- functions and operators (expr.FUNCTIONS, expr.OPERATORS)


def test_every_function_and_operator_of_the_language_is_compiled_or_named_not():
    compiled, skipped = set(interpreter.FUNCTIONS), interpreter.NOT_COMPILED
    assert compiled | skipped == set(expr.FUNCTIONS), "add it to interpreter.py or NOT_COMPILED"
    assert not compiled & skipped
    # no opcode left behind for a function the language no longer has
    assert set(interpreter.FUNCTION_OPCODES) <= set(expr.FUNCTIONS)
    assert set(interpreter.BINARY) == set(interpreter.OPERATOR_OPCODES) == set(expr.OPERATORS)
    opcodes = [
        *interpreter.FUNCTION_OPCODES.values(),
        *interpreter.OPERATOR_OPCODES.values(),
        *(interpreter.NUM, interpreter.X, interpreter.PARAM, interpreter.POW_NUM),
    ]
    assert len(set(opcodes)) == len(opcodes)


_U = [
    -math.inf, -1e3, -30.0, -3.0, -1.0 - 1e-12, -1.0, -0.7, -1e-9, -0.0, 0.0, 1e-300, 1e-9, 0.3,
    0.5, 1.0, 1.0 + 1e-12, 1.7, 3.0, 30.0, 700.0, 1e3, math.inf, math.nan,
]  # fmt: skip


@pytest.mark.parametrize("name", sorted(interpreter.FUNCTIONS))
def test_compiled_functions_equal_the_languages(name):
    op = interpreter.FUNCTIONS[name]
    got = np.array([interpreter._unary(op, u, 0.0) for u in _U])
    want = expr.FUNCTIONS[name].evaluate(torch.tensor(_U, dtype=torch.float64)).numpy()
    assert_same(got, want, name)


@pytest.mark.parametrize(
    "exponent", [2.0, 3.0, -1.0, -2.0, 0.0, 0.5, -0.5, 1.5, 1 / 3, -3.5, 64.0, 65.0]
)
def test_compiled_number_powers_equal_the_languages(exponent):
    got = np.array([interpreter._unary(interpreter.POW_NUM, u, exponent) for u in _U])
    want = expr.power(torch.tensor(_U, dtype=torch.float64), exponent).numpy()
    assert_same(got, want, f"**{exponent}")


@pytest.mark.parametrize("symbol", sorted(interpreter.BINARY))
def test_compiled_operators_equal_the_languages(symbol):
    u, v = np.meshgrid(_U, [-2.5, -2.0, -1.0, -0.0, 0.0, 0.5, 1.0, 3.0, 1e3, math.inf])
    op = interpreter.BINARY[symbol]
    got = np.array([interpreter._binary(op, a, b) for a, b in zip(u.flat, v.flat, strict=True)])
    want = expr.OPERATORS[symbol](torch.from_numpy(u.ravel()), torch.from_numpy(v.ravel()))
    assert_same(got, want.numpy(), symbol)


def _softplus_derivative(u, du):
    """d softplus(u) = du / (1 + exp(-u)), from the language's public nodes."""
    return BinOp("*", BinOp("/", Num(1.0), BinOp("+", Num(1.0), Call("exp", Neg(u)))), du)


def _problem(model, x, y, loss="mse"):
    space = ParameterSpace.build(model.param_names)
    return Problem(model, x, y, get_loss(loss), space)


def test_a_function_the_interpreter_lacks_fits_on_the_pytorch_kernel(monkeypatch):
    softplus = expr.Function(
        torch.nn.functional.softplus, lambda v: math.log1p(math.exp(v)), _softplus_derivative
    )
    monkeypatch.setitem(expr.FUNCTIONS, "softplus", softplus)
    text = "a*softplus(k*(x - c)) + d"
    model = as_model(text)
    x = torch.linspace(-3, 3, 60, dtype=torch.float64)
    truth = torch.tensor([2.0, 1.5, 0.5, -0.3], dtype=torch.float64)
    y = model(x, truth)
    for program in model.programs:
        assert interpreter.encode(program, "x", model.param_names) is None
    theta0 = torch.ones(1, 4, dtype=torch.float64)
    assert not bridge.supports(_problem(model, x, y), None, theta0)
    # the same model with a compiled function would take the compiled kernel
    compiled_twin = as_model(text.replace("softplus", "exp"))
    assert bridge.supports(_problem(compiled_twin, x, y), None, theta0)

    def not_called(*args, **kwargs):
        raise AssertionError("the compiled kernel cannot run softplus")

    monkeypatch.setattr(bridge, "fit_curves", not_called)
    p0 = {"a": 1.0, "k": 1.0, "c": 0.0, "d": 0.0}
    result = gf.fit(text, x.numpy(), y.numpy(), p0=p0)
    assert result.status == "converged"
    for name, value in zip(model.param_names, truth.tolist(), strict=True):
        assert result.params[name] == pytest.approx(value, rel=1e-7, abs=1e-9)
    many = gf.fit_batch(text, x.numpy(), torch.stack([y, 2 * y]).numpy(), p0=list(p0.values()))
    want = [truth.tolist(), [4.0, 1.5, 0.5, -0.6]]
    np.testing.assert_allclose(many.params.numpy(), want, rtol=1e-7, atol=1e-9)


def test_an_operator_or_function_dropped_from_the_interpreter_is_not_encoded(monkeypatch):
    model = as_model("a*exp(-k*x)**3/(1 + x)")
    roots = [model.expression.root]
    assert interpreter.encode(Program(roots, ("x",)), "x", model.param_names) is not None
    for table, name in ((interpreter.FUNCTIONS, "exp"), (interpreter.BINARY, "/")):
        with monkeypatch.context() as patch:
            patch.delitem(table, name)
            # a fresh Program: encode caches per program object
            assert interpreter.encode(Program(roots, ("x",)), "x", model.param_names) is None


# -- robust losses (losses.LOSSES)

_Z = [
    0.0, 1e-300, 1e-12, 1e-6, 0.25, 0.5, 1.0 - 1e-12, 1.0, 1.0 + 1e-12, 1.5, 2.0, 10.0, 1e3,
    1e6, 1e12, 1e100, 1e160, 1e300, math.inf, math.nan,
]  # fmt: skip


def _robust_names():
    """losses.py's losses of least-squares form that are not plain squares (rho(z) = z)."""
    z = torch.tensor([0.0, 0.5, 1.0, 2.0, 100.0], dtype=torch.float64)
    names = set()
    for name, loss in LOSSES.items():
        if loss.rho is None:
            continue
        rho, d1, d2 = loss.rho(z)
        plain = torch.equal(rho, z) and bool((d1 == 1).all()) and bool((d2 == 0).all())
        if not plain:
            names.add(name)
    return names


def _uncovered():
    """Robust losses the compiled kernel neither computes nor names as left out."""
    return _robust_names() - set(kernel.ROBUST_LOSSES) - bridge.NOT_COMPILED_LOSSES


def test_every_robust_loss_is_compiled_or_named_not():
    assert _uncovered() == set(), "add it to kernel.ROBUST_LOSSES or bridge.NOT_COMPILED_LOSSES"
    assert not set(kernel.ROBUST_LOSSES) & bridge.NOT_COMPILED_LOSSES
    assert set(kernel.ROBUST_LOSSES) <= _robust_names()  # no rho left for a dropped loss
    codes = list(kernel.ROBUST_LOSSES.values())
    assert len(set(codes)) == len(codes) and kernel.PLAIN not in codes


def test_a_new_robust_loss_is_caught_and_fits_on_the_pytorch_kernel(monkeypatch):
    def rho(z):  # a loss the kernel has never heard of
        t = 1 + z
        return 2 * (torch.sqrt(t) - 1), 1 / torch.sqrt(t), -0.5 / t**1.5

    monkeypatch.setitem(LOSSES, "new_one", Loss("new_one", rho))
    assert _uncovered() == {"new_one"}  # the drift test above would fail
    model = as_model("a*x + b")
    x = torch.linspace(0, 1, 20, dtype=torch.float64)
    problem = _problem(model, x, 2 * x + 1, loss="new_one")
    assert not bridge.supports(problem, rho, torch.ones(1, 2, dtype=torch.float64))


@pytest.mark.parametrize("name", sorted(kernel.ROBUST_LOSSES))
def test_compiled_rho_equals_the_torch_loss(name):
    code = kernel.ROBUST_LOSSES[name]
    got = np.array([kernel._rho(code, z) for z in _Z]).T
    want = [w.numpy() for w in LOSSES[name].rho(torch.tensor(_Z, dtype=torch.float64))]
    for order, (g, w) in enumerate(zip(got, want, strict=True)):
        assert_same(g, w, f"{name} rho^({order})")
    # and the kernel is handed that code for that loss
    model = as_model("a*x + b")
    x = torch.linspace(0, 1, 20, dtype=torch.float64)
    problem = _problem(model, x, 2 * x + 1, loss=name)
    assert bridge.supports(problem, LOSSES[name].rho, torch.ones(1, 2, dtype=torch.float64))
    assert bridge._ROBUST[LOSSES[name].rho] == code


# -- bound transforms (ParameterSpace.to_params)


def test_compiled_bound_transforms_equal_the_parameter_space():
    # every combination a ParameterSpace can hold: no bound, lower, upper, both; and fixed
    bounds = {"b": (-1.5, None), "c": (None, 2.0), "d": (-1.0, 3.0), "f": (0.0, None)}
    space = ParameterSpace.build(["a", "b", "c", "d", "e", "f"], bounds, {"e": 0.7})
    arrays = bridge._space_arrays(space)
    kinds = {kernel.NO_BOUND, kernel.LOWER, kernel.UPPER, kernel.BOTH}
    assert set(arrays[2].tolist()) == kinds
    grid = [-1e3, -10.0, -math.pi / 2, -1.0, -1e-8, 0.0, 1e-8, 0.3, 1.0, math.pi / 2, 2.0, 1e3]
    theta = torch.tensor(grid, dtype=torch.float64).unsqueeze(1).repeat(1, 5)
    theta.requires_grad_(True)
    want = space.to_params(theta)
    free = space.free
    (want_chain,) = torch.autograd.grad(want[:, free].sum(), theta)  # elementwise transforms
    params, chain = np.empty(len(space.names)), np.empty(len(free))
    for m, row in enumerate(theta.detach().numpy()):
        kernel._to_params(row.copy(), arrays, params, chain)
        np.testing.assert_allclose(params, want[m].detach().numpy(), rtol=1e-14, atol=1e-15)
        np.testing.assert_allclose(chain, want_chain[m].numpy(), rtol=1e-14, atol=1e-15)
        np.testing.assert_allclose(
            chain, space.derivative(theta[m].detach()).numpy(), rtol=1e-14, atol=1e-15
        )
