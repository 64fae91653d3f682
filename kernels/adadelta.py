"""Adadelta (Zeiler, 2012), as ``torch.optim.Adadelta``.

    g      = -grad if maximize else grad
    g     += weight_decay * p                      (only when weight_decay != 0, as torch)
    sq     = rho * sq + (1 - rho) * g**2
    delta  = sqrt(acc + eps) / sqrt(sq + eps) * g
    acc    = rho * acc + (1 - rho) * delta**2
    p     -= lr * delta
"""
import math

import numpy as np

from . import _args
from ._loops import Kernels


def adadelta_math(p, g, square_avg, acc_delta, _2, c):
    lr, rho, one_minus_rho, eps, weight_decay, maximize, coupled = c
    if maximize:
        g = -g
    if coupled:  # torch skips a zero decay: 0 * p is NaN for an inf or NaN p
        g = g + weight_decay * p
    square_avg = rho * square_avg + one_minus_rho * g * g
    delta = math.sqrt(acc_delta + eps) / math.sqrt(square_avg + eps) * g
    acc_delta = rho * acc_delta + one_minus_rho * delta * delta
    return p - lr * delta, square_avg, acc_delta, _2


KERNELS = Kernels("adadelta", adadelta_math)
STATES = ("square_avg", "acc_delta")


def check(*, lr, rho, eps, weight_decay, **_):
    _args.lr(lr)
    _args.unit("rho", rho)
    _args.eps(eps)
    _args.nonneg("weight_decay", weight_decay)


def scalars(*, step, lr, rho, eps, weight_decay, maximize):
    return (lr, rho, 1 - rho, eps, weight_decay), (bool(maximize), weight_decay != 0)


def adadelta_(param, grad, square_avg, acc_delta, *, step, lr=1.0, rho=0.9, eps=1e-6,
              weight_decay=0.0, maximize=False):
    """One Adadelta step in place on ``param``, ``square_avg`` and ``acc_delta``."""
    from fastopt._dispatch import update
    hp = dict(lr=lr, rho=rho, eps=eps, weight_decay=weight_decay, maximize=maximize)
    check(**hp)
    _args.step(step)
    update(KERNELS, param, grad, dict(square_avg=square_avg, acc_delta=acc_delta),
           scalars(step=step, **hp))


def adadelta_reference(param, grad, square_avg, acc_delta, *, step, lr=1.0, rho=0.9, eps=1e-6,
                       weight_decay=0.0, maximize=False):
    """Textbook Adadelta in NumPy (float64), the check for :func:`adadelta_`."""
    g = -grad if maximize else grad
    if weight_decay != 0:
        g = g + weight_decay * param
    square_avg[:] = rho * square_avg + (1 - rho) * g ** 2
    delta = np.sqrt(acc_delta + eps) / np.sqrt(square_avg + eps) * g
    acc_delta[:] = rho * acc_delta + (1 - rho) * delta ** 2
    param -= lr * delta
