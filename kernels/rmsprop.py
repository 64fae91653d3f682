"""RMSprop (Hinton, 2012), plain, centered and with momentum, as ``torch.optim.RMSprop``.

    g     = -grad if maximize else grad
    g    += weight_decay * p                       (only when weight_decay != 0, as torch)
    sq    = alpha * sq + (1 - alpha) * g**2
    ga    = alpha * ga + (1 - alpha) * g             (centered)
    avg   = sqrt(sq - ga**2) if centered else sqrt(sq)
    b     = momentum * b + g / (avg + eps)           (momentum > 0: p -= lr * b)
    p    -= lr * g / (avg + eps)                     (otherwise)
"""
import math

import numpy as np

from . import _args
from ._rule import WEIGHT_DECAY_SAMPLE, Hyper, Rule, State


def rmsprop_math(p, g, square_avg, momentum_buffer, grad_avg, lr, alpha, one_minus_alpha, eps, weight_decay, momentum,
                 use_momentum, centered, maximize, coupled):
    if maximize:
        g = -g
    if coupled:  # torch skips a zero decay: 0 * p is NaN for an inf or NaN p
        g = g + weight_decay * p
    square_avg = alpha * square_avg + one_minus_alpha * g * g
    if centered:
        grad_avg = alpha * grad_avg + one_minus_alpha * g
        avg = math.sqrt(square_avg - grad_avg * grad_avg) + eps
    else:
        avg = math.sqrt(square_avg) + eps
    if use_momentum:
        momentum_buffer = momentum * momentum_buffer + g / avg
        p = p - lr * momentum_buffer
    else:
        p = p - lr * g / avg
    return p, square_avg, momentum_buffer, grad_avg


def scalars(h, step, lr):
    return {"lr": lr}


def constants(h):
    alpha = h["alpha"]
    return {"alpha": alpha, "one_minus_alpha": 1 - alpha, "eps": h["eps"], "weight_decay": h["weight_decay"],
            "momentum": h["momentum"], "use_momentum": h["momentum"] > 0, "centered": bool(h["centered"]),
            "maximize": bool(h["maximize"]), "coupled": h["weight_decay"] != 0}


RMSPROP = Rule(
    "rmsprop", rmsprop_math, scalars, constants=constants,
    states=[State("square_avg"), State("momentum_buffer", lambda h: h["momentum"] > 0, "when momentum > 0"),
            State("grad_avg", lambda h: h["centered"], "when centered=True")],
    hyper=[Hyper("lr", 1e-2, _args.lr, sample=("uniform", 1e-3, 1e-2)),
           Hyper("alpha", 0.99, _args.unit_of("alpha"), sample=("uniform", 0.8, 0.999)),
           Hyper("eps", 1e-8, _args.eps, sample=("log", 1e-8, 1e-4)),
           Hyper("weight_decay", 0.0, _args.nonneg_of("weight_decay"), sample=WEIGHT_DECAY_SAMPLE),
           Hyper("momentum", 0.0, _args.nonneg_of("momentum"), sample=("uniform", 0.5, 0.95)), Hyper("centered", False),
           Hyper("maximize", False, keyword=True)])

rmsprop_ = RMSPROP.function("rmsprop_", """One RMSprop step in place. ``momentum_buffer`` is needed when
    ``momentum > 0``, ``grad_avg`` when ``centered``; both start as zeros, as in PyTorch.""")


def rmsprop_reference(param, grad, square_avg, momentum_buffer=None, grad_avg=None, *, step, lr=1e-2,
                      alpha=0.99, eps=1e-8, weight_decay=0.0, momentum=0.0, centered=False,
                      maximize=False):
    """Textbook RMSprop in NumPy (float64), the check for :func:`rmsprop_`."""
    g = -grad if maximize else grad
    if weight_decay != 0:
        g = g + weight_decay * param
    square_avg[:] = alpha * square_avg + (1 - alpha) * g ** 2
    if centered:
        grad_avg[:] = alpha * grad_avg + (1 - alpha) * g
        rms = np.sqrt(square_avg - grad_avg ** 2)
    else:
        rms = np.sqrt(square_avg)
    if momentum > 0:
        momentum_buffer[:] = momentum * momentum_buffer + g / (rms + eps)
        param -= lr * momentum_buffer
    else:
        param -= lr * g / (rms + eps)
