"""Argument checks shared by the built-in segmenters: a wrong value is an InputError that
names the argument."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ..errors import InputError

__all__ = ["channel_index", "finite", "non_negative", "positive", "positive_int"]


def finite(name: str, value: Any) -> float:
    """``value`` as a float, refusing non-numbers (bools too), NaN and infinities.

    Examples
    --------
    >>> finite("sigma", 2)
    2.0
    """
    if isinstance(value, bool) or not isinstance(value, (int, float, np.number)):
        raise InputError(f"{name}={value!r} must be a number")
    if not math.isfinite(value):
        raise InputError(f"{name}={value!r} must be finite")
    return float(value)


def positive(name: str, value: Any) -> float:
    value = finite(name, value)
    if value <= 0:
        raise InputError(f"{name}={value!r} must be > 0")
    return value


def non_negative(name: str, value: Any) -> float:
    value = finite(name, value)
    if value < 0:
        raise InputError(f"{name}={value!r} must be >= 0")
    return value


def positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise InputError(f"{name}={value!r} must be an int >= 1")
    return int(value)


def channel_index(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise InputError(f"{name}={value!r} must be a channel index >= 0")
    return int(value)
