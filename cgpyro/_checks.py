"""Small validators of user-given settings, shared by the simulators and the spec readers.

Python and numpy integers count as integers, ``bool`` does not (``True`` is not a size).
Errors are ``ValueError``s that name the setting and the rule, e.g. ``n_sites: expected a
positive integer, found 0``.
"""

from __future__ import annotations

import math
import re

import numpy as np

__all__ = ["check_int", "describe_invalid", "int_rule", "is_finite", "is_int", "is_invalid_values",
           "is_real"]


def is_int(x: object) -> bool:
    """A Python or numpy integer, not a ``bool``."""
    return isinstance(x, int | np.integer) and not isinstance(x, bool)


def is_real(x: object) -> bool:
    """A Python or numpy real number (``inf`` and ``nan`` included), not a ``bool``."""
    return isinstance(x, int | float | np.integer | np.floating) and not isinstance(x, bool)


def is_finite(x: object) -> bool:
    """A real number that is neither infinite nor ``nan``."""
    return is_real(x) and math.isfinite(x)


def int_rule(minimum: int) -> str:
    """The rule "an integer >= minimum" in words."""
    return {1: "a positive integer", 0: "a non-negative integer"}.get(
        minimum, f"an integer >= {minimum}")


def check_int(value: object, name: str, minimum: int = 1) -> int:
    """``value`` as an ``int``, refused unless it is an integer ``>= minimum``."""
    if not is_int(value) or value < minimum:
        raise ValueError(f"{name}: expected {int_rule(minimum)}, found {value!r}")
    return int(value)


def is_invalid_values(err: ValueError) -> bool:
    """A distribution parameter holding NaN/inf (torch's validation), not a user mistake."""
    text = str(err)
    return "Expected parameter" in text and "found invalid values" in text


def describe_invalid(err: ValueError) -> str:
    """One line naming the parameter, distribution and site of an invalid-values error."""
    text = " ".join(str(err).split())
    site = re.search(r"at site '([^']+)'", text)
    param = re.search(r"Expected parameter (\w+) .*? of distribution (\w+)", text)
    what = f"parameter {param[1]!r} of the {param[2]}" if param else "a distribution parameter"
    where = f" at site {site[1]!r}" if site else ""
    return f"{what}{where} holds invalid values (NaN, inf or out of range)"
