"""Batch normalization (Ioffe & Szegedy 2015; the lecture notes' "Batch Normalization").

Training, over the m values of each feature in the batch (N for BatchNorm1d, N*H*W per
channel for BatchNorm2d):

    mu = mean(x),  var = mean((x - mu)^2),  xhat = (x - mu) / sqrt(var + eps),  y = gamma xhat + beta

and the running averages that evaluation uses instead of the batch statistics (PyTorch's
convention: momentum 0.1, and the unbiased batch variance var * m / (m - 1)):

    running_mean = (1 - momentum) running_mean + momentum mu
    running_var  = (1 - momentum) running_var  + momentum var m / (m - 1)

Backward in training, with the batch statistics depending on x:

    dbeta = sum dy,  dgamma = sum dy xhat,
    dx = gamma / sqrt(var + eps) * (dy - dbeta / m - xhat dgamma / m)

and in evaluation (constant statistics): dx = gamma dy / sqrt(running_var + eps).
"""
from __future__ import annotations

from types import ModuleType

import numpy as np

from ._array import array_module
from .layers import _positive_int
from .module import Layer


class _BatchNorm(Layer):
    """``(num_features, eps=1e-5, momentum=0.1)``: the size of axis 1, the variance's
    epsilon (> 0) and the running averages' momentum (in [0, 1], PyTorch's convention)."""

    transparent = True
    axes = None  # the axes reduced over: every axis but the feature axis 1

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1) -> None:
        super().__init__()
        self.num_features = _positive_int("num_features", num_features)
        if not eps > 0:
            raise ValueError(f"eps must be > 0, got {eps!r}")
        if not 0 <= momentum <= 1:
            raise ValueError(f"momentum must be in [0, 1], got {momentum!r}")
        self.eps, self.momentum = float(eps), float(momentum)
        self.running_mean = self.running_var = None

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        return {"weight": (self.num_features,), "bias": (self.num_features,)}

    def init_params(self, rng: np.random.Generator, nonlinearity: str) -> dict[str, np.ndarray]:
        return {"weight": np.ones(self.num_features), "bias": np.zeros(self.num_features)}

    def build_state(self, xp: ModuleType, dtype: np.dtype) -> None:
        self.running_mean = xp.zeros(self.num_features, dtype)
        self.running_var = xp.ones(self.num_features, dtype)

    def buffers(self) -> dict[str, np.ndarray]:
        return {"running_mean": self.running_mean, "running_var": self.running_var}

    def _feature_shape(self, x: np.ndarray) -> tuple[int, ...]:
        if x.ndim != self.ndim or x.shape[1] != self.num_features:
            raise ValueError(f"x must have {self.ndim} dimensions with {self.num_features} features on axis 1, "
                             f"got shape {x.shape}")
        return (1, self.num_features) + (1,) * (x.ndim - 2)

    def forward(self, x: np.ndarray) -> np.ndarray:
        xp = array_module(x)
        shape = self._feature_shape(x)
        if self.running_mean is None:
            self.build_state(xp, x.dtype)
        gamma, beta = self.params["weight"].reshape(shape), self.params["bias"].reshape(shape)
        if self.training:
            m = x.size // self.num_features
            if m < 2:
                raise ValueError(f"training needs more than 1 value per feature, got x of shape {x.shape}")
            mean = x.mean(axis=self.axes, keepdims=True)
            xc = x - mean
            var = (xc * xc).mean(axis=self.axes, keepdims=True)
            self.inv_std = 1 / xp.sqrt(var + self.eps)
            self.xhat = xc * self.inv_std
            mom = self.momentum
            self.running_mean *= 1 - mom
            self.running_mean += mom * mean.reshape(-1)
            self.running_var *= 1 - mom
            self.running_var += (mom * m / (m - 1)) * var.reshape(-1)
        else:
            self.inv_std = 1 / xp.sqrt(self.running_var.reshape(shape) + self.eps)
            self.xhat = (x - self.running_mean.reshape(shape)) * self.inv_std
        self.batch_stats = self.training
        return gamma * self.xhat + beta

    def backward(self, dout: np.ndarray, need_dx: bool = True) -> np.ndarray | None:
        shape = (1, self.num_features) + (1,) * (dout.ndim - 2)
        dbeta, dgamma = self.grads["bias"], self.grads["weight"]
        dout.sum(axis=self.axes, out=dbeta)
        (dout * self.xhat).sum(axis=self.axes, out=dgamma)
        if not need_dx:
            return None
        scale = self.params["weight"].reshape(shape) * self.inv_std
        if not self.batch_stats:
            return dout * scale
        m = dout.size // self.num_features
        return scale * (dout - dbeta.reshape(shape) / m - self.xhat * (dgamma.reshape(shape) / m))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.num_features}, eps={self.eps}, momentum={self.momentum})"


class BatchNorm1d(_BatchNorm):
    """Per-feature batch normalization of x (N, D).
    ``BatchNorm1d(num_features, eps=1e-5, momentum=0.1)``: see :class:`_BatchNorm`."""

    ndim, axes = 2, (0,)


class BatchNorm2d(_BatchNorm):
    """Per-channel batch normalization of x (N, C, H, W): statistics over N, H and W.
    ``BatchNorm2d(num_features, eps=1e-5, momentum=0.1)``: see :class:`_BatchNorm`."""

    ndim, axes = 4, (0, 2, 3)
