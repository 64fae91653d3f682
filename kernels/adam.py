"""Adam (Kingma & Ba, 2015) and AdamW (Loshchilov & Hutter, 2019), as ``torch.optim.Adam/AdamW``.

    g      = -grad if maximize else grad
    g     += weight_decay * p                      (Adam: L2 penalty in the gradient)
    p     *= 1 - lr * weight_decay                 (AdamW: decoupled decay instead)
    m      = beta1 * m + (1 - beta1) * g
    v      = beta2 * v + (1 - beta2) * g**2
    v_max  = max(v_max, v)                         (amsgrad; v_max replaces v below)

Either decay is skipped when ``weight_decay == 0``, as torch does (``0 * p`` is NaN for an
inf or NaN parameter), and ``max`` is NaN when either side is, as ``torch.maximum``.
    p     -= lr / (1 - beta1**t) * m / (sqrt(v / (1 - beta2**t)) + eps)

``bias_correction=False`` drops both ``1 - beta**t`` factors: the lecture notes' "Adam
(almost)". L1 (``l1`` > 0): ``l1_mode="subgradient"`` adds ``l1 * sign(p)`` to g with the
L2 term; ``"proximal"`` soft-thresholds after the step with each coordinate's own step
size, ``p = sign(p) * max(|p| - lr / (1 - beta1**t) * l1 / denom, 0)`` (exact zeros).
Host scalars: ``lr / (1 - beta1**t)`` and ``1 / sqrt(1 - beta2**t)``.
"""
import math

import numpy as np

from . import _args
from ._engine import nan_max
from ._rule import Hyper, Rule, State


def adam_math(p, g, exp_avg, exp_avg_sq, max_exp_avg_sq,
              beta1, one_minus_beta1, beta2, one_minus_beta2, step_size, inv_sqrt_bc2, eps, l2, decay, l1, zero,
              amsgrad, maximize, coupled, decoupled, l1_subgradient, proximal):
    if maximize:
        g = -g
    if coupled:  # torch skips a zero decay: 0 * p is NaN for an inf or NaN p
        g = g + l2 * p
    if l1_subgradient:
        g = g + (l1 if p > zero else -l1 if p < zero else zero)
    if decoupled:
        p = p * decay
    exp_avg = beta1 * exp_avg + one_minus_beta1 * g
    exp_avg_sq = beta2 * exp_avg_sq + one_minus_beta2 * g * g
    if amsgrad:
        max_exp_avg_sq = nan_max(max_exp_avg_sq, exp_avg_sq)
        denom = math.sqrt(max_exp_avg_sq) * inv_sqrt_bc2 + eps
    else:
        denom = math.sqrt(exp_avg_sq) * inv_sqrt_bc2 + eps
    p = p - step_size * exp_avg / denom
    if proximal:
        shrunk = abs(p) - step_size * l1 / denom
        p = math.copysign(shrunk, p) if shrunk > zero else zero
    return p, exp_avg, exp_avg_sq, max_exp_avg_sq


def scalars(h, step, lr):
    beta1, beta2 = h["betas"]
    bc1 = 1 - beta1 ** step if h["bias_correction"] else 1.0
    bc2 = 1 - beta2 ** step if h["bias_correction"] else 1.0
    weight_decay, decoupled, l1 = h["weight_decay"], bool(h["decoupled_weight_decay"]), h["l1"]
    return dict(beta1=beta1, one_minus_beta1=1 - beta1, beta2=beta2, one_minus_beta2=1 - beta2,
                step_size=lr / bc1, inv_sqrt_bc2=1 / math.sqrt(bc2), eps=h["eps"],
                l2=0.0 if decoupled else weight_decay, decay=1 - lr * weight_decay if decoupled else 1.0,
                l1=l1, zero=0.0, amsgrad=bool(h["amsgrad"]), maximize=bool(h["maximize"]),
                coupled=weight_decay != 0 and not decoupled, decoupled=weight_decay != 0 and decoupled,
                l1_subgradient=l1 > 0 and h["l1_mode"] == "subgradient",
                proximal=l1 > 0 and h["l1_mode"] == "proximal")


