"""Fully connected layer, activations, Flatten and Dropout, each with its hand-derived backward.

Shapes: ``x`` is (N, ...); ``dout`` has the shape of the layer's output. Every ``backward``
returns d(loss)/d(x) and overwrites the layer's gradient views.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np

from . import init as initializers
from ._array import array_module
from .module import Layer

#: a weight init: a name from :data:`fastopt.nn.init.INITS` or a callable ``init(rng, shape) -> array``
Init = str | Callable[[np.random.Generator, tuple], np.ndarray]


class WeightLayer(Layer):
    """A layer with a ``weight`` (shape ``weight_shape``, ``(out, in, ...)``) and, when ``bias``,
    a bias (shape ``(out,)``).

    ``init``: None (the default for the activation that follows: He before ReLU, Xavier
    otherwise), a name from ``fastopt.nn.init.INITS``, or a callable ``init(rng, shape)``.
    """

    def __init__(self, weight_shape: tuple[int, ...], bias: bool, init: Init | None) -> None:
        super().__init__()
        if init is not None:
            initializers.resolve(init)  # reject a bad name now, not at build time
        self.weight_shape, self.has_bias, self.init = tuple(weight_shape), bool(bias), init

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        shapes = {"weight": self.weight_shape}
        if self.has_bias:
            shapes["bias"] = (self.weight_shape[0],)
        return shapes

    def init_params(self, rng: np.random.Generator, nonlinearity: str) -> dict[str, np.ndarray]:
        init = initializers.resolve(self.init if self.init is not None else initializers.default_for(nonlinearity))
        values = {"weight": init(rng, self.weight_shape)}
        if self.has_bias:
            values["bias"] = np.zeros(self.weight_shape[0])
        return values


def _positive_int(name: str, value: int) -> int:
    if int(value) != value or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


class Linear(WeightLayer):
    """y = x W^T + b, with W of shape (out_features, in_features) as in PyTorch.

    dx = dout W,   dW = dout^T x,   db = sum_n dout

    ``Linear(in_features, out_features, bias=True, init=None)``: ``bias=False`` leaves b out;
    ``init`` as :class:`WeightLayer`'s (None: chosen by the activation that follows).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, init: Init | None = None) -> None:
        super().__init__((_positive_int("out_features", out_features), _positive_int("in_features", in_features)),
                         bias, init)

    def forward(self, x: np.ndarray) -> np.ndarray:
        if x.ndim != 2 or x.shape[1] != self.weight_shape[1]:
            raise ValueError(f"x must have shape (N, {self.weight_shape[1]}), got {x.shape}")
        self.x = x
        out = x @ self.params["weight"].T
        if self.has_bias:
            out += self.params["bias"]
        return out

    def backward(self, dout: np.ndarray, need_dx: bool = True) -> np.ndarray | None:
        xp = array_module(dout)
        xp.matmul(dout.T, self.x, out=self.grads["weight"])
        if self.has_bias:
            dout.sum(axis=0, out=self.grads["bias"])
        return dout @ self.params["weight"] if need_dx else None

    def __repr__(self) -> str:
        return f"Linear({self.weight_shape[1]}, {self.weight_shape[0]}, bias={self.has_bias})"


class ReLU(Layer):
    """y = max(x, 0);  dx = dout * [x > 0]  (the subgradient 0 at x = 0, as PyTorch)."""

    nonlinearity = "relu"

    def forward(self, x: np.ndarray) -> np.ndarray:
        self.out = array_module(x).maximum(x, 0)
        return self.out

    def backward(self, dout: np.ndarray, need_dx: bool = True) -> np.ndarray | None:
        return dout * (self.out > 0) if need_dx else None


class Tanh(Layer):
    """y = tanh(x);  dx = dout * (1 - y^2)."""

    nonlinearity = "tanh"

    def forward(self, x: np.ndarray) -> np.ndarray:
        self.out = array_module(x).tanh(x)
        return self.out

    def backward(self, dout: np.ndarray, need_dx: bool = True) -> np.ndarray | None:
        return dout * (1 - self.out * self.out) if need_dx else None


class Sigmoid(Layer):
    """y = 1 / (1 + e^-x), computed as (1 + tanh(x/2)) / 2, which cannot overflow;
    dx = dout * y * (1 - y)."""

    nonlinearity = "sigmoid"

    def forward(self, x: np.ndarray) -> np.ndarray:
        self.out = 0.5 * (1 + array_module(x).tanh(0.5 * x))
        return self.out

    def backward(self, dout: np.ndarray, need_dx: bool = True) -> np.ndarray | None:
        return dout * self.out * (1 - self.out) if need_dx else None


class Flatten(Layer):
    """(N, d1, d2, ...) -> (N, d1*d2*...); backward reshapes back."""

    transparent = True

    def forward(self, x: np.ndarray) -> np.ndarray:
        self.shape = x.shape
        return x.reshape(x.shape[0], -1)

    def backward(self, dout: np.ndarray, need_dx: bool = True) -> np.ndarray | None:
        return dout.reshape(self.shape) if need_dx else None


class Dropout(Layer):
    """Inverted dropout: in training y = x * m / (1 - p) with m_i ~ Bernoulli(1 - p), so the
    expectation of y is x and evaluation is the identity; dx = dout * m / (1 - p).

    The mask comes from the layer's own ``RandomState`` on the input's device, seeded by the
    model (``reseed``), so a seeded run is repeatable. ``Dropout(p=0.5)``: p, the probability
    of dropping an element, in [0, 1).
    """

    transparent = True

    def __init__(self, p: float = 0.5) -> None:
        super().__init__()
        if not 0 <= p < 1:
            raise ValueError(f"p must be in [0, 1), got {p!r}")
        self.p = float(p)
        self.reseed(0)

    def reseed(self, seed: int) -> None:
        self.seed, self.rng = int(seed), None

    def forward(self, x: np.ndarray) -> np.ndarray:
        if not self.training or self.p == 0:
            self.mask = None
            return x
        xp = array_module(x)
        if self.rng is None or not isinstance(self.rng, xp.random.RandomState):
            self.rng = xp.random.RandomState(self.seed)
        keep = self.rng.random_sample(x.shape) >= self.p
        self.mask = keep.astype(x.dtype) * x.dtype.type(1 / (1 - self.p))
        return x * self.mask

    def backward(self, dout: np.ndarray, need_dx: bool = True) -> np.ndarray | None:
        if not need_dx:
            return None
        return dout if self.mask is None else dout * self.mask

    def __repr__(self) -> str:
        return f"Dropout(p={self.p})"
