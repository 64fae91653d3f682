"""Conv2d (im2col + one matrix product) and max / average pooling, NCHW.

Windows are strided views of the (padded) input, never Python loops over pixels: a kh x kw
window at stride s over an (N, C, H, W) array is ``as_strided`` with the strides of H and W
repeated. Backward scatters window gradients back with kh*kw slice-adds (col2im), each
adding one kernel offset's contribution for every output pixel at once.

Layouts: arrays are NCHW in shape but not always in memory. Conv2d's product comes out as
(C_out, N, H, W) memory and is handed on as an NCHW view; element-wise layers and pooling
keep whatever layout they are given, and the next Conv2d's im2col reads (C, kh, kw, N, ...)
order, which that layout serves best. Only Flatten forces a copy to NCHW order.
"""
from __future__ import annotations

from types import ModuleType

import numpy as np

from ._array import array_module, as_strided
from .layers import Init, WeightLayer, _positive_int
from .module import Layer


def _pair(name, value):
    pair = tuple(value) if isinstance(value, (tuple, list)) else (value, value)
    if len(pair) != 2:
        raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")
    return pair


def _padding(value):
    """``padding`` as a pair of non-negative ints (a float is taken only when it is integral)."""
    pair = _pair("padding", value)
    numbers = (int, float, np.integer, np.floating)
    if any(isinstance(p, bool) or not isinstance(p, numbers) or not (p >= 0 and float(p).is_integer()) for p in pair):
        raise ValueError(f"padding must be a non-negative integer or a pair of them, got {value!r}")
    return tuple(int(p) for p in pair)


def _out_size(size, k, s, name):
    if size < k:
        raise ValueError(f"{name} {size} (padded) is smaller than the kernel {k}")
    return (size - k) // s + 1


def _pad(xp, x, ph, pw, value=0):
    if ph == 0 and pw == 0:
        return x
    return xp.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)), constant_values=value)


def _windows(xp, x, kh, kw, sh, sw, order):
    """Strided view of the kh x kw windows of x (N, C, Hp, Wp), no copy.
    order "ckn": (C, kh, kw, N, Ho, Wo), the im2col layout; "nck": (N, C, Ho, Wo, kh, kw)."""
    n, c, h, w = x.shape
    ho, wo = _out_size(h, kh, sh, "height"), _out_size(w, kw, sw, "width")
    s_n, s_c, s_h, s_w = x.strides
    if order == "ckn":
        return as_strided(xp, x, (c, kh, kw, n, ho, wo), (s_c, s_h, s_w, s_n, s_h * sh, s_w * sw))
    return as_strided(xp, x, (n, c, ho, wo, kh, kw), (s_n, s_c, s_h * sh, s_w * sw, s_h, s_w))


def _unpad(x, ph, pw):
    return x[:, :, ph:x.shape[2] - ph, pw:x.shape[3] - pw]


