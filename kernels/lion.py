"""Lion (Chen et al., 2023, "Symbolic Discovery of Optimization Algorithms").

    g    = -grad if maximize else grad
    p   *= 1 - lr * weight_decay                   (only when weight_decay != 0)
    p   -= lr * sign(beta1 * m + (1 - beta1) * g)
    m    = beta2 * m + (1 - beta2) * g
"""
import numpy as np

from . import _args
from ._rule import BETAS_SAMPLE, WEIGHT_DECAY_SAMPLE, Hyper, Rule, State


def lion_math(p, g, exp_avg, lr, beta1, one_minus_beta1, beta2, one_minus_beta2, decay, zero, maximize, decoupled):
    if maximize:
        g = -g
    direction = beta1 * exp_avg + one_minus_beta1 * g
    # `zero` comes from the host in the arrays' dtype: a literal 0 would compare in float64
    step = lr if direction > zero else (-lr if direction < zero else zero)
    if decoupled:  # as the other rules: no decay term at all when the decay is 0
        p = p * decay
    return p - step, beta2 * exp_avg + one_minus_beta2 * g


def scalars(h, step, lr):
    return {"lr": lr, "decay": 1 - lr * h["weight_decay"]}


def constants(h):
    beta1, beta2 = h["betas"]
    return {"beta1": beta1, "one_minus_beta1": 1 - beta1, "beta2": beta2, "one_minus_beta2": 1 - beta2,
            "zero": 0.0, "maximize": bool(h["maximize"]), "decoupled": h["weight_decay"] != 0}


LION = Rule(
    "lion", lion_math, scalars, constants=constants,
    states=[State("exp_avg")],
    hyper=[Hyper("lr", 1e-4, _args.lr, sample=("log", 1e-4, 1e-2)),
           Hyper("betas", (0.9, 0.99), _args.betas, sample=BETAS_SAMPLE),
           Hyper("weight_decay", 0.0, _args.nonneg_of("weight_decay"), sample=WEIGHT_DECAY_SAMPLE),
           Hyper("maximize", False, keyword=True)])

lion_ = LION.function("lion_", "One Lion step in place on ``param`` and ``exp_avg``.")


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
