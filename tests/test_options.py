"""FitOptions: validated once, the same for fit, fit_batch and the CLI."""

import numpy as np
import pytest

import gradfit as gf
from gradfit.errors import OptionError
from gradfit.options import FitOptions

BAD = [  # (options, words the one-line message must contain)
    ({"optimizer": "adamw"}, ["optimizer", "adamw"]),
    ({"lr": 0}, ["lr", "> 0"]),
    ({"epochs": 0}, ["epochs", ">= 1"]),
    ({"tol": float("nan")}, ["tol"]),
    ({"f_scale": -1.0}, ["f_scale"]),
    ({"loss": "hubber"}, ["loss", "hubber"]),
    ({"nan_policy": "drop"}, ["nan_policy", "drop"]),
]


def data():
    x = np.linspace(0, 1, 20)
    return x, 2 * x + 1 + np.random.default_rng(0).normal(0, 0.01, x.size)


@pytest.mark.parametrize(("options", "words"), BAD)
def test_bad_options_are_refused_alike_everywhere(options, words):
    x, y = data()
    messages = []
    for call in (
        lambda: FitOptions(**options),
        lambda: gf.fit("a*x + b", x, y, **options),
        lambda: (
            gf.fit_batch("a*x + b", x, np.stack([y, y]), **options)
            if "nan_policy" not in options
            else FitOptions(**options)
        ),
    ):
        with pytest.raises(OptionError) as raised:
            call()
        messages.append(str(raised.value))
    assert len(set(messages)) == 1, messages
    assert all(word in messages[0] for word in words), messages[0]


def test_options_object_equals_keywords_bit_for_bit():
    x, y = data()
    options = FitOptions(loss="huber", f_scale=0.1, p0={"a": 1.0, "b": 0.0})
    by_object = gf.fit("a*x + b", x, y, options=options)
    by_keywords = gf.fit("a*x + b", x, y, loss="huber", f_scale=0.1, p0={"a": 1.0, "b": 0.0})
    assert by_object.params == by_keywords.params
    batch = gf.fit_batch("a*x + b", x, np.stack([y]), options=options)
    assert batch.params[0].tolist() == pytest.approx(list(by_keywords.params.values()), rel=1e-9)


def test_options_and_keywords_together_are_refused():
    x, y = data()
    with pytest.raises(OptionError, match=r"not both.*lr"):
        gf.fit("a*x + b", x, y, options=FitOptions(optimizer="adam"), lr=0.1)


def test_auto_is_decided_in_one_place():
    assert FitOptions().resolve(batched=False) == FitOptions().resolve(batched=True) == "lm"
    assert FitOptions(loss="huber").resolve(batched=True) == "lm"
    assert FitOptions(loss="mae").resolve(batched=False) == "lbfgs"
    assert FitOptions(loss="mae").resolve(batched=True) == "adam"  # lbfgs is not batched
    with pytest.raises(OptionError, match="least-squares"):
        FitOptions(loss="mae", optimizer="lm").resolve(batched=False)
    with pytest.raises(OptionError, match="does not batch lbfgs"):
        FitOptions(optimizer="lbfgs").resolve(batched=True)
    # what fit and fit_batch actually ran
    x, y = data()
    assert gf.fit("a*x + b", x, y, loss="mae", epochs=50).optimizer == "lbfgs"
    assert gf.fit_batch("a*x + b", x, np.stack([y]), loss="mae", epochs=50).optimizer == "adam"
