"""SGD with momentum, dampening and Nesterov, as ``torch.optim.SGD``.

    g    = -grad if maximize else grad
    g   += weight_decay * p                        (only when weight_decay != 0, as torch)
    b    = g                                        (first step: the buffer starts as g)
    b    = momentum * b + (1 - dampening) * g       (later steps)
    d    = g + momentum * b if nesterov else b      (d = g when momentum == 0)
    p   -= lr * d

L1 (the lecture notes' lambda * |w|_1), ``l1_mode="subgradient"``: ``g += l1 * sign(p)``
before the momentum; ``"proximal"``: after the step, the soft threshold
``p = sign(p) * max(|p| - lr * l1, 0)``, which sets small weights to exactly zero.
"""
import math

import numpy as np

from . import _args
from ._loops import Kernels


def sgd_math(p, g, momentum_buffer, _1, _2, c):
    (lr, weight_decay, momentum, one_minus_dampening, l1, threshold, zero,
     use_momentum, first, nesterov, maximize, coupled, l1_subgradient, proximal) = c
    if maximize:
        g = -g
    if coupled:  # torch skips a zero decay: 0 * p is NaN for an inf or NaN p
        g = g + weight_decay * p
    if l1_subgradient:
        g = g + (l1 if p > zero else -l1 if p < zero else zero)
    if use_momentum:
        if first:
            momentum_buffer = g
        else:
            momentum_buffer = momentum * momentum_buffer + one_minus_dampening * g
        d = g + momentum * momentum_buffer if nesterov else momentum_buffer
    else:
        d = g
    p = p - lr * d
    if proximal:
        shrunk = abs(p) - threshold
        p = math.copysign(shrunk, p) if shrunk > zero else zero
    return p, momentum_buffer, _1, _2


KERNELS = Kernels("sgd", sgd_math)
STATES = ("momentum_buffer",)


def check(*, lr, momentum, dampening, weight_decay, nesterov, l1=0.0, l1_mode="subgradient", **_):
    _args.lr(lr)
    _args.l1(l1, l1_mode)
    _args.nonneg("momentum", momentum)
    _args.nonneg("weight_decay", weight_decay)
    if not -math.inf < dampening < math.inf:
        raise ValueError(f"Invalid dampening value: {dampening}")
    if nesterov and (momentum <= 0 or dampening != 0):
        raise ValueError("Nesterov momentum requires a momentum and zero dampening")


def scalars(*, step, lr, momentum, dampening, weight_decay, nesterov, maximize, l1=0.0, l1_mode="subgradient"):
    return ((lr, weight_decay, momentum, 1 - dampening, l1, lr * l1, 0.0),
            (momentum != 0, step == 1, bool(nesterov), bool(maximize), weight_decay != 0,
             l1 > 0 and l1_mode == "subgradient",
             l1 > 0 and l1_mode == "proximal"))


def sgd_(param, grad, momentum_buffer=None, *, step, lr, momentum=0.0, dampening=0.0,
         weight_decay=0.0, nesterov=False, maximize=False, l1=0.0, l1_mode="subgradient"):
    """One SGD step in place. At ``step == 1`` the momentum buffer is set to the gradient
    (its content is ignored), as PyTorch does when the buffer does not exist yet."""
    from fastopt._dispatch import update
    hp = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
              nesterov=nesterov, maximize=maximize, l1=l1, l1_mode=l1_mode)
    check(**hp)
    _args.step(step)
    if momentum != 0:
        _args.required("momentum_buffer", momentum_buffer, "when momentum != 0")
    else:
        momentum_buffer = None
    update(KERNELS, param, grad, dict(momentum_buffer=momentum_buffer), scalars(step=step, **hp))


def sgd_reference(param, grad, momentum_buffer=None, *, step, lr, momentum=0.0, dampening=0.0,
                  weight_decay=0.0, nesterov=False, maximize=False, l1=0.0, l1_mode="subgradient"):
    """Textbook SGD with momentum in NumPy (float64), the check for :func:`sgd_`."""
    g = -grad if maximize else grad
    if weight_decay != 0:
        g = g + weight_decay * param
    if l1_mode == "subgradient":
        g = g + l1 * np.sign(param)
    if momentum != 0:
        if step == 1:
            momentum_buffer[:] = g
        else:
            momentum_buffer[:] = momentum * momentum_buffer + (1 - dampening) * g
        g = g + momentum * momentum_buffer if nesterov else momentum_buffer
    param -= lr * g
    if l1_mode == "proximal":
        param[:] = np.sign(param) * np.maximum(np.abs(param) - lr * l1, 0.0)
