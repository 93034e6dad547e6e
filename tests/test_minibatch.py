"""Mini-batch epochs against hand-written reference loops over the same batches (torch.optim
for the update), validation and patience, and mid-epoch checkpoints resumed bit for bit."""

import math

import pytest
import torch
from torch import nn

import gradfit as gf
from gradfit.errors import OptionError
from gradfit.fitting.checkpoint import read_checkpoint
from gradfit.optim.status import FAILED, STATUSES

QUADRATIC = "a*x**2 + b*x + c"
P0 = [1.0, 1.0, 1.0]


def data(seed=0, n=100):
    x, y = gf.datasets.quadratic(seed=seed)
    return x.double()[:n], y.double()[:n]


def reference(x, y, *, batch_size, epochs, seed, make_opt, shuffle=True, val=None, theta=None):
    """The documented order (fitting/minibatch.py), written out: a generator of its own,
    ``randperm`` per epoch, ``split(batch_size)``; torch.optim's update; the history is the
    size-weighted mean of the batch losses. Returns (params, history, validation losses)."""
    gen = torch.Generator().manual_seed(seed)
    if val is not None:  # a fraction: the first round(f n) of a permutation are held out
        perm = torch.randperm(len(y), generator=gen)
        held = max(1, round(val * len(y)))
        xv, yv = x[perm[:held].sort().values], y[perm[:held].sort().values]
        keep = perm[held:].sort().values
        x, y = x[keep], y[keep]
    theta = torch.tensor(P0, dtype=torch.float64) if theta is None else theta
    theta = theta.clone().requires_grad_()
    opt = make_opt([theta])

    def f(t, xs):
        return t[0] * xs**2 + t[1] * xs + t[2]

    history, validation, kept = [], [], []
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=gen) if shuffle else torch.arange(len(y))
        total = 0.0
        for idx in order.split(batch_size):
            loss = ((f(theta, x[idx]) - y[idx]) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        history.append(total / len(y))
        if val is not None:
            with torch.no_grad():
                validation.append(float(((f(theta, xv) - yv) ** 2).mean()))
            kept.append(theta.detach().clone())
    return theta.detach(), history, validation, kept


def params(result):
    return torch.tensor([result.params[n] for n in "abc"], dtype=torch.float64)


OPTIMIZERS = [
    ("gd", 0.05, lambda p: torch.optim.SGD(p, lr=0.05)),
    ("sgd", 0.01, lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.9)),
    ("adam", 0.1, lambda p: torch.optim.Adam(p, lr=0.1)),
]


