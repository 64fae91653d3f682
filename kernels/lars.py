"""LARS (You, Gitman & Ginsburg, 2017, "Large Batch Training of Convolutional Networks"),
in the PyTorch form of ``timm.optim.Lars`` (SGD + NVIDIA apex's LARC), per tensor:

    adapt  = weight_decay != 0 or always_adapt
    ratio  = trust_coeff * ||p|| / (||g|| + weight_decay * ||p|| + eps)    if adapt, else 1
             (1 where ||p|| or ||g|| is 0; trust_clip: ratio = min(ratio / lr, 1), LARC)
    d      = ratio * (g + weight_decay * p)
    b      = d                                     (first step)
    b      = momentum * b + (1 - dampening) * d    (later steps; no buffer when momentum == 0)
    d      = d + momentum * b if nesterov else b
    p     -= lr * d

The paper puts the global lr inside the momentum (``b = m b + lr * ratio * d``); timm, as
here, scales after it: the same for a constant lr. The defaults are timm's (lr=1, no
momentum, no weight decay: without ``always_adapt`` that is plain SGD); biases and norms are
kept out of the adaptation by a param group with ``weight_decay=0``.

SGD's momentum (``sgd_momentum``) on a gradient pre-scaled by the tensor's ratio. Two
passes: the norms of every p and g of a group in one segmented reduction
(``fastopt.clip.NormPlan``), then the engine's update pass over the chunk table, each
chunk reading its tensor's ratio (``_engine``'s layer forms). Float32 traffic per parameter: 8 B for the norms, then
p, g read and p written (12 B), plus the buffer read and written with momentum (8 B): 28 B
with momentum, 20 B without; a group that does not adapt skips the norms.
"""
import math
import numbers

import numpy as np

from . import _args
from ._rule import Hyper, Rule, State
from .sgd import sgd_momentum


def lars_math(p, g, momentum_buffer, ratio, lr, weight_decay, momentum, one_minus_dampening, use_momentum, first,
              nesterov, coupled):
    """The new (p, buffer); ``ratio`` is the tensor's."""
    # no term for a zero decay (timm skips it): 0 * p is NaN for an inf or NaN p
    d = (g + weight_decay * p if coupled else g) * ratio
    d, momentum_buffer = sgd_momentum(d, momentum_buffer, momentum, one_minus_dampening, use_momentum, first,
                                      nesterov)
    return p - lr * d, momentum_buffer


def scalars(h, step, lr):
    return {"lr": lr, "first": step == 1}


def constants(h):
    return {"weight_decay": h["weight_decay"], "momentum": h["momentum"], "one_minus_dampening": 1 - h["dampening"],
            "use_momentum": h["momentum"] != 0, "nesterov": bool(h["nesterov"]), "coupled": h["weight_decay"] != 0}


def _is_number(x):
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _check(h):
    _args.nonneg("momentum", h["momentum"])
    _args.nonneg("weight_decay", h["weight_decay"])
    _args.eps(h["eps"])
    dampening, trust_coeff = h["dampening"], h["trust_coeff"]
    if not -math.inf < dampening < math.inf:
        raise ValueError(f"Invalid dampening value: {dampening}")
    if not (_is_number(trust_coeff) and 0 < trust_coeff < math.inf):
        raise ValueError(f"Invalid trust_coeff value: {trust_coeff!r} (a positive number)")
    if h["nesterov"] and (h["momentum"] <= 0 or dampening != 0):
        raise ValueError("Nesterov momentum requires a momentum and zero dampening")


LARS = Rule(
    "lars", lars_math, scalars, constants=constants,
    states=[State("momentum_buffer", lambda h: h["momentum"] != 0, "when momentum != 0")],
    hyper=[Hyper("lr", 1.0, _args.lr, sample=("uniform", 0.05, 0.5)),
           Hyper("momentum", 0.0, sample=("uniform", 0.5, 0.95)), Hyper("dampening", 0.0, sample=("uniform", 0.0, 0.5)),
           Hyper("weight_decay", 0.0, sample=("log", 1e-4, 1e-2)), Hyper("nesterov", False),
           Hyper("trust_coeff", 1e-3, sample=("uniform", 1e-3, 5e-2)), Hyper("eps", 1e-8, sample=("log", 1e-8, 1e-6)),
           Hyper("trust_clip", False), Hyper("always_adapt", False)],
    check=_check,
    per_tensor=("ratio",),
    start_from_grad=("momentum_buffer",))  # as timm's: momentum turned on mid-run starts from d
STATES = LARS.states


def adapts(weight_decay, always_adapt):
    """Whether a group's tensors get a trust ratio (timm: only with weight decay, unless always_adapt)."""
    return weight_decay != 0 or bool(always_adapt)


def trust_ratios(param_norms, grad_norms, *, weight_decay, trust_coeff, eps, trust_clip=False, lr=None):
    """The ratio of each tensor (see the module docstring), float64."""
    w = np.asarray(param_norms, np.float64)
    g = np.asarray(grad_norms, np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where((w > 0) & (g > 0), trust_coeff * w / (g + w * weight_decay + eps), 1.0)
        if trust_clip:
            ratio = np.minimum(ratio / lr, 1.0)
    return ratio


def lars_reference(params, grads, momentum_buffers=None, *, step, lr=1.0, momentum=0.0, dampening=0.0,
                   weight_decay=0.0, nesterov=False, trust_coeff=1e-3, eps=1e-8, trust_clip=False,
                   always_adapt=False):
    """Textbook LARS in NumPy (float64), tensor by tensor: the check for :func:`lars_`.
    Returns the ratios."""
    ratios = []
    for i, (p, g) in enumerate(zip(params, grads)):
        ratio = 1.0
        if weight_decay != 0 or always_adapt:
            w_norm, g_norm = np.linalg.norm(p), np.linalg.norm(g)
            if w_norm > 0 and g_norm > 0:
                ratio = trust_coeff * w_norm / (g_norm + weight_decay * w_norm + eps)
            if trust_clip:
                ratio = min(ratio / lr, 1.0)
        d = ratio * (g + weight_decay * p if weight_decay != 0 else g)
        if momentum != 0:
            buf = momentum_buffers[i]
            buf[...] = d if step == 1 else momentum * buf + (1 - dampening) * d
            d = d + momentum * buf if nesterov else buf
        p -= lr * d
        ratios.append(ratio)
    return np.array(ratios)
