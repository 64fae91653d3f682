"""Weight initialization (the lecture notes' "Weight Initialization" slides).

Every function takes a NumPy ``Generator`` and a weight shape and returns a float64 host
array; the model copies it into its parameter arena, so a seed gives the same weights on
either device. Fans follow PyTorch: a weight of shape ``(out, in, *kernel)`` has
``fan_in = in * prod(kernel)`` and ``fan_out = out * prod(kernel)``.

    small_gaussian   W ~ N(0, std^2), std = 0.01        fine for small nets; the activations of
                                                        deep ones shrink to zero layer by layer
    xavier_normal    W ~ N(0, gain^2 * 2 / (fan_in + fan_out))      Glorot & Bengio (2010):
    xavier_uniform   W ~ U(-a, a), a = gain * sqrt(6 / (fan_in + fan_out))   keeps Var(y) = Var(x)
                                                        for linear / tanh / sigmoid units
    he_normal        W ~ N(0, 2 / fan_in)               He et al. (2015): ReLU zeroes half the
    he_uniform       W ~ U(-a, a), a = sqrt(6 / fan_in) inputs, so the variance needs the extra 2

The default per layer (:func:`default_for`) is He for a layer followed by a ReLU and Xavier
(uniform) otherwise; biases start at zero.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np


def fans(shape: Sequence[int]) -> tuple[int, int]:
    """(fan_in, fan_out) of a weight of shape ``(out, in, *kernel)``."""
    if len(shape) < 2:
        raise ValueError(f"shape must have at least 2 dimensions (out, in, ...), got {shape}")
    receptive = math.prod(shape[2:])
    return shape[1] * receptive, shape[0] * receptive


def small_gaussian(rng: np.random.Generator, shape: Sequence[int], std: float = 0.01) -> np.ndarray:
    """W ~ N(0, std^2), ``std`` default 0.01."""
    return rng.standard_normal(shape) * std


def xavier_normal(rng: np.random.Generator, shape: Sequence[int], gain: float = 1.0) -> np.ndarray:
    """W ~ N(0, gain^2 * 2 / (fan_in + fan_out)), ``gain`` default 1.0."""
    fan_in, fan_out = fans(shape)
    return rng.standard_normal(shape) * (gain * math.sqrt(2.0 / (fan_in + fan_out)))


def xavier_uniform(rng: np.random.Generator, shape: Sequence[int], gain: float = 1.0) -> np.ndarray:
    """W ~ U(-a, a), a = gain * sqrt(6 / (fan_in + fan_out)), ``gain`` default 1.0."""
    fan_in, fan_out = fans(shape)
    bound = gain * math.sqrt(6.0 / (fan_in + fan_out))
    return rng.uniform(-bound, bound, shape)


def he_normal(rng: np.random.Generator, shape: Sequence[int]) -> np.ndarray:
    """W ~ N(0, 2 / fan_in)."""
    fan_in, _ = fans(shape)
    return rng.standard_normal(shape) * math.sqrt(2.0 / fan_in)


def he_uniform(rng: np.random.Generator, shape: Sequence[int]) -> np.ndarray:
    """W ~ U(-a, a), a = sqrt(6 / fan_in)."""
    fan_in, _ = fans(shape)
    bound = math.sqrt(6.0 / fan_in)
    return rng.uniform(-bound, bound, shape)


INITS = {"small_gaussian": small_gaussian, "xavier_normal": xavier_normal,
         "xavier_uniform": xavier_uniform, "he_normal": he_normal, "he_uniform": he_uniform}


def default_for(nonlinearity: str) -> str:
    """The init name for a weight whose output goes into ``nonlinearity``
    ("relu", "tanh", "sigmoid" or "linear", i.e. none)."""
    if nonlinearity not in ("relu", "tanh", "sigmoid", "linear"):
        raise ValueError(f"nonlinearity must be 'relu', 'tanh', 'sigmoid' or 'linear', got {nonlinearity!r}")
    return "he_normal" if nonlinearity == "relu" else "xavier_uniform"


def resolve(init: str | Callable[..., np.ndarray]) -> Callable[..., np.ndarray]:
    """An init given by name or as a callable ``init(rng, shape) -> array``."""
    if callable(init):
        return init
    if init not in INITS:
        raise ValueError(f"init must be one of {sorted(INITS)} or a callable(rng, shape), got {init!r}")
    return INITS[init]
