"""SGD with momentum, dampening and Nesterov, as ``torch.optim.SGD``.

    g    = -grad if maximize else grad
    g   += weight_decay * p                        (only when weight_decay != 0, as torch)
    b    = g                                        (first step: the buffer starts as g)
    b    = momentum * b + (1 - dampening) * g       (later steps)
    d    = g + momentum * b if nesterov else b      (d = g when momentum == 0)
    p   -= lr * d

L1 (the lecture notes' lambda * |w|_1), ``l1_mode="subgradient"``: ``g += l1 * sign(p)``
before the momentum; ``"proximal"``: after the step, the soft threshold
``p = sign(p) * max(|p| - lr * l1, 0)``, which sets small weights to exactly zero.
"""
import math

import numpy as np
from numba.extending import register_jitable

from . import _args
from ._rule import WEIGHT_DECAY_SAMPLE, Hyper, Rule, State


@register_jitable  # a piece of math: LARS calls it too, on its ratio-scaled gradient
def sgd_momentum(g, momentum_buffer, momentum, one_minus_dampening, use_momentum, first, nesterov):
    """The step direction and the new momentum buffer from the gradient ``g``."""
    if use_momentum:
        if first:
            momentum_buffer = g
        else:
            momentum_buffer = momentum * momentum_buffer + one_minus_dampening * g
        d = g + momentum * momentum_buffer if nesterov else momentum_buffer
    else:
        d = g
    return d, momentum_buffer


def sgd_math(p, g, momentum_buffer, lr, weight_decay, momentum, one_minus_dampening, l1, threshold, zero,
             use_momentum, first, nesterov, maximize, coupled, l1_subgradient, proximal):
    if maximize:
        g = -g
    if coupled:  # torch skips a zero decay: 0 * p is NaN for an inf or NaN p
        g = g + weight_decay * p
    if l1_subgradient:
        g = g + (l1 if p > zero else -l1 if p < zero else zero)
    d, momentum_buffer = sgd_momentum(g, momentum_buffer, momentum, one_minus_dampening, use_momentum, first, nesterov)
    p = p - lr * d
    if proximal:
        shrunk = abs(p) - threshold
        p = math.copysign(shrunk, p) if shrunk > zero else zero
    return p, momentum_buffer


def scalars(h, step, lr):
    return {"lr": lr, "threshold": lr * h["l1"], "first": step == 1}


def constants(h):
    l1, weight_decay = h["l1"], h["weight_decay"]
    return {"weight_decay": weight_decay, "momentum": h["momentum"], "one_minus_dampening": 1 - h["dampening"],
            "l1": l1, "zero": 0.0, "use_momentum": h["momentum"] != 0, "nesterov": bool(h["nesterov"]),
            "maximize": bool(h["maximize"]), "coupled": weight_decay != 0,
            "l1_subgradient": l1 > 0 and h["l1_mode"] == "subgradient",
            "proximal": l1 > 0 and h["l1_mode"] == "proximal"}


def _check(h):
    if h["nesterov"] and (h["momentum"] <= 0 or h["dampening"] != 0):
        raise ValueError("Nesterov momentum requires a momentum and zero dampening")


def _finite_dampening(value):
    if not -math.inf < value < math.inf:
        raise ValueError(f"Invalid dampening value: {value}")


SGD = Rule(
    "sgd", sgd_math, scalars, constants=constants,
    states=[State("momentum_buffer", lambda h: h["momentum"] != 0, "when momentum != 0")],
    hyper=[Hyper("lr", 1e-3, _args.lr),
           Hyper("momentum", 0.0, _args.nonneg_of("momentum"), sample=("uniform", 0.5, 0.99)),
           Hyper("dampening", 0.0, _finite_dampening, sample=("uniform", 0.0, 0.5)),
           Hyper("weight_decay", 0.0, _args.nonneg_of("weight_decay"), sample=WEIGHT_DECAY_SAMPLE),
           Hyper("nesterov", False), Hyper("maximize", False, keyword=True),
           Hyper("l1", 0.0, _args.nonneg_of("l1"), keyword=True, torch=False, sample=("uniform", 1e-3, 1e-1)),
           Hyper("l1_mode", "subgradient", _args.l1_mode, keyword=True, torch=False,
                 sample=("choice", *_args.L1_MODES))],
    check=_check,
    start_from_grad=("momentum_buffer",))  # as torch: momentum turned on mid-run starts from g

sgd_ = SGD.function("sgd_", """One SGD step in place. At ``step == 1`` the momentum buffer is set to the gradient
    (its content is ignored), as PyTorch does when the buffer does not exist yet.""")


def sgd_reference(param, grad, momentum_buffer=None, *, step, lr, momentum=0.0, dampening=0.0,
                  weight_decay=0.0, nesterov=False, maximize=False, l1=0.0, l1_mode="subgradient"):
    """Textbook SGD with momentum in NumPy (float64), the check for :func:`sgd_`."""
    g = -grad if maximize else grad
    if weight_decay != 0:
        g = g + weight_decay * param
    if l1_mode == "subgradient":
        g = g + l1 * np.sign(param)
    if momentum != 0:
        if step == 1:
            momentum_buffer[:] = g
        else:
            momentum_buffer[:] = momentum * momentum_buffer + (1 - dampening) * g
        g = g + momentum * momentum_buffer if nesterov else momentum_buffer
    param -= lr * g
    if l1_mode == "proximal":
        param[:] = np.sign(param) * np.maximum(np.abs(param) - lr * l1, 0.0)
