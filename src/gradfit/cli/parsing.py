"""The CLI's spellings of parameter options: ``--p0``/``--fix`` ``a=1,b=2.5`` and
``--bounds`` ``k=0:inf,a=-1:1``, parsed into what ``gradfit.fit`` takes.

Plain Python, no torch: every malformed item is one ``OptionError`` naming its option.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from gradfit.errors import OptionError

if TYPE_CHECKING:
    from gradfit.model.parameters import Bound


def parse_assignments(text: str, option: str) -> dict[str, float]:
    """``"a=1,b=2.5"`` -> ``{"a": 1.0, "b": 2.5}`` for ``--p0`` and ``--fix``.

    Example:
        >>> parse_assignments("a=1, k=-0.5", "--p0")
        {'a': 1.0, 'k': -0.5}
    """
    result: dict[str, float] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise OptionError(f"{option}: expected name=value, got {item!r}")
        result[name.strip()] = _parse_number(value, f"{option} {name.strip()}")
    return result


def parse_bounds(text: str) -> dict[str, Bound]:
    """``"k=0:inf,a=-1:1"`` -> ``{"k": (0.0, None), "a": (-1.0, 1.0)}`` for ``--bounds``.

    Example:
        >>> parse_bounds("k=0:inf, a=:5")
        {'k': (0.0, None), 'a': (None, 5.0)}
    """
    result: dict[str, Bound] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, span = item.partition("=")
        lo_text, colon, hi_text = span.partition(":")
        if not sep or not colon or not name.strip():
            raise OptionError(f"--bounds: expected name=lo:hi, got {item!r}")
        name = name.strip()
        lo = _parse_number(lo_text or "-inf", f"--bounds {name} lower")
        hi = _parse_number(hi_text or "inf", f"--bounds {name} upper")
        result[name] = (None if lo == -math.inf else lo, None if hi == math.inf else hi)
    return result


def _parse_number(text: str, what: str) -> float:
    try:
        value = float(text.strip())
    except ValueError:
        raise OptionError(f"{what}: {text.strip()!r} is not a number") from None
    if math.isnan(value):
        raise OptionError(f"{what}: NaN is not allowed")
    return value
