"""Losses and the L2 penalty. Each loss is one call, ``loss, dpred = loss_fn(pred, target)``:
the mean loss over the batch (a 0-d array on the prediction's device: ``float(loss)``
synchronizes, so call it only when the value is needed) and its gradient with respect to
``pred``, ready for ``model.backward(dpred)``. One call because the forward quantities
(softmax, residuals) are exactly what the gradient needs.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from ._array import array_module

if TYPE_CHECKING:
    import numpy as np

    from ..buffer import ParamBuffer


def _check_same_shape(pred: np.ndarray, target: np.ndarray) -> None:
    if pred.shape != target.shape:
        raise ValueError(f"target must have the shape of pred {pred.shape}, got {target.shape}")


def softmax_cross_entropy(logits: np.ndarray, target: np.ndarray, *,
                          check_labels: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Mean cross-entropy of softmax(logits) (N, K) against integer class labels (N,).

        L = 1/N sum_i [ logsumexp(z_i) - z_i[y_i] ],   dL/dz_i = (softmax(z_i) - onehot(y_i)) / N

    Stable for any logits: z is shifted by its row maximum before exp, so exp never overflows
    and the log-sum-exp is at least 0. ``check_labels`` scans the labels for 0 <= y < K (an
    index out of range would wrap around silently; on CuPy the scan is a device sync; default
    True): a training loop whose labels were validated once at load passes False.
    Returns ``(loss, dlogits)``.
    """
    xp = array_module(logits)
    if logits.ndim != 2:
        raise ValueError(f"logits must have shape (N, K), got {logits.shape}")
    target = xp.asarray(target)
    if target.shape != logits.shape[:1] or target.dtype.kind not in "iu":
        raise ValueError(f"target must be integer class labels of shape ({logits.shape[0]},), "
                         f"got {target.dtype} {target.shape}")
    if check_labels and target.size:
        low, high = int(target.min()), int(target.max())
        if low < 0 or high >= logits.shape[1]:
            raise ValueError(f"target labels must be in [0, {logits.shape[1]}), got [{low}, {high}]")
    n = logits.shape[0]
    rows = xp.arange(n)
    z = logits - logits.max(axis=1, keepdims=True)
    ez = xp.exp(z)
    total = ez.sum(axis=1)
    loss = (xp.log(total) - z[rows, target]).mean()
    grad = ez / (total[:, None] * n)
    grad[rows, target] -= logits.dtype.type(1 / n)
    return loss, grad


def mse_loss(pred: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean squared error over every element: L = mean((p - t)^2), dL/dp = 2 (p - t) / p.size.
    ``target`` has the shape of ``pred``. Returns ``(loss, dpred)``."""
    _check_same_shape(pred, target)
    diff = pred - target
    return (diff * diff).mean(), diff * pred.dtype.type(2 / diff.size)


def mae_loss(pred: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean absolute error over every element: L = mean|p - t|, dL/dp = sign(p - t) / p.size
    (0 where p == t, as PyTorch's L1Loss). ``target`` has the shape of ``pred``. Returns
    ``(loss, dpred)``."""
    _check_same_shape(pred, target)
    diff = pred - target
    xp = array_module(diff)
    return xp.abs(diff).mean(), xp.sign(diff) * pred.dtype.type(1 / diff.size)


def l2_penalty(buffer: ParamBuffer, strength: float, *, weights_only: bool = True) -> np.ndarray:
    """The lecture notes' L2 regularizer R = strength * sum_j theta_j^2, added to the loss.

    Adds dR/dtheta = 2 * strength * theta into ``buffer.grads`` IN PLACE, so call it after
    ``model.backward`` (which overwrites the gradients), and returns R (0-d array).
    ``weights_only=True`` (the default) penalizes the parameters of 2 or more dimensions (Linear and Conv
    weights), not biases or BatchNorm's gamma and beta; False penalizes the whole arena
    in one pass (its padding is zero and adds nothing).
    """
    if not strength >= 0:
        raise ValueError(f"strength must be >= 0, got {strength!r}")
    xp = array_module(buffer.arena)
    pairs = ([(buffer.arena, buffer.grad_arena)] if not weights_only else
             [(p, g) for p, g in zip(buffer.params, buffer.grads) if p.ndim >= 2])
    # a 16-bit sum stalls (bfloat16: 256 + 1 == 256): add up 16-bit squares in float32
    total = xp.zeros((), xp.promote_types(buffer.dtype, xp.float32))
    for p, g in pairs:
        q = p.astype(total.dtype, copy=False)
        total += (q * q).sum()
        g += (2 * strength) * p
    return strength * total
