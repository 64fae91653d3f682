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
from ._rule import WEIGHT_DECAY_SAMPLE, Hyper, Rule, State


def adadelta_math(p, g, square_avg, acc_delta, lr, rho, one_minus_rho, eps, weight_decay, maximize, coupled):
    if maximize:
        g = -g
    if coupled:  # torch skips a zero decay: 0 * p is NaN for an inf or NaN p
        g = g + weight_decay * p
    square_avg = rho * square_avg + one_minus_rho * g * g
    delta = math.sqrt(acc_delta + eps) / math.sqrt(square_avg + eps) * g
    acc_delta = rho * acc_delta + one_minus_rho * delta * delta
    return p - lr * delta, square_avg, acc_delta


def scalars(h, step, lr):
    return {"lr": lr}


def constants(h):
    rho = h["rho"]
    return {"rho": rho, "one_minus_rho": 1 - rho, "eps": h["eps"], "weight_decay": h["weight_decay"],
            "maximize": bool(h["maximize"]), "coupled": h["weight_decay"] != 0}


ADADELTA = Rule(
    "adadelta", adadelta_math, scalars, constants=constants,
    states=[State("square_avg"), State("acc_delta")],
    hyper=[Hyper("lr", 1.0, _args.lr, sample=("uniform", 0.1, 1.0)),
           Hyper("rho", 0.9, _args.unit_of("rho"), sample=("uniform", 0.8, 0.99)),
           Hyper("eps", 1e-6, _args.eps, sample=("log", 1e-7, 1e-5)),
           Hyper("weight_decay", 0.0, _args.nonneg_of("weight_decay"), sample=WEIGHT_DECAY_SAMPLE),
           Hyper("maximize", False, keyword=True)])

adadelta_ = ADADELTA.function("adadelta_", "One Adadelta step in place on ``param``, ``square_avg`` and ``acc_delta``.")


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
