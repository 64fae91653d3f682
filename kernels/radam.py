"""RAdam (Liu et al., 2020), as ``torch.optim.RAdam``.

    g      = -grad if maximize else grad
    g     += weight_decay * p                      (or p *= 1 - lr*weight_decay, decoupled;
                                                    neither when weight_decay == 0, as torch)
    m      = beta1 * m + (1 - beta1) * g
    v      = beta2 * v + (1 - beta2) * g**2
    rho_inf = 2 / (1 - beta2) - 1;   rho_t = rho_inf - 2 t beta2**t / (1 - beta2**t)
    r_t    = sqrt((rho_t - 4)(rho_t - 2) rho_inf / ((rho_inf - 4)(rho_inf - 2) rho_t))
    p     -= lr * m / (1 - beta1**t) * r_t * sqrt(1 - beta2**t) / (sqrt(v) + eps)   if rho_t > 5
    p     -= lr * m / (1 - beta1**t)                                              otherwise

Whether the step is rectified, and r_t, depend on t only: computed on the host.
"""
import math

import numpy as np

from . import _args
from ._rule import BETAS_SAMPLE, WEIGHT_DECAY_SAMPLE, Hyper, Rule, State
from .nadam import constants, decayed_moments  # the same moments, eps and weight decay as NAdam


def radam_math(p, g, exp_avg, exp_avg_sq, beta1, one_minus_beta1, beta2, one_minus_beta2, coef, eps, l2, decay,
               rectify, maximize, coupled, decoupled):
    p, g, exp_avg, exp_avg_sq = decayed_moments(p, g, exp_avg, exp_avg_sq, beta1, one_minus_beta1, beta2,
                                                one_minus_beta2, l2, decay, maximize, coupled, decoupled)
    if rectify:
        p = p - coef * exp_avg / (math.sqrt(exp_avg_sq) + eps)
    else:
        p = p - coef * exp_avg
    return p, exp_avg, exp_avg_sq


def rectification(step, beta2):
    """(rectify, r_t): the variance rectification term, defined once rho_t > 5."""
    bc2 = 1 - beta2 ** step
    rho_inf = 2 / (1 - beta2) - 1
    rho_t = rho_inf - 2 * step * beta2 ** step / bc2
    if rho_t <= 5:
        return False, 1.0
    return True, math.sqrt((rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t))


def scalars(h, step, lr):
    beta1, beta2 = h["betas"]
    rectify, r = rectification(step, beta2)
    return {"coef": lr / (1 - beta1 ** step) * (r * math.sqrt(1 - beta2 ** step) if rectify else 1.0),
            "decay": 1 - lr * h["weight_decay"] if h["decoupled_weight_decay"] else 1.0, "rectify": rectify}


RADAM = Rule(
    "radam", radam_math, scalars, constants=constants,
    states=[State("exp_avg"), State("exp_avg_sq")],
    hyper=[Hyper("lr", 1e-3, _args.lr, sample=("log", 1e-4, 1e-2)),
           Hyper("betas", (0.9, 0.999), _args.betas, sample=BETAS_SAMPLE),
           Hyper("eps", 1e-8, _args.eps, sample=("log", 1e-8, 1e-5)),
           Hyper("weight_decay", 0.0, _args.nonneg_of("weight_decay"), sample=WEIGHT_DECAY_SAMPLE),
           Hyper("decoupled_weight_decay", False), Hyper("maximize", False, keyword=True)])

radam_ = RADAM.function("radam_", "One RAdam step in place on ``param``, ``exp_avg`` and ``exp_avg_sq``.")


def radam_reference(param, grad, exp_avg, exp_avg_sq, *, step, lr=1e-3, betas=(0.9, 0.999), eps=1e-8,
                    weight_decay=0.0, decoupled_weight_decay=False, maximize=False):
    """Textbook RAdam in NumPy (float64), the check for :func:`radam_`."""
    beta1, beta2 = betas
    g = -grad if maximize else grad
    if weight_decay != 0 and decoupled_weight_decay:
        param *= 1 - lr * weight_decay
    elif weight_decay != 0:
        g = g + weight_decay * param
    exp_avg[:] = beta1 * exp_avg + (1 - beta1) * g
    exp_avg_sq[:] = beta2 * exp_avg_sq + (1 - beta2) * g ** 2
    m_hat = exp_avg / (1 - beta1 ** step)
    rho_inf = 2 / (1 - beta2) - 1
    rho_t = rho_inf - 2 * step * beta2 ** step / (1 - beta2 ** step)
    if rho_t > 5:
        v_hat = np.sqrt(exp_avg_sq / (1 - beta2 ** step))
        r = np.sqrt((rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t))
        # torch adds eps to sqrt(v) before bias correction: 1 / (sqrt(v_hat) + eps / sqrt(bc2))
        param -= lr * m_hat * r / (v_hat + eps / np.sqrt(1 - beta2 ** step))
    else:
        param -= lr * m_hat
