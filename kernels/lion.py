"""Lion (Chen et al., 2023, "Symbolic Discovery of Optimization Algorithms").

    g    = -grad if maximize else grad
    p   *= 1 - lr * weight_decay                   (only when weight_decay != 0)
    p   -= lr * sign(beta1 * m + (1 - beta1) * g)
    m    = beta2 * m + (1 - beta2) * g
"""
import numpy as np

from . import _args
from ._loops import Kernels


def lion_math(p, g, exp_avg, _1, _2, c):
    lr, beta1, one_minus_beta1, beta2, one_minus_beta2, decay, zero, maximize, decoupled = c
    if maximize:
        g = -g
    direction = beta1 * exp_avg + one_minus_beta1 * g
    # `zero` comes from the host in the arrays' dtype: a literal 0 would compare in float64
    step = lr if direction > zero else (-lr if direction < zero else zero)
    if decoupled:  # as the other rules: no decay term at all when the decay is 0
        p = p * decay
    return p - step, beta2 * exp_avg + one_minus_beta2 * g, _1, _2


KERNELS = Kernels("lion", lion_math)
STATES = ("exp_avg",)


def check(*, lr, betas, weight_decay, **_):
    _args.lr(lr)
    _args.betas(betas)
    _args.nonneg("weight_decay", weight_decay)


def scalars(*, step, lr, betas, weight_decay, maximize):
    beta1, beta2 = betas
    return (lr, beta1, 1 - beta1, beta2, 1 - beta2, 1 - lr * weight_decay, 0.0), (bool(maximize), weight_decay != 0)


def lion_(param, grad, exp_avg, *, step, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0, maximize=False):
    """One Lion step in place on ``param`` and ``exp_avg``."""
    from fastopt._dispatch import update
    hp = dict(lr=lr, betas=betas, weight_decay=weight_decay, maximize=maximize)
    check(**hp)
    _args.step(step)
    update(KERNELS, param, grad, dict(exp_avg=exp_avg), scalars(step=step, **hp))


def lion_reference(param, grad, exp_avg, *, step, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0,
                   maximize=False):
    """Lion in NumPy (float64), as in the paper's pseudo-code, the check for :func:`lion_`."""
    beta1, beta2 = betas
    g = -grad if maximize else grad
    update = np.sign(beta1 * exp_avg + (1 - beta1) * g)
    if weight_decay != 0:
        param *= 1 - lr * weight_decay
    param -= lr * update
    exp_avg[:] = beta2 * exp_avg + (1 - beta2) * g