class Conv2d(WeightLayer):
    """Cross-correlation, as PyTorch: weight (C_out, C_in, kh, kw), bias (C_out,), x (N, C_in, H, W),

        y[n, o, i, j] = b[o] + sum_{c, p, q} W[o, c, p, q] * xpad[n, c, i*s + p, j*s + q]

    As matrices, with cols (C_in*kh*kw, N*Ho*Wo) the im2col of xpad and W2 = W.reshape(C_out, -1):
    Y = W2 cols + b;  dW2 = dY cols^T;  db = dY 1;  dcols = W2^T dY, scattered back by col2im.

    ``Conv2d(in_channels, out_channels, kernel_size, stride=1, padding=0, bias=True, init=None)``:
    kernel_size, stride and padding an int or an (h, w) pair (padding zeros on each side);
    ``bias=False`` leaves b out; ``init`` as :class:`~fastopt.nn.layers.WeightLayer`'s.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | tuple[int, int],
                 stride: int | tuple[int, int] = 1, padding: int | tuple[int, int] = 0, bias: bool = True,
                 init: Init | None = None) -> None:
        kh, kw = (_positive_int("kernel_size", k) for k in _pair("kernel_size", kernel_size))
        super().__init__((_positive_int("out_channels", out_channels), _positive_int("in_channels", in_channels),
                          kh, kw), bias, init)
        self.stride = tuple(_positive_int("stride", s) for s in _pair("stride", stride))
        self.padding = _padding(padding)

    def forward(self, x: np.ndarray) -> np.ndarray:
        xp = array_module(x)
        o, c, kh, kw = self.weight_shape
        if x.ndim != 4 or x.shape[1] != c:
            raise ValueError(f"x must have shape (N, {c}, H, W), got {x.shape}")
        n = x.shape[0]
        xpad = _pad(xp, x, *self.padding)
        win = _windows(xp, xpad, kh, kw, *self.stride, order="ckn")
        ho, wo = win.shape[-2:]
        self.cols = xp.ascontiguousarray(win).reshape(c * kh * kw, n * ho * wo)  # the one gather
        self.padded_shape = xpad.shape
        out = self.params["weight"].reshape(o, -1) @ self.cols
        if self.has_bias:
            out += self.params["bias"][:, None]
        # (C_out, N, Ho, Wo) -> NCHW as a view: the next layer reads it in any order
        return out.reshape(o, n, ho, wo).transpose(1, 0, 2, 3)

    def backward(self, dout: np.ndarray, need_dx: bool = True) -> np.ndarray | None:
        xp = array_module(dout)
        o, c, kh, kw = self.weight_shape
        n, _, ho, wo = dout.shape
        dy = xp.ascontiguousarray(dout.transpose(1, 0, 2, 3)).reshape(o, n * ho * wo)
        xp.matmul(dy, self.cols.T, out=self.grads["weight"].reshape(o, -1))
        if self.has_bias:
            dy.sum(axis=1, out=self.grads["bias"])
        if not need_dx:
            return None
        dcols = (self.params["weight"].reshape(o, -1).T @ dy).reshape(c, kh, kw, n, ho, wo)
        # col2im: add each kernel offset's (C, N, Ho, Wo) block onto the input positions it
        # read; dx is laid out (C, N, H, W) like those blocks and handed on as an NCHW view
        (sh, sw), (_, _, hp, wp) = self.stride, self.padded_shape
        dx = xp.zeros((c, n, hp, wp), dout.dtype)
        for i in range(kh):
            for j in range(kw):
                dx[:, :, i:i + sh * (ho - 1) + 1:sh, j:j + sw * (wo - 1) + 1:sw] += dcols[:, i, j]
        return _unpad(dx.transpose(1, 0, 2, 3), *self.padding)

    def __repr__(self) -> str:
        o, c, kh, kw = self.weight_shape
        return f"Conv2d({c}, {o}, kernel_size=({kh}, {kw}), stride={self.stride}, padding={self.padding})"


class _Pool2d(Layer):
    """Pooling walks the kh*kw kernel offsets: offset (i, j) is one strided slice of the
    (padded) input holding element (i, j) of every window, so a pool is kh*kw element-wise
    operations on whole arrays, and its backward kh*kw slice-writes.

    ``(kernel_size, stride=None, padding=0)``: each an int or an (h, w) pair; stride None is
    the kernel size (windows that tile); padding at most half the kernel."""

    transparent = True

    def __init__(self, kernel_size: int | tuple[int, int], stride: int | tuple[int, int] | None = None,
                 padding: int | tuple[int, int] = 0) -> None:
        super().__init__()
        self.kernel = tuple(_positive_int("kernel_size", k) for k in _pair("kernel_size", kernel_size))
        stride = self.kernel if stride is None else _pair("stride", stride)
        self.stride = tuple(_positive_int("stride", s) for s in stride)
        self.padding = _padding(padding)
        if any(2 * p > k for p, k in zip(self.padding, self.kernel)):
            raise ValueError(f"padding must be an integer in [0, kernel_size / 2], got {padding!r}")

    def _offsets(self, x: np.ndarray, pad_value: float) -> tuple[ModuleType, list[np.ndarray]]:
        """The input's array module and its kh*kw offset slices, each (N, C, Ho, Wo), in row-major order."""
        if x.ndim != 4:
            raise ValueError(f"x must have shape (N, C, H, W), got {x.shape}")
        xp = array_module(x)
        xpad = _pad(xp, x, *self.padding, value=pad_value)
        win = _windows(xp, xpad, *self.kernel, *self.stride, order="nck")
        self.x, self.padded_shape = x, xpad.shape
        kh, kw = self.kernel
        return xp, [win[..., i, j] for i in range(kh) for j in range(kw)]

    def _scatter(self, xp: ModuleType, pieces: list[np.ndarray], dtype: np.dtype) -> np.ndarray:
        """d(input) from the gradient ``pieces[k]`` (N, C, Ho, Wo) of each offset slice k."""
        (kh, kw), (sh, sw), (ph, pw) = self.kernel, self.stride, self.padding
        _n, _c, ho, wo = pieces[0].shape
        _, _, hp, wp = self.padded_shape
        tiles = (sh, sw) == (kh, kw) and (ph, pw) == (0, 0) and (hp, wp) == (ho * kh, wo * kw)
        # exact tiling: every input element is in one window, so write instead of zero + add;
        # empty_like keeps the input's memory layout, which the layer below reads back
        dx = xp.empty_like(self.x) if tiles else xp.zeros(self.padded_shape, dtype)
        for k, piece in enumerate(pieces):
            i, j = divmod(k, kw)
            dst = dx[:, :, i:i + sh * (ho - 1) + 1:sh, j:j + sw * (wo - 1) + 1:sw]
            if tiles:
                dst[...] = piece
            else:
                dst += piece
        return dx if tiles else _unpad(dx, ph, pw)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(kernel_size={self.kernel}, stride={self.stride}, padding={self.padding})"


