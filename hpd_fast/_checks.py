"""Argument checks shared by the public entry points (messages name the argument)."""

from __future__ import annotations

import math
import numbers
import operator
from typing import Any

__all__ = ["check_float", "check_int"]


def check_int(name: str, value: Any, minimum: int) -> int:
    """``value`` as an ``int`` (any ``__index__`` type, not ``bool``) that is ``>= minimum``.

    Raises:
        ValueError: naming ``name``, when ``value`` is not an integer or is below ``minimum``.
    """
    try:
        if isinstance(value, bool):
            raise TypeError
        value = operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be an int, got {type(value).__name__}") from None
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def check_float(name: str, value: Any, *, allow_zero: bool = False) -> float:
    """``value`` as a finite ``float`` that is ``> 0`` (``>= 0`` with ``allow_zero``).

    Raises:
        ValueError: naming ``name``, when ``value`` is not a finite real number or is out of
            range.
    """
    # numbers.Real admits numpy integers and floats (np.float32 is not a float subclass);
    # bool and numpy.bool_ are refused (the latter is not registered as a number).
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {value}")
    return float(value)
