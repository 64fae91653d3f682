"""Adam (Kingma & Ba, 2015) and AdamW (Loshchilov & Hutter, 2019), as ``torch.optim.Adam/AdamW``.

    g      = -grad if maximize else grad
    g     += weight_decay * p                      (Adam: L2 penalty in the gradient)
    p     *= 1 - lr * weight_decay                 (AdamW: decoupled decay instead)
    m      = beta1 * m + (1 - beta1) * g
    v      = beta2 * v + (1 - beta2) * g**2
    v_max  = max(v_max, v)                         (amsgrad; v_max replaces v below)
    p     -= lr / (1 - beta1**t) * m / (sqrt(v / (1 - beta2**t) + eps_root) + eps)

Either decay is skipped when ``weight_decay == 0``, as torch does (``0 * p`` is NaN for an
inf or NaN parameter), and ``max`` is NaN when either side is, as ``torch.maximum``.
``eps_root`` (optax's; 0 in torch) keeps the square root's argument off zero.

``bias_correction=False`` drops both ``1 - beta**t`` factors: the lecture notes' "Adam
(almost)". L1 (``l1`` > 0): ``l1_mode="subgradient"`` adds ``l1 * sign(p)`` to g with the
L2 term; ``"proximal"`` soft-thresholds after the step with each coordinate's own step
size, ``p = sign(p) * max(|p| - lr / (1 - beta1**t) * l1 / denom, 0)`` (exact zeros).
Host scalars: ``lr / (1 - beta1**t)``, ``1 / sqrt(1 - beta2**t)`` and ``1 / (1 - beta2**t)``.
"""
import math

import numpy as np
from numba.extending import register_jitable

from . import _args
from ._engine import nan_max
from ._rule import BETAS_SAMPLE, WEIGHT_DECAY_SAMPLE, Hyper, Rule, State


@register_jitable  # a piece of math: LAMB's first pass calls it too (the same moments, bit for bit)
def adam_moments(g, exp_avg, exp_avg_sq, beta1, one_minus_beta1, beta2, one_minus_beta2):
    """The new first and second moments from the gradient ``g``."""
    return beta1 * exp_avg + one_minus_beta1 * g, beta2 * exp_avg_sq + one_minus_beta2 * g * g


def adam_math(p, g, exp_avg, exp_avg_sq, max_exp_avg_sq,
              beta1, one_minus_beta1, beta2, one_minus_beta2, step_size, inv_sqrt_bc2, inv_bc2, eps, eps_root,
              l2, decay, l1, zero, amsgrad, maximize, coupled, decoupled, l1_subgradient, proximal, has_eps_root):
    if maximize:
        g = -g
    if coupled:  # torch skips a zero decay: 0 * p is NaN for an inf or NaN p
        g = g + l2 * p
    if l1_subgradient:
        g = g + (l1 if p > zero else -l1 if p < zero else zero)
    if decoupled:
        p = p * decay
    exp_avg, exp_avg_sq = adam_moments(g, exp_avg, exp_avg_sq, beta1, one_minus_beta1, beta2, one_minus_beta2)
    if amsgrad:
        max_exp_avg_sq = nan_max(max_exp_avg_sq, exp_avg_sq)
        v = max_exp_avg_sq
    else:
        v = exp_avg_sq
    if has_eps_root:  # optax's eps_root: inside the square root
        denom = math.sqrt(v * inv_bc2 + eps_root) + eps
    else:
        denom = math.sqrt(v) * inv_sqrt_bc2 + eps
    p = p - step_size * exp_avg / denom
    if proximal:
        shrunk = abs(p) - step_size * l1 / denom
        p = math.copysign(shrunk, p) if shrunk > zero else zero
    return p, exp_avg, exp_avg_sq, max_exp_avg_sq


def scalars(h, step, lr):
    beta1, beta2 = h["betas"]
    bc1 = 1 - beta1 ** step if h["bias_correction"] else 1.0
    bc2 = 1 - beta2 ** step if h["bias_correction"] else 1.0
    decoupled = h["decoupled_weight_decay"]
    return {"step_size": lr / bc1, "inv_sqrt_bc2": 1 / math.sqrt(bc2), "inv_bc2": 1 / bc2,
            "decay": 1 - lr * h["weight_decay"] if decoupled else 1.0}


