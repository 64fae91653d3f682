"""Adamax (Kingma & Ba, 2015, section 7.1), as ``torch.optim.Adamax``.

    g    = -grad if maximize else grad
    g   += weight_decay * p                        (only when weight_decay != 0, as torch)
    m    = beta1 * m + (1 - beta1) * g
    u    = max(beta2 * u, |g| + eps)                (NaN if either is NaN, as torch.maximum)
    p   -= lr / (1 - beta1**t) * m / u
"""
import numpy as np

from . import _args
from ._engine import nan_max
from ._rule import BETAS_SAMPLE, WEIGHT_DECAY_SAMPLE, Hyper, Rule, State


def adamax_math(p, g, exp_avg, exp_inf, beta1, one_minus_beta1, beta2, clr, eps, weight_decay, maximize, coupled):
    if maximize:
        g = -g
    if coupled:  # torch skips a zero decay: 0 * p is NaN for an inf or NaN p
        g = g + weight_decay * p
    exp_avg = beta1 * exp_avg + one_minus_beta1 * g
    exp_inf = nan_max(beta2 * exp_inf, abs(g) + eps)
    return p - clr * exp_avg / exp_inf, exp_avg, exp_inf


def scalars(h, step, lr):
    return {"clr": lr / (1 - h["betas"][0] ** step)}


def constants(h):
    beta1, beta2 = h["betas"]
    return {"beta1": beta1, "one_minus_beta1": 1 - beta1, "beta2": beta2, "eps": h["eps"],
            "weight_decay": h["weight_decay"], "maximize": bool(h["maximize"]), "coupled": h["weight_decay"] != 0}


ADAMAX = Rule(
    "adamax", adamax_math, scalars, constants=constants,
    states=[State("exp_avg"), State("exp_inf")],
    hyper=[Hyper("lr", 2e-3, _args.lr, sample=("log", 1e-4, 1e-2)),
           Hyper("betas", (0.9, 0.999), _args.betas, sample=BETAS_SAMPLE),
           Hyper("eps", 1e-8, _args.eps, sample=("log", 1e-8, 1e-5)),
           Hyper("weight_decay", 0.0, _args.nonneg_of("weight_decay"), sample=WEIGHT_DECAY_SAMPLE),
           Hyper("maximize", False, keyword=True)])

adamax_ = ADAMAX.function("adamax_", "One Adamax step in place on ``param``, ``exp_avg`` and ``exp_inf``.")


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
