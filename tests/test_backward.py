"""The loop's ``backward`` equals ``loss.backward()``: same gradients, same errors."""

import pytest
import torch

from gradfit.optim.backward import backward


def _gradients(step, dtype):
    torch.manual_seed(0)
    x = torch.linspace(0, 1, 50, dtype=dtype)
    y = 3 * x**2 - x + torch.randn(50, dtype=dtype)
    params = torch.randn(3, dtype=dtype).requires_grad_()
    weight = torch.randn(2, 2, dtype=dtype).requires_grad_()
    loss = ((params[0] * x**2 + params[1] * x + params[2] - y) ** 2).mean() + weight.sin().sum()
    step(loss)
    return params.grad, weight.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_same_gradients_as_tensor_backward(dtype):
    ours = _gradients(backward, dtype)
    reference = _gradients(lambda loss: loss.backward(), dtype)
    for got, want in zip(ours, reference, strict=True):
        assert got.dtype == dtype
        assert torch.equal(got, want)


def test_gradients_accumulate_and_the_seed_stays_one():
    a = torch.tensor(2.0, requires_grad=True)
    b = torch.tensor(5.0, requires_grad=True)
    backward(a + b)  # the seed reaches the leaves untouched by any node
    a.grad.mul_(10)  # an in-place change of a .grad must not leak into later seeds
    backward(a * b)
    assert a.grad.item() == 10 + 5
    assert b.grad.item() == 1 + 2


def test_errors_match_tensor_backward():
    detached = torch.tensor(1.0)
    with pytest.raises(RuntimeError, match="does not require grad"):
        backward(detached)
    vector = torch.ones(3, requires_grad=True) * 2
    with pytest.raises(RuntimeError, match="grad can be implicitly created only for scalar"):
        backward(vector)  # not a scalar: torch's own path, with torch's own message


def test_graph_is_freed_as_by_tensor_backward():
    p = torch.ones(2, requires_grad=True)
    loss = (p.exp() * 3).sum()
    backward(loss)
    with pytest.raises(RuntimeError, match="second time"):
        backward(loss)
