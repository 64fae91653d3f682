"""Hyper-parameter checks, with PyTorch's messages so errors read the same in both.

Each check returns None or raises ValueError; a value that is not a number fails as out of range.
:func:`type_problem` says why a value has the wrong type (callers raise TypeError).
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from typing import Any

import numpy as np


def _in(value: Any, lo: float, hi: float, closed_hi: bool) -> bool:
    # `not lo <= x` also rejects NaN; a non-number fails the comparison with TypeError
    try:
        return lo <= value < hi or (closed_hi and value == hi)
    except TypeError:
        return False


def nonneg(name: str, value: Any) -> None:
    """``name`` (for the message) >= 0 and finite."""
    if not _in(value, 0.0, math.inf, False):
        raise ValueError(f"Invalid {name} value: {value}")


def lr(value: Any) -> None:
    """A learning rate >= 0 and finite."""
    if not _in(value, 0.0, math.inf, False):
        raise ValueError(f"Invalid learning rate: {value}")


def eps(value: Any) -> None:
    """An epsilon >= 0 and finite."""
    if not _in(value, 0.0, math.inf, False):
        raise ValueError(f"Invalid epsilon value: {value}")


def betas(value: Any) -> None:
    """A pair ``(beta1, beta2)``, each in [0, 1)."""
    try:
        pair = len(value) == 2
    except TypeError:  # betas=0.9: say so, not "object of type 'float' has no len()"
        pair = False
    if not pair:
        raise ValueError(f"betas must be a pair (beta1, beta2), got {value!r}")
    for i, b in enumerate(value):
        if not _in(b, 0.0, 1.0, False):
            raise ValueError(f"Invalid beta parameter at index {i}: {b}")


def unit(name: str, value: Any) -> None:
    """A decay rate ``name`` (for the message) in [0, 1]."""
    if not _in(value, 0.0, 1.0, True):
        raise ValueError(f"Invalid {name} value: {value}")


def step(value: Any) -> None:
    """The 1-based number of an update: an integer (not a bool) >= 1."""
    if (type(value) is not int and not (hasattr(value, "__index__") and not isinstance(value, bool))) or value < 1:
        raise ValueError(f"step must be a positive integer (the 1-based number of this update), got {value!r}")


def is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def type_problem(name: str, value: Any, default: Any) -> str | None:
    """Why ``value`` cannot stand where the rule defaults to ``default`` (None if it can): a
    flag takes True or False, a number a real number (not a bool), a tuple as many real
    numbers, a string a string; a None default anything. The optimizer classes and the
    functional rules check alike (the math reads a flag by its truth: "False" is true)."""
    if isinstance(default, bool):
        ok, want = isinstance(value, (bool, np.bool_)), "True or False"
    elif isinstance(default, numbers.Real):
        ok, want = is_real(value), "a real number"
    elif isinstance(default, tuple):
        ok = isinstance(value, (tuple, list)) and len(value) == len(default) and all(map(is_real, value))
        want = "a pair of real numbers" if len(default) == 2 else f"{len(default)} real numbers"
    elif isinstance(default, str):
        ok, want = isinstance(value, str), "a string"
    else:
        return None
    return None if ok else f"{name} must be {want}, got {value!r}"


def required(name: str, array: Any, why: str) -> None:
    """``array`` is not None; the message says ``name`` is required ``why`` ("when amsgrad=True")."""
    if array is None:
        raise ValueError(f"{name} is required {why}")


L1_MODES = ("subgradient", "proximal")


def l1(value: Any, mode: Any) -> None:
    """An L1 strength >= 0 and a mode in :data:`L1_MODES`."""
    nonneg("l1", value)
    if mode not in L1_MODES:
        raise ValueError(f"l1_mode must be 'subgradient' or 'proximal', got {mode!r}")


def nonneg_of(name: str) -> Callable[[Any], None]:
    """A check of ``name`` >= 0 (for a rule's declaration)."""
    return lambda value: nonneg(name, value)


def unit_of(name: str) -> Callable[[Any], None]:
    """A check of ``name`` in [0, 1] (for a rule's declaration)."""
    return lambda value: unit(name, value)


def l1_mode(value: Any) -> None:
    """An L1 mode: one of :data:`L1_MODES`."""
    if value not in L1_MODES:
        raise ValueError(f"l1_mode must be 'subgradient' or 'proximal', got {value!r}")
