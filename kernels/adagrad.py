"""Adagrad (Duchi et al., 2011), as ``torch.optim.Adagrad``.

    g    = -grad if maximize else grad
    g   += weight_decay * p                        (only when weight_decay != 0, as torch)
    lr_t = lr / (1 + (t - 1) * lr_decay)
    sum += g**2
    p   -= lr_t * g / (sqrt(sum) + eps)
"""
import math

import numpy as np

from . import _args
from ._loops import Kernels


def adagrad_math(p, g, state_sum, _1, _2, c):
    clr, weight_decay, eps, maximize, coupled = c
    if maximize:
        g = -g
    if coupled:  # torch skips a zero decay: 0 * p is NaN for an inf or NaN p
        g = g + weight_decay * p
    state_sum = state_sum + g * g
    return p - clr * g / (math.sqrt(state_sum) + eps), state_sum, _1, _2


KERNELS = Kernels("adagrad", adagrad_math)
STATES = ("state_sum",)


def check(*, lr, lr_decay, weight_decay, eps, **_):
    _args.lr(lr)
    _args.nonneg("lr_decay", lr_decay)
    _args.nonneg("weight_decay", weight_decay)
    _args.eps(eps)


def scalars(*, step, lr, lr_decay, weight_decay, eps, maximize):
    return (lr / (1 + (step - 1) * lr_decay), weight_decay, eps), (bool(maximize), weight_decay != 0)


def adagrad_(param, grad, state_sum, *, step, lr=1e-2, lr_decay=0.0, weight_decay=0.0, eps=1e-10,
             maximize=False):
    """One Adagrad step in place on ``param`` and ``state_sum``."""
    from fastopt._dispatch import update
    hp = dict(lr=lr, lr_decay=lr_decay, weight_decay=weight_decay, eps=eps, maximize=maximize)
    check(**hp)
    _args.step(step)
    update(KERNELS, param, grad, dict(state_sum=state_sum), scalars(step=step, **hp))


def adagrad_reference(param, grad, state_sum, *, step, lr=1e-2, lr_decay=0.0, weight_decay=0.0,
                      eps=1e-10, maximize=False):
    """Textbook Adagrad in NumPy (float64), the check for :func:`adagrad_`."""
    g = -grad if maximize else grad
    if weight_decay != 0:
        g = g + weight_decay * param
    state_sum += g ** 2
    param -= lr / (1 + (step - 1) * lr_decay) * g / (np.sqrt(state_sum) + eps)