@pytest.mark.parametrize(("optimizer", "lr", "make_opt"), OPTIMIZERS)
@pytest.mark.parametrize(("batch_size", "shuffle"), [(7, True), (32, False)])
def test_equals_a_reference_loop_over_the_same_batches(
    optimizer, lr, make_opt, batch_size, shuffle
):
    x, y = data()
    result = gf.fit(QUADRATIC, x, y, p0=P0, optimizer=optimizer, lr=lr, epochs=12,
                    batch_size=batch_size, shuffle=shuffle, seed=11)  # fmt: skip
    theta, history, _, _ = reference(x, y, batch_size=batch_size, epochs=12, seed=11,
                                     make_opt=make_opt, shuffle=shuffle)  # fmt: skip
    torch.testing.assert_close(params(result), theta, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(torch.tensor(result.history), torch.tensor(history),
                               rtol=1e-12, atol=0)  # fmt: skip
    assert result.status == "max_iter" and not result.converged
    assert len(result.history) == result.n_iter == 12


def test_the_order_comes_from_the_seed_alone():
    x, y = data()
    runs = [gf.fit(QUADRATIC, x, y, p0=P0, lr=0.1, epochs=3, batch_size=10, seed=s).params
            for s in (1, 1, 2)]  # fmt: skip
    assert runs[0] == runs[1] != runs[2]
    # no seed: the global RNG is not drawn from (its state is as before the unseeded fit)
    state = torch.get_rng_state()
    unseeded = gf.fit(QUADRATIC, x, y, p0=P0, lr=0.1, epochs=2, batch_size=10)
    assert torch.equal(torch.get_rng_state(), state) and math.isfinite(unseeded.loss)


def test_a_function_model_and_an_nn_module_train_like_the_reference():
    x, y = data(n=60)
    fn = gf.Model(lambda x, p: p[0] * x**2 + p[1] * x + p[2], params=["a", "b", "c"])
    result = gf.fit(fn, x, y, p0=P0, optimizer="adam", lr=0.1, epochs=5, batch_size=8, seed=4)
    theta, _, _, _ = reference(x, y, batch_size=8, epochs=5, seed=4,
                                     make_opt=lambda p: torch.optim.Adam(p, lr=0.1))  # fmt: skip
    torch.testing.assert_close(params(result), theta, rtol=1e-12, atol=1e-12)

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(1, 4), nn.Tanh(), nn.Linear(4, 1)).double()
    copy = nn.Sequential(nn.Linear(1, 4), nn.Tanh(), nn.Linear(4, 1)).double()
    copy.load_state_dict(net.state_dict())
    fitted = gf.fit(net, x, y, optimizer="adam", lr=0.05, epochs=4, batch_size=16, seed=9)
    gen, opt = torch.Generator().manual_seed(9), torch.optim.Adam(copy.parameters(), lr=0.05)
    for _ in range(4):
        for idx in torch.randperm(len(y), generator=gen).split(16):
            loss = ((copy(x[idx].unsqueeze(-1)).squeeze(-1) - y[idx]) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    expected = torch.cat([p.detach().reshape(-1) for p in copy.parameters()])
    torch.testing.assert_close(fitted.values, expected, rtol=1e-12, atol=1e-12)


def test_validation_keeps_the_best_parameters_and_patience_stops():
    x, y = data(seed=3)
    lr = 0.5  # large: the validation loss goes up and down, so patience has work to do
    result = gf.fit(QUADRATIC, x, y, p0=P0, optimizer="adam", lr=lr, epochs=200,
                    batch_size=10, seed=5, validation=0.25, patience=4)  # fmt: skip
    n = len(result.validation_history)
    _, history, val, kept = reference(x, y, batch_size=10, epochs=n, seed=5, val=0.25,
                                      make_opt=lambda p: torch.optim.Adam(p, lr=lr))  # fmt: skip
    torch.testing.assert_close(torch.tensor(result.validation_history), torch.tensor(val),
                               rtol=1e-12, atol=0)  # fmt: skip
    torch.testing.assert_close(torch.tensor(result.history), torch.tensor(history),
                               rtol=1e-12, atol=0)  # fmt: skip
    best = min(range(n), key=lambda i: val[i])
    assert result.status == "early_stopped" and not result.converged and n < 200
    assert result.status in STATUSES and result.status not in FAILED
    assert n == best + 1 + 4  # four epochs after the best, none better
    assert all(v >= val[best] for v in val[best + 1 :])
    torch.testing.assert_close(params(result), kept[best], rtol=0, atol=0)
    assert result.n_points == 75  # statistics on the training rows
    assert any(w.startswith("not converged: stopped early") for w in result.warnings)
    assert "fit failed" not in " ".join(result.warnings)
    saved = result.to_dict()
    assert saved["status"] == "early_stopped" and len(saved["validation_history"]) == n


def test_explicit_validation_rows():
    x, y = data()
    xv, yv = data(seed=7)
    result = gf.fit(QUADRATIC, x, y, p0=P0, lr=0.1, epochs=6, batch_size=20, seed=1,
                    validation=(xv, yv))  # fmt: skip
    assert len(result.validation_history) == 6
    best = result.covariance.new_tensor([result.params[n] for n in "abc"])
    pred = best[0] * xv**2 + best[1] * xv + best[2]
    assert float(((pred - yv) ** 2).mean()) == pytest.approx(min(result.validation_history),
                                                              rel=1e-12)  # fmt: skip
    assert result.n_points == 100
    with pytest.raises(
        gf.errors.DataError, match="validation data: x and y must have the same length"
    ):
        gf.fit(QUADRATIC, x, y, batch_size=20, validation=(xv, yv[:5]))


class Killed(RuntimeError):
    pass


def killing_mse(after):
    calls = [0]

    def mse_loss(pred, true):
        calls[0] += pred.numel() <= 7  # training steps (not the scoring of larger sets)
        if calls[0] > after:
            raise Killed
        return ((pred - true) ** 2).mean()

    return mse_loss


@pytest.mark.parametrize(("validation", "every"), [(None, 11), (0.2, 11), (0.2, 12)])
def test_resume_mid_epoch_is_bit_for_bit(tmp_path, validation, every):
    x, y = data()
    path = tmp_path / "fit.pt"
    options = dict(p0=P0, optimizer="adam", lr=0.1, epochs=6, batch_size=7, seed=2,
                   validation=validation)  # fmt: skip
    full = gf.fit(QUADRATIC, x, y, loss=killing_mse(10**9), **options)
    with pytest.raises(Killed):  # killed in the middle of the third epoch
        gf.fit(QUADRATIC, x, y, loss=killing_mse(37), checkpoint=path, checkpoint_every=every,
               **options)  # fmt: skip
    saved = read_checkpoint(path)
    batches = math.ceil((80 if validation else 100) / 7)
    steps = 37 // every * every  # the last save before the kill
    assert saved["extra"]["minibatch"]["steps"] == steps
    # mid-epoch; or (12 of 12 batches) after the epoch's last step, before its end
    assert saved["extra"]["minibatch"]["step"] == (steps % batches or batches)
    resumed = gf.fit(QUADRATIC, x, y, loss=killing_mse(10**9), resume=path, **options)
    assert resumed.params == full.params
    assert resumed.history == full.history
    assert resumed.validation_history == full.validation_history
    assert resumed.loss == full.loss and resumed.status == full.status
    with pytest.raises(gf.errors.CheckpointError, match="batch_size"):
        gf.fit(QUADRATIC, x, y, loss=killing_mse(10**9), resume=path,
               **(options | {"batch_size": 8}))  # fmt: skip


@pytest.mark.parametrize(
    ("options", "words"),
    [
        ({"optimizer": "lm", "batch_size": 8}, "LM is full-batch"),
        ({"optimizer": "lbfgs", "batch_size": 8}, "lbfgs needs the full batch"),
        ({"batch_size": 0}, "batch_size must be a whole number >= 1"),
        ({"batch_size": 2.5}, "batch_size must be a whole number"),
        ({"validation": 0.1}, "needs mini-batch training"),
        ({"batch_size": 8, "validation": 1.0}, "fraction in \\(0, 1\\)"),
        ({"batch_size": 8, "patience": 3}, "give validation too"),
        ({"batch_size": 8, "validation": 0.1, "patience": 0}, "patience must be"),
        ({"batch_size": 8, "shuffle": "yes"}, "shuffle must be True or False"),
        ({"batch_size": 8, "validation": (1, 2, 3, 4)}, "validation must be .* of 4 items"),
        ({"batch_size": 8, "validation": "0.1"}, "validation must be .* str"),
    ],
)
def test_bad_minibatch_options_are_refused(options, words):
    x, y = data()
    with pytest.raises(OptionError, match=words):
        gf.fit(QUADRATIC, x, y, **options)


def test_a_stop_request_stops_mid_epoch_and_resumes_exactly(tmp_path):
    x, y = data()
    path = tmp_path / "fit.pt"
    options = dict(p0=P0, optimizer="adam", lr=0.1, epochs=4, batch_size=9, seed=8)
    full = gf.fit(QUADRATIC, x, y, **options)
    asked = [0]

    def stop(epoch, loss):  # as the CLI's Ctrl-C hook: only asks "stop?", after every batch
        asked[0] += 1
        return asked[0] >= 17

    stop.stop_only = True
    part = gf.fit(QUADRATIC, x, y, hook=stop, checkpoint=path, **options)
    # asked after each of epoch 0's 12 batches and at its end (13), then 4 batches into epoch 1
    assert part.status == "interrupted" and len(part.history) == 1
    assert "stopped in epoch 1 after 4 of its batches" in part.message
    resumed = gf.fit(QUADRATIC, x, y, resume=path, **options)
    assert resumed.params == full.params and resumed.history == full.history
