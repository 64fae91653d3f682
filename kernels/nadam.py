"""NAdam (Dozat, 2016), as ``torch.optim.NAdam`` (momentum decay schedule included).

    g      = -grad if maximize else grad
    g     += weight_decay * p                      (or p *= 1 - lr*weight_decay, decoupled;
                                                    neither when weight_decay == 0, as torch)
    mu_t   = beta1 * (1 - 0.5 * 0.96**(t * momentum_decay));  M_t = mu_1 * ... * mu_t
    m      = beta1 * m + (1 - beta1) * g
    v      = beta2 * v + (1 - beta2) * g**2
    denom  = sqrt(v / (1 - beta2**t)) + eps
    p     -= lr * (1 - mu_t) / (1 - M_t) * g / denom + lr * mu_{t+1} / (1 - M_t * mu_{t+1}) * m / denom

The schedule (mu_t, M_t) depends on the step only and is computed on the host.
"""
import math

import numpy as np

from . import _args
from ._loops import Kernels


def nadam_math(p, g, exp_avg, exp_avg_sq, _2, c):
    (beta1, one_minus_beta1, beta2, one_minus_beta2, inv_sqrt_bc2, eps, grad_coef, avg_coef,
     l2, decay, maximize, coupled, decoupled) = c
    if maximize:
        g = -g
    if coupled:  # torch skips a zero decay: 0 * p is NaN for an inf or NaN p
        g = g + l2 * p
    if decoupled:
        p = p * decay
    exp_avg = beta1 * exp_avg + one_minus_beta1 * g
    exp_avg_sq = beta2 * exp_avg_sq + one_minus_beta2 * g * g
    denom = math.sqrt(exp_avg_sq) * inv_sqrt_bc2 + eps
    return p - (grad_coef * g + avg_coef * exp_avg) / denom, exp_avg, exp_avg_sq, _2


KERNELS = Kernels("nadam", nadam_math)
STATES = ("exp_avg", "exp_avg_sq")


def check(*, lr, betas, eps, weight_decay, momentum_decay, **_):
    _args.lr(lr)
    _args.eps(eps)
    _args.betas(betas)
    _args.nonneg("weight_decay", weight_decay)
    _args.nonneg("momentum_decay", momentum_decay)


def mu(t, beta1, momentum_decay):
    return beta1 * (1.0 - 0.5 * 0.96 ** (t * momentum_decay))


_products = {}  # (beta1, momentum_decay) -> (t, mu_1 * ... * mu_t): steps usually come in order


def mu_product(t, beta1, momentum_decay):
    key = (beta1, momentum_decay)
    last, prod = _products.get(key, (0, 1.0))
    if last > t:
        last, prod = 0, 1.0
    for k in range(last + 1, t + 1):
        prod *= mu(k, beta1, momentum_decay)
    _products[key] = (t, prod)
    return prod


def scalars(*, step, lr, betas, eps, weight_decay, momentum_decay, decoupled_weight_decay, maximize):
    beta1, beta2 = betas
    mu_t, mu_next = mu(step, beta1, momentum_decay), mu(step + 1, beta1, momentum_decay)
    prod = mu_product(step, beta1, momentum_decay)
    l2, decay = (0.0, 1 - lr * weight_decay) if decoupled_weight_decay else (weight_decay, 1.0)
    return ((beta1, 1 - beta1, beta2, 1 - beta2, 1 / math.sqrt(1 - beta2 ** step), eps,
             lr * (1 - mu_t) / (1 - prod), lr * mu_next / (1 - prod * mu_next),
             l2, decay), (bool(maximize), weight_decay != 0 and not decoupled_weight_decay,
                          weight_decay != 0 and bool(decoupled_weight_decay)))


def nadam_(param, grad, exp_avg, exp_avg_sq, *, step, lr=2e-3, betas=(0.9, 0.999), eps=1e-8,
           weight_decay=0.0, momentum_decay=4e-3, decoupled_weight_decay=False, maximize=False):
    """One NAdam step in place on ``param``, ``exp_avg`` and ``exp_avg_sq``."""
    from fastopt._dispatch import update
    hp = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, momentum_decay=momentum_decay,
              decoupled_weight_decay=decoupled_weight_decay, maximize=maximize)
    check(**hp)
    _args.step(step)
    update(KERNELS, param, grad, dict(exp_avg=exp_avg, exp_avg_sq=exp_avg_sq), scalars(step=step, **hp))


def nadam_reference(param, grad, exp_avg, exp_avg_sq, *, step, lr=2e-3, betas=(0.9, 0.999), eps=1e-8,
                    weight_decay=0.0, momentum_decay=4e-3, decoupled_weight_decay=False, maximize=False):
    """Textbook NAdam in NumPy (float64), the check for :func:`nadam_`."""
    beta1, beta2 = betas
    g = -grad if maximize else grad
    if weight_decay != 0 and decoupled_weight_decay:
        param *= 1 - lr * weight_decay
    elif weight_decay != 0:
        g = g + weight_decay * param
    mus = [beta1 * (1 - 0.5 * 0.96 ** (k * momentum_decay)) for k in range(1, step + 2)]
    prod = float(np.prod(mus[:step]))
    exp_avg[:] = beta1 * exp_avg + (1 - beta1) * g
    exp_avg_sq[:] = beta2 * exp_avg_sq + (1 - beta2) * g ** 2
    v_hat = exp_avg_sq / (1 - beta2 ** step)
    m_bar = (1 - mus[step - 1]) / (1 - prod) * g + mus[step] / (1 - prod * mus[step]) * exp_avg
    param -= lr * m_bar / (np.sqrt(v_hat) + eps)