class MaxPool2d(_Pool2d):
    """y = max over each window (padding with -inf, as PyTorch); the gradient goes to the
    window's first maximal element only (ties: the first in row-major order, as PyTorch).

    Forward keeps ``argmax`` (N, C, Ho, Wo): the offset k of each window's first maximum,
    built with boolean arithmetic (masked assignment is several times slower in NumPy).
    ``MaxPool2d(kernel_size, stride=None, padding=0)``: see :class:`_Pool2d`."""

    def forward(self, x: np.ndarray) -> np.ndarray:
        xp, offsets = self._offsets(x, -np.inf)
        best = offsets[0].copy(order="K")
        for v in offsets[1:]:
            xp.maximum(best, v, out=best)
        idx = xp.zeros(best.shape, np.uint8 if len(offsets) < 256 else np.int32)
        found = offsets[0] == best
        for k, v in enumerate(offsets[1:], start=1):
            hit = v == best
            idx += (hit & ~found) * idx.dtype.type(k)
            found |= hit
        self.argmax = idx
        return best

    def backward(self, dout: np.ndarray, need_dx: bool = True) -> np.ndarray | None:
        if not need_dx:
            return None
        xp = array_module(dout)
        pieces = [dout * (self.argmax == k) for k in range(self.kernel[0] * self.kernel[1])]
        return self._scatter(xp, pieces, dout.dtype)


class AvgPool2d(_Pool2d):
    """y = mean over each window (zero padding counted, as PyTorch's default);
    every element of a window gets dout / (kh*kw).
    ``AvgPool2d(kernel_size, stride=None, padding=0)``: see :class:`_Pool2d`."""

    def forward(self, x: np.ndarray) -> np.ndarray:
        _xp, offsets = self._offsets(x, 0)
        total = offsets[0].copy(order="K")
        for v in offsets[1:]:
            total += v
        total *= total.dtype.type(1 / len(offsets))
        return total

    def backward(self, dout: np.ndarray, need_dx: bool = True) -> np.ndarray | None:
        if not need_dx:
            return None
        share = dout * dout.dtype.type(1 / (self.kernel[0] * self.kernel[1]))
        return self._scatter(array_module(dout), [share] * (self.kernel[0] * self.kernel[1]), dout.dtype)
