"""The built-in model library as data: names, formulas, parameter order and descriptions.

The one list of the built-ins. It imports no torch, so ``gradfit models`` answers before torch
has loaded; ``model/models.py`` builds each built-in ``Model`` from its entry here and adds
its starting guess (``model/guesses.py``, the function of the same name; polynomials by
degree).

Example:
    >>> BUILTINS["exponential"].formula
    'a*exp(-k*x) + c'
    >>> find("poly3").params
    ('c0', 'c1', 'c2', 'c3')
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from gradfit.errors import OptionError


@dataclass(frozen=True)
class Builtin:
    """One built-in model: the expression ``formula`` in ``x`` with ``params`` in that order."""

    name: str
    formula: str
    params: tuple[str, ...]
    description: str
    #: a polynomial's degree (its guess is the least-squares polynomial), else None
    degree: int | None = None


def polynomial(degree: int) -> Builtin:
    """``c0 + c1*x + ... + cd*x**d`` for ``0 <= degree <= 20``.

    Example:
        >>> polynomial(2).formula
        'c0 + c1*x + c2*x**2'
    """
    if not isinstance(degree, int) or isinstance(degree, bool) or not 0 <= degree <= 20:
        raise OptionError(f"polynomial degree must be an integer in 0..20, got {degree!r}")
    terms = ["c0"] + [f"c{k}*x" if k == 1 else f"c{k}*x**{k}" for k in range(1, degree + 1)]
    formula = " + ".join(terms) if degree > 0 else "c0 + 0*x"
    params = tuple(f"c{k}" for k in range(degree + 1))
    return Builtin(f"polynomial{degree}", formula, params, f"degree {degree}", degree)


_PEAK = ("amplitude", "center", "width", "offset")

#: the built-ins by the name a user gives (``--model gaussian``), in ``gradfit models`` order
BUILTINS: dict[str, Builtin] = {
    "linear": Builtin("linear", "a*x + b", ("a", "b"), "straight line"),
    "quadratic": polynomial(2),
    "cubic": polynomial(3),
    "exponential": Builtin("exponential", "a*exp(-k*x) + c", ("a", "k", "c"), "exponential decay"),
    "gaussian": Builtin(
        "gaussian", "amplitude*exp(-(x - center)**2/(2*width**2)) + offset", _PEAK, "Gaussian peak"
    ),
    "lorentzian": Builtin(
        "lorentzian",
        "amplitude*width**2/((x - center)**2 + width**2) + offset",
        _PEAK,  # as the Gaussian's
        "Lorentzian peak",
    ),
    "logistic": Builtin(
        "logistic",
        "top/(1 + exp(-rate*(x - midpoint))) + bottom",
        ("top", "rate", "midpoint", "bottom"),
        "logistic sigmoid",
    ),
    "power_law": Builtin("power_law", "a*x**b", ("a", "b"), "power law"),
    "sine": Builtin(
        "sine",
        "amplitude*sin(2*pi*frequency*x + phase) + offset",
        ("amplitude", "frequency", "phase", "offset"),
        "sine wave",
    ),
}


def find(name: str) -> Builtin | None:
    """The built-in called ``name`` (``polynomialN``/``polyN`` for any degree), else None."""
    name = name.strip()
    if name in BUILTINS:
        return BUILTINS[name]
    match = re.fullmatch(r"(?:polynomial|poly)(\d{1,2})", name)
    return polynomial(int(match.group(1))) if match else None


def describe_builtins() -> list[tuple[str, str, tuple[str, ...]]]:
    """``(name, formula, param_names)`` of the built-ins, for ``gradfit models``."""
    listed = [*BUILTINS.values(), polynomial(4)]
    return [(b.name, b.formula, b.params) for b in listed]