def constants(h):
    beta1, beta2 = h["betas"]
    weight_decay, decoupled, l1 = h["weight_decay"], bool(h["decoupled_weight_decay"]), h["l1"]
    return {"beta1": beta1, "one_minus_beta1": 1 - beta1, "beta2": beta2, "one_minus_beta2": 1 - beta2,
            "eps": h["eps"], "eps_root": h["eps_root"], "has_eps_root": h["eps_root"] != 0,
            "l2": 0.0 if decoupled else weight_decay, "l1": l1, "zero": 0.0, "amsgrad": bool(h["amsgrad"]),
            "maximize": bool(h["maximize"]), "coupled": weight_decay != 0 and not decoupled,
            "decoupled": weight_decay != 0 and decoupled, "l1_subgradient": l1 > 0 and h["l1_mode"] == "subgradient",
            "proximal": l1 > 0 and h["l1_mode"] == "proximal"}


ADAM = Rule(
    "adam", adam_math, scalars, constants=constants,
    states=[State("exp_avg"), State("exp_avg_sq"),
            State("max_exp_avg_sq", lambda h: h["amsgrad"], "when amsgrad=True")],
    hyper=[Hyper("lr", 1e-3, _args.lr, sample=("log", 1e-4, 1e-2)),
           Hyper("betas", (0.9, 0.999), _args.betas, sample=BETAS_SAMPLE),
           Hyper("eps", 1e-8, _args.eps, sample=("log", 1e-8, 1e-5)),
           Hyper("weight_decay", 0.0, _args.nonneg_of("weight_decay"), sample=WEIGHT_DECAY_SAMPLE),
           Hyper("amsgrad", False),
           Hyper("eps_root", 0.0, _args.nonneg_of("eps_root"), keyword=True, torch=False, sample=("log", 1e-10, 1e-6),
                 doc="optax's epsilon inside the square root: sqrt(v_hat + eps_root) + eps"),
           Hyper("maximize", False, keyword=True), Hyper("decoupled_weight_decay", False, keyword=True),
           Hyper("bias_correction", True, keyword=True, torch=False,
                 doc='False drops both 1 - beta**t factors: the lecture notes\' "Adam (almost)"'),
           Hyper("l1", 0.0, _args.nonneg_of("l1"), keyword=True, torch=False, sample=("uniform", 1e-3, 1e-1)),
           Hyper("l1_mode", "subgradient", _args.l1_mode, keyword=True, torch=False,
                 sample=("choice", *_args.L1_MODES))])
ADAMW = ADAM.variant("adamw", fixed={"decoupled_weight_decay": True}, defaults={"weight_decay": 1e-2},
                     samples={"weight_decay": ("uniform", 0.0, 0.2)})

adam_ = ADAM.function("adam_", "One Adam step, in place on ``param`` and the state arrays (see the module docstring).")
adamw_ = ADAMW.function("adamw_", "One AdamW step: Adam with decoupled weight decay, ``p *= 1 - lr * weight_decay``.")


def adam_reference(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq=None, *, step, **hyper):
    """Textbook Adam in NumPy (float64), the check for :func:`adam_` (its hyper-parameters
    and defaults are ADAM's)."""
    h = {**ADAM.defaults, **hyper}
    beta1, beta2 = h["betas"]
    lr, eps, weight_decay, l1, l1_mode = h["lr"], h["eps"], h["weight_decay"], h["l1"], h["l1_mode"]
    g = -grad if h["maximize"] else grad
    if weight_decay != 0 and h["decoupled_weight_decay"]:
        param *= 1 - lr * weight_decay
    elif weight_decay != 0:
        g = g + weight_decay * param
    if l1_mode == "subgradient":
        g = g + l1 * np.sign(param)
    exp_avg[:] = beta1 * exp_avg + (1 - beta1) * g
    exp_avg_sq[:] = beta2 * exp_avg_sq + (1 - beta2) * g ** 2
    if h["amsgrad"]:
        np.maximum(max_exp_avg_sq, exp_avg_sq, out=max_exp_avg_sq)
    v = max_exp_avg_sq if h["amsgrad"] else exp_avg_sq
    bc1, bc2 = (1 - beta1 ** step, 1 - beta2 ** step) if h["bias_correction"] else (1.0, 1.0)
    denom = np.sqrt(v / bc2 + h["eps_root"]) + eps
    param -= lr * (exp_avg / bc1) / denom
    if l1_mode == "proximal":
        param[:] = np.sign(param) * np.maximum(np.abs(param) - lr / bc1 * l1 / denom, 0.0)


def adamw_reference(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq=None, *, step, **hyper):
    """Textbook AdamW in NumPy (float64), the check for :func:`adamw_`."""
    adam_reference(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, step=step, **{**ADAMW.defaults, **hyper})
