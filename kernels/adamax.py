"""Adamax (Kingma & Ba, 2015, section 7.1), as ``torch.optim.Adamax``.

    g    = -grad if maximize else grad
    g   += weight_decay * p                        (only when weight_decay != 0, as torch)
    m    = beta1 * m + (1 - beta1) * g
    u    = max(beta2 * u, |g| + eps)                (NaN if either is NaN, as torch.maximum)
    p   -= lr / (1 - beta1**t) * m / u
"""
import numpy as np

from . import _args
from ._loops import Kernels, nan_max


def adamax_math(p, g, exp_avg, exp_inf, _2, c):
    beta1, one_minus_beta1, beta2, clr, eps, weight_decay, maximize, coupled = c
    if maximize:
        g = -g
    if coupled:  # torch skips a zero decay: 0 * p is NaN for an inf or NaN p
        g = g + weight_decay * p
    exp_avg = beta1 * exp_avg + one_minus_beta1 * g
    exp_inf = nan_max(beta2 * exp_inf, abs(g) + eps)
    return p - clr * exp_avg / exp_inf, exp_avg, exp_inf, _2


KERNELS = Kernels("adamax", adamax_math)
STATES = ("exp_avg", "exp_inf")


def check(*, lr, betas, eps, weight_decay, **_):
    _args.lr(lr)
    _args.eps(eps)
    _args.betas(betas)
    _args.nonneg("weight_decay", weight_decay)


def scalars(*, step, lr, betas, eps, weight_decay, maximize):
    beta1, beta2 = betas
    return (beta1, 1 - beta1, beta2, lr / (1 - beta1 ** step), eps, weight_decay), (bool(maximize), weight_decay != 0)


def adamax_(param, grad, exp_avg, exp_inf, *, step, lr=2e-3, betas=(0.9, 0.999), eps=1e-8,
            weight_decay=0.0, maximize=False):
    """One Adamax step in place on ``param``, ``exp_avg`` and ``exp_inf``."""
    from fastopt._dispatch import update
    hp = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, maximize=maximize)
    check(**hp)
    _args.step(step)
    update(KERNELS, param, grad, dict(exp_avg=exp_avg, exp_inf=exp_inf), scalars(step=step, **hp))


def adamax_reference(param, grad, exp_avg, exp_inf, *, step, lr=2e-3, betas=(0.9, 0.999), eps=1e-8,
                     weight_decay=0.0, maximize=False):
    """Textbook Adamax in NumPy (float64), the check for :func:`adamax_`."""
    beta1, beta2 = betas
    g = -grad if maximize else grad
    if weight_decay != 0:
        g = g + weight_decay * param
    exp_avg[:] = beta1 * exp_avg + (1 - beta1) * g
    exp_inf[:] = np.maximum(beta2 * exp_inf, np.abs(g) + eps)
    param -= lr / (1 - beta1 ** step) * exp_avg / exp_inf
