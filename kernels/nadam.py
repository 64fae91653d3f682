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
from numba.extending import register_jitable

from . import _args
from ._rule import BETAS_SAMPLE, WEIGHT_DECAY_SAMPLE, Hyper, Rule, Running, State
from .adam import adam_moments


@register_jitable  # a piece of math: RAdam's starts the same way (the same bits)
def decayed_moments(p, g, exp_avg, exp_avg_sq, beta1, one_minus_beta1, beta2, one_minus_beta2, l2, decay,
                    maximize, coupled, decoupled):
    """The decayed parameter, the gradient as the step sees it, and the new moments."""
    if maximize:
        g = -g
    if coupled:  # torch skips a zero decay: 0 * p is NaN for an inf or NaN p
        g = g + l2 * p
    if decoupled:
        p = p * decay
    exp_avg, exp_avg_sq = adam_moments(g, exp_avg, exp_avg_sq, beta1, one_minus_beta1, beta2, one_minus_beta2)
    return p, g, exp_avg, exp_avg_sq


def nadam_math(p, g, exp_avg, exp_avg_sq, beta1, one_minus_beta1, beta2, one_minus_beta2, inv_sqrt_bc2, eps,
               grad_coef, avg_coef, l2, decay, maximize, coupled, decoupled):
    p, g, exp_avg, exp_avg_sq = decayed_moments(p, g, exp_avg, exp_avg_sq, beta1, one_minus_beta1, beta2,
                                                one_minus_beta2, l2, decay, maximize, coupled, decoupled)
    denom = math.sqrt(exp_avg_sq) * inv_sqrt_bc2 + eps
    return p - (grad_coef * g + avg_coef * exp_avg) / denom, exp_avg, exp_avg_sq


def mu(t, beta1, momentum_decay):
    return beta1 * (1.0 - 0.5 * 0.96 ** (t * momentum_decay))


_products = {}  # (beta1, momentum_decay) -> (t, mu_1 * ... * mu_t): steps usually come in order


def mu_product(t, beta1, momentum_decay):
    key = (beta1, momentum_decay)
    last, prod = _products.get(key, (0, 1.0))
    if last > t:
        last, prod = 0, 1.0
    for k in range(last + 1, t + 1):
        new = prod * mu(k, beta1, momentum_decay)
        if new == prod:  # underflowed to its last denormal (thousands of steps): it stays there
            break
        prod = new
    _products[key] = (t, prod)
    return prod


def advance_mu_product(h, step, prod):
    """torch's running product after update ``step``: ``prod * mu_step`` at the beta1 and
    momentum_decay of that step (edited mid-run, as OneCycleLR cycles beta1, the earlier
    factors stay as they were)."""
    return prod * mu(step, h["betas"][0], h["momentum_decay"])


def scalars(h, step, lr):
    """``h["mu_product"]``: mu_1 * ... * mu_step as the optimizer carried it (Running); the
    in-place function, which carries nothing, takes the product at constant hyper-parameters."""
    beta1, beta2 = h["betas"]
    momentum_decay = h["momentum_decay"]
    mu_t, mu_next = mu(step, beta1, momentum_decay), mu(step + 1, beta1, momentum_decay)
    prod = h["mu_product"] if "mu_product" in h else mu_product(step, beta1, momentum_decay)
    return {"inv_sqrt_bc2": 1 / math.sqrt(1 - beta2 ** step), "grad_coef": lr * (1 - mu_t) / (1 - prod),
            "avg_coef": lr * mu_next / (1 - prod * mu_next),
            "decay": 1 - lr * h["weight_decay"] if h["decoupled_weight_decay"] else 1.0}


def constants(h):
    beta1, beta2 = h["betas"]
    weight_decay, decoupled = h["weight_decay"], bool(h["decoupled_weight_decay"])
    return {"beta1": beta1, "one_minus_beta1": 1 - beta1, "beta2": beta2, "one_minus_beta2": 1 - beta2,
            "eps": h["eps"], "l2": 0.0 if decoupled else weight_decay, "maximize": bool(h["maximize"]),
            "coupled": weight_decay != 0 and not decoupled, "decoupled": weight_decay != 0 and decoupled}


NADAM = Rule(
    "nadam", nadam_math, scalars, constants=constants,
    states=[State("exp_avg"), State("exp_avg_sq")],
    hyper=[Hyper("lr", 2e-3, _args.lr, sample=("log", 1e-4, 1e-2)),
           Hyper("betas", (0.9, 0.999), _args.betas, sample=BETAS_SAMPLE),
           Hyper("eps", 1e-8, _args.eps, sample=("log", 1e-8, 1e-5)),
           Hyper("weight_decay", 0.0, _args.nonneg_of("weight_decay"), sample=WEIGHT_DECAY_SAMPLE),
           Hyper("momentum_decay", 4e-3, _args.nonneg_of("momentum_decay"), sample=("uniform", 1e-3, 1e-2)),
           Hyper("decoupled_weight_decay", False), Hyper("maximize", False, keyword=True)],
    running={"mu_product": Running(lambda h, t: mu_product(t, h["betas"][0], h["momentum_decay"]),
                                   advance_mu_product)})

nadam_ = NADAM.function("nadam_", "One NAdam step in place on ``param``, ``exp_avg`` and ``exp_avg_sq``.")


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
