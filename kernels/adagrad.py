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
from ._rule import WEIGHT_DECAY_SAMPLE, Hyper, Rule, State


def adagrad_math(p, g, state_sum, clr, weight_decay, eps, maximize, coupled):
    if maximize:
        g = -g
    if coupled:  # torch skips a zero decay: 0 * p is NaN for an inf or NaN p
        g = g + weight_decay * p
    state_sum = state_sum + g * g
    return p - clr * g / (math.sqrt(state_sum) + eps), state_sum


def scalars(h, step, lr):
    return {"clr": lr / (1 + (step - 1) * h["lr_decay"])}


def constants(h):
    return {"weight_decay": h["weight_decay"], "eps": h["eps"], "maximize": bool(h["maximize"]),
            "coupled": h["weight_decay"] != 0}


ADAGRAD = Rule(
    "adagrad", adagrad_math, scalars, constants=constants,
    states=[State("state_sum", start="initial_accumulator_value", torch_name="sum")],
    hyper=[Hyper("lr", 1e-2, _args.lr, sample=("uniform", 1e-3, 1e-1)),
           Hyper("lr_decay", 0.0, _args.nonneg_of("lr_decay"), sample=("uniform", 0.0, 0.1)),
           Hyper("weight_decay", 0.0, _args.nonneg_of("weight_decay"), sample=WEIGHT_DECAY_SAMPLE),
           Hyper("initial_accumulator_value", 0.0, _args.nonneg_of("initial_accumulator_value")),
           Hyper("eps", 1e-10, _args.eps, sample=("log", 1e-10, 1e-6)), Hyper("maximize", False, keyword=True)])

adagrad_ = ADAGRAD.function("adagrad_", "One Adagrad step in place on ``param`` and ``state_sum``.")


def adagrad_reference(param, grad, state_sum, *, step, lr=1e-2, lr_decay=0.0, weight_decay=0.0,
                      eps=1e-10, maximize=False):
    """Textbook Adagrad in NumPy (float64), the check for :func:`adagrad_`."""
    g = -grad if maximize else grad
    if weight_decay != 0:
        g = g + weight_decay * param
    state_sum += g ** 2
    param -= lr / (1 + (step - 1) * lr_decay) * g / (np.sqrt(state_sum) + eps)