ADAM = Rule(
    "adam", adam_math, scalars,
    states=[State("exp_avg"), State("exp_avg_sq"),
            State("max_exp_avg_sq", lambda h: h["amsgrad"], "when amsgrad=True")],
    hyper=[Hyper("lr", 1e-3, _args.lr), Hyper("betas", (0.9, 0.999), _args.betas),
           Hyper("eps", 1e-8, _args.eps), Hyper("weight_decay", 0.0, _args.nonneg_of("weight_decay")),
           Hyper("amsgrad", False),
           Hyper("maximize", False, keyword=True), Hyper("decoupled_weight_decay", False, keyword=True),
           Hyper("bias_correction", True, keyword=True, torch=False,
                 doc='False drops both 1 - beta**t factors: the lecture notes\' "Adam (almost)"'),
           Hyper("l1", 0.0, _args.nonneg_of("l1"), keyword=True, torch=False),
           Hyper("l1_mode", "subgradient", _args.l1_mode, keyword=True, torch=False)])
ADAMW = ADAM.variant("adamw", fixed={"decoupled_weight_decay": True}, defaults={"weight_decay": 1e-2})

adam_ = ADAM.function("adam_", "One Adam step, in place on ``param`` and the state arrays (see the module docstring).")
adamw_ = ADAMW.function("adamw_", "One AdamW step: Adam with decoupled weight decay, ``p *= 1 - lr * weight_decay``.")


def _reference(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, *, step, lr, betas, eps,
               weight_decay, amsgrad, maximize, bias_correction, decoupled_weight_decay, l1, l1_mode):
    beta1, beta2 = betas
    g = -grad if maximize else grad
    if weight_decay != 0 and decoupled_weight_decay:
        param *= 1 - lr * weight_decay
    elif weight_decay != 0:
        g = g + weight_decay * param
    if l1_mode == "subgradient":
        g = g + l1 * np.sign(param)
    exp_avg[:] = beta1 * exp_avg + (1 - beta1) * g
    exp_avg_sq[:] = beta2 * exp_avg_sq + (1 - beta2) * g ** 2
    if amsgrad:
        np.maximum(max_exp_avg_sq, exp_avg_sq, out=max_exp_avg_sq)
    v = max_exp_avg_sq if amsgrad else exp_avg_sq
    m_hat = exp_avg / (1 - beta1 ** step) if bias_correction else exp_avg
    v_hat = v / (1 - beta2 ** step) if bias_correction else v
    param -= lr * m_hat / (np.sqrt(v_hat) + eps)
    if l1_mode == "proximal":
        step_size = lr / (1 - beta1 ** step) if bias_correction else lr
        denom = np.sqrt(v) * (1 / np.sqrt(1 - beta2 ** step) if bias_correction else 1.0) + eps
        param[:] = np.sign(param) * np.maximum(np.abs(param) - step_size * l1 / denom, 0.0)


def adam_reference(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq=None, *, step, lr=1e-3,
                   betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, amsgrad=False, maximize=False,
                   decoupled_weight_decay=False, bias_correction=True, l1=0.0, l1_mode="subgradient"):
    """Textbook Adam in NumPy (float64), the check for :func:`adam_`."""
    _reference(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, step=step, lr=lr, betas=betas, eps=eps,
               weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize,
               bias_correction=bias_correction, decoupled_weight_decay=decoupled_weight_decay, l1=l1,
               l1_mode=l1_mode)


def adamw_reference(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq=None, *, step, lr=1e-3,
                    betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False, maximize=False,
                    bias_correction=True, l1=0.0, l1_mode="subgradient"):
    """Textbook AdamW in NumPy (float64), the check for :func:`adamw_`."""
    _reference(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, step=step, lr=lr, betas=betas, eps=eps,
               weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize,
               bias_correction=bias_correction, decoupled_weight_decay=True, l1=l1, l1_mode=l1_mode)
