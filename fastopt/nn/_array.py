"""The array module (NumPy or CuPy) an array belongs to: the one switch that lets each
layer run unchanged on both devices, as ``cupy.get_array_module`` does."""
from __future__ import annotations

from types import ModuleType
from typing import Any

import numpy as np

try:
    import cupy
except ImportError:  # CPU-only install: every array is a NumPy array
    cupy = None


def array_module(x: Any) -> ModuleType:
    """``cupy`` for a CuPy array, ``numpy`` for anything else."""
    return cupy.get_array_module(x) if cupy is not None else np


def to_numpy(x: Any) -> np.ndarray:
    """A host copy (or the array itself when it is already a NumPy array)."""
    return x.get() if hasattr(x, "get") and not isinstance(x, np.ndarray) else np.asarray(x)


def as_strided(xp: ModuleType, x: np.ndarray, shape: tuple[int, ...], strides: tuple[int, ...]) -> np.ndarray:
    """A view of ``x`` with the given shape and byte strides (no copy), on either device."""
    return xp.lib.stride_tricks.as_strided(x, shape=shape, strides=strides)
