"""First-order steps with the model's symbolic gradient (no autograd tape) equal autograd's:
the loss and gradient at a point, and gradient descent over thousands of epochs."""

import numpy as np
import pytest
import torch

from gradfit.fitting import loop
from gradfit.model.losses import get_loss
from gradfit.model.models import Model, as_model
from gradfit.model.parameters import ParameterSpace
from gradfit.optim.first_order import Adam, GradientDescent, symbolic_loss
from gradfit.optim.problem import Problem

GAUSSIAN = "amplitude*exp(-(x - center)**2/(2*width**2)) + offset"
CASES = [  # expression, start, loss, with sigma, bounds, fixed
    ("a*x**2 + b*x + c", [0.3, -0.2, 0.1], "mse", False, None, None),
    (GAUSSIAN, [2.0, 0.3, 1.1, 0.1], "mse", False, None, None),
    ("a*exp(-k*x) + c", [1.5, 0.7, 0.2], "chi2", True, None, None),
    ("a*exp(-k*x) + c", [1.5, 0.7, 0.2], "sse", False, None, {"c": 0.25}),
    ("a*sin(w*x) + 0*x", [1.0, 1.1], "mse", True, None, None),
    ("a*exp(-k*x) + c", [1.5, 0.7, 0.2], "mse", False, {"k": (0.1, 3.0)}, None),  # PyTorch rows
]


def problem_for(expression, loss, with_sigma, bounds, fixed, dtype=torch.float64, seed=0):
    rng = np.random.default_rng(seed)
    model = as_model(expression)
    x = torch.linspace(0, 3, 60, dtype=dtype)
    y = torch.from_numpy(np.sin(x.double().numpy()) + 1 + rng.normal(0, 0.1, 60)).to(dtype)
    sigma = torch.from_numpy(rng.uniform(0.5, 2, 60)).to(dtype) if with_sigma else None
    space = ParameterSpace.build(model.param_names, bounds, fixed)
    return Problem(model, x, y, get_loss(loss).with_options(sigma=sigma), space)


def autograd_step(problem, theta):
    loss = problem.objective(theta)
    loss.backward()
    return loss


def start_theta(problem, start, dtype=torch.float64):
    params = torch.tensor(start, dtype=dtype)
    return problem.space.to_theta(params[None])[0].clone().requires_grad_()


@pytest.mark.parametrize("compiled", ["1", "0"])
@pytest.mark.parametrize(("expression", "start", "loss", "with_sigma", "bounds", "fixed"), CASES)
def test_loss_and_gradient_equal_autograds(
    monkeypatch, compiled, expression, start, loss, with_sigma, bounds, fixed
):
    monkeypatch.setenv("GRADFIT_COMPILED", compiled)
    problem = problem_for(expression, loss, with_sigma, bounds, fixed)
    step = symbolic_loss(problem)
    assert step is not None
    for scale in (1.0, 0.8, 1.3):
        theta = (start_theta(problem, start).detach() * scale).requires_grad_()
        reference = theta.detach().clone().requires_grad_()
        want = autograd_step(problem, reference)
        got = step(theta)
        assert float(got) == pytest.approx(want.item(), rel=1e-13)
        np.testing.assert_allclose(
            theta.grad.numpy(), reference.grad.numpy(), rtol=1e-12, atol=1e-14
        )
        step(theta)  # backward() accumulates: so does the symbolic step
        np.testing.assert_allclose(theta.grad.numpy(), 2 * reference.grad.numpy(), rtol=1e-12)


@pytest.mark.parametrize("compiled", ["1", "0"])
@pytest.mark.parametrize("optimizer", [GradientDescent(lr=1e-2), Adam(lr=1e-2)])
@pytest.mark.parametrize("case", [CASES[1], CASES[2]])
def test_thousands_of_epochs_end_where_autograds_do(monkeypatch, compiled, optimizer, case):
    monkeypatch.setenv("GRADFIT_COMPILED", compiled)
    expression, start, loss, with_sigma, bounds, fixed = case
    problem = problem_for(expression, loss, with_sigma, bounds, fixed)
    step = symbolic_loss(problem)
    assert step is not None
    thetas, histories = [], []
    for evaluate in (step, None):
        theta = start_theta(problem, start)
        state = optimizer.init(theta)
        history = []
        for _ in range(1500):  # the loop's step: loss (and grad), update, zero the grad
            if evaluate is None:
                value = loop.apply_step(problem, theta, optimizer, state)
            else:
                value = evaluate(theta)
                optimizer.update(theta, theta.grad, state)
                theta.grad = None
            history.append(value.item())
        thetas.append(theta.detach().numpy().copy())
        histories.append(history)
    np.testing.assert_allclose(thetas[0], thetas[1], rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(histories[0], histories[1], rtol=1e-12)
    assert histories[0][-1] < histories[0][0]  # it did descend


def test_float32_follows_autograd_to_float32_rounding():
    problem = problem_for("a*x**2 + b*x + c", "mse", False, None, None, dtype=torch.float32)
    step = symbolic_loss(problem)
    assert step is not None
    theta = torch.tensor([0.3, -0.2, 0.1], requires_grad=True)
    reference = theta.detach().clone().requires_grad_()
    want = autograd_step(problem, reference)
    got = step(theta)
    assert got.dtype == theta.grad.dtype == torch.float32
    assert float(got) == pytest.approx(want.item(), rel=1e-6)
    np.testing.assert_allclose(theta.grad.numpy(), reference.grad.numpy(), rtol=1e-5, atol=1e-6)


def test_no_symbolic_gradient_for_functions_and_other_losses():
    x = torch.linspace(0, 1, 10, dtype=torch.float64)

    def post_f(x, params):  # the post's model: a function, so the demo keeps autograd
        a, b, c = params
        return a * (x**2) + b * x + c

    space = ParameterSpace.build(("a", "b", "c"), None, None)
    function_model = Model(post_f, params=["a", "b", "c"])
    assert symbolic_loss(Problem(function_model, x, x, get_loss("mse"), space)) is None
    expression = as_model("a*x**2 + b*x + c")
    for loss in ("mae", "huber", lambda p, t: ((p - t) ** 4).mean()):
        assert symbolic_loss(Problem(expression, x, x, get_loss(loss), space)) is None
