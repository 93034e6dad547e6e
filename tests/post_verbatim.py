"""The blog post's program, verbatim (plots removed), as the reference for `gradfit demo`.

Only the wrapping function, the seed and the epoch count are ours; every line inside the
post's functions is copied as written.
"""

import torch


def run_post(seed, epochs=15000):
    torch.manual_seed(seed)

    def generate_dataset(npts=100):
        x = torch.linspace(0, 1, npts)
        y = 20*x**2 + 5*x - 3
        y += torch.randn(npts)  # Add some noise
        return x, y

    x, y_true = generate_dataset()

    def f(x, params):
        a, b, c = params
        return a * (x**2) + b * x + c

    def mse(y_pred, y_true):
        """Returns the mean squared error between y_pred and y_true"""
        return ((y_pred - y_true)**2).mean()

    params = torch.randn(3).requires_grad_()
    initial = params.detach().clone()

    def apply_step():
        lr = 1e-3                                   # Set learning rate to 0.001
        y_pred = f(x, params)                       # Calculate the y given x and a set of parameters' values
        loss = mse(y_pred=y_pred, y_true=y_true)    # Calculate the loss between y_pred and y_true
        loss.backward()                             # Calculate the gradient of loss tensor w.r.t. graph leaves
        params.data -= lr * params.grad.data        # Update parameters' values using gradient descent
        params.grad = None                          # Zero grad since backward() accumulates by default gradient in leaves
        return y_pred, loss.item()                  # Return the y_pred, along with the loss as a standard Python number

    history = []
    for i in range(epochs):
        y_pred, loss = apply_step()
        history.append(loss)

    return x, y_true, initial, params.detach(), history
