"""LAMB (You et al., 2020, "Large Batch Optimization for Deep Learning: Training BERT in
76 Minutes", Algorithm 2), each tensor of a model being one layer:

    m    = beta1 * m + (1 - beta1) * g
    v    = beta2 * v + (1 - beta2) * g**2
    r    = (m / bc1) / (sqrt(v / bc2) + eps)          bc = 1 - beta**t, or 1 (bias_correction=False)
    u    = r + weight_decay * p                    (r alone when weight_decay == 0)
    phi  = min(||p||, clamp_value) / ||u||            per tensor; 1 where either norm is 0
    p   -= lr * phi * u

The paper's scaling function of ||p|| is phi(z) = min(max(z, gamma_l), gamma_u); here
gamma_l = 0 and gamma_u = ``clamp_value`` (None: no clamp, as NVIDIA apex's FusedLAMB).
``torch_optimizer.Lamb`` is ``bias_correction=False, clamp_value=10``. Unlike apex (whose
ratio is 1 when weight_decay == 0 unless use_nvlamb), the ratio is always applied, as in
the paper; a param group with ``layer_adaptation=False`` (biases, norms) takes phi = 1.

Adam's moment math (``adam_moments``, the same bits) plus a per-tensor ratio, in two
passes of the engine over the chunk table (``_engine``'s layer forms): pass 1
(:func:`lamb_norms`) updates m and v and returns, per chunk, ``sum p**2`` and ``sum u**2``
(the norms cost no pass of their own); the host adds each tensor's chunks in chunk order
(the same bits on every run) and forms phi; pass 2 (:func:`lamb_math`, phi read through the
chunk's tensor) recomputes u from the new m, v (the same function, so the same values) and
applies ``p -= lr * phi * u``. Float32 traffic per parameter: pass 1 reads p, g, m, v and
writes m, v (24 B); pass 2 reads p, m, v and writes p (16 B): 40 B, the least any exact
two-pass scheme moves (pass 2 must get u: reading m, v or a stored u costs the same 8 B); a
one-pass Adam step moves 28 B.
"""
import math
import numbers

import numpy as np
from numba.extending import register_jitable

from . import _args
from ._rule import BETAS_SAMPLE, WEIGHT_DECAY_SAMPLE, Hyper, Pass, Rule, State
from .adam import adam_moments


@register_jitable
def lamb_direction(p, exp_avg, exp_avg_sq, inv_bc1, inv_sqrt_bc2, eps, weight_decay, decayed):
    """u = m_hat / (sqrt(v_hat) + eps) + weight_decay * p, from the new m, v."""
    r = exp_avg * inv_bc1 / (math.sqrt(exp_avg_sq) * inv_sqrt_bc2 + eps)
    # no term for a zero decay (torch_optimizer.Lamb skips it): 0 * p is NaN for an inf p
    return r + weight_decay * p if decayed else r


def lamb_norms(p, g, exp_avg, exp_avg_sq, lr, beta1, one_minus_beta1, beta2, one_minus_beta2, inv_bc1,
               inv_sqrt_bc2, eps, weight_decay, decayed):
    """Pass 1: the new moments, and p and u, whose squares the pass sums per chunk."""
    exp_avg, exp_avg_sq = adam_moments(g, exp_avg, exp_avg_sq, beta1, one_minus_beta1, beta2, one_minus_beta2)
    u = lamb_direction(p, exp_avg, exp_avg_sq, inv_bc1, inv_sqrt_bc2, eps, weight_decay, decayed)
    return p, exp_avg, exp_avg_sq, p, u


def lamb_math(p, _g, exp_avg, exp_avg_sq, ratio, lr, beta1, one_minus_beta1, beta2, one_minus_beta2, inv_bc1,
              inv_sqrt_bc2, eps, weight_decay, decayed):
    """Pass 2 (the update, ``ratio`` the tensor's phi): reads no gradient, stores p alone."""
    u = lamb_direction(p, exp_avg, exp_avg_sq, inv_bc1, inv_sqrt_bc2, eps, weight_decay, decayed)
    return p - lr * ratio * u, exp_avg, exp_avg_sq


def scalars(h, step, lr):
    beta1, beta2 = h["betas"]
    bc1 = 1 - beta1 ** step if h["bias_correction"] else 1.0
    bc2 = 1 - beta2 ** step if h["bias_correction"] else 1.0
    return {"lr": lr, "inv_bc1": 1 / bc1, "inv_sqrt_bc2": 1 / math.sqrt(bc2)}


def constants(h):
    beta1, beta2 = h["betas"]
    return {"beta1": beta1, "one_minus_beta1": 1 - beta1, "beta2": beta2, "one_minus_beta2": 1 - beta2,
            "eps": h["eps"], "weight_decay": h["weight_decay"], "decayed": h["weight_decay"] != 0}


def _is_number(x):
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _check(h):
    clamp_value = h["clamp_value"]
    if clamp_value is not None and not (_is_number(clamp_value) and clamp_value > 0):
        raise ValueError(f"Invalid clamp_value value: {clamp_value!r} (a positive number, or None)")


LAMB = Rule(
    "lamb", lamb_math, scalars, constants=constants,
    states=[State("exp_avg"), State("exp_avg_sq")],
    hyper=[Hyper("lr", 1e-3, _args.lr, sample=("log", 1e-3, 1e-1)),
           Hyper("betas", (0.9, 0.999), _args.betas, sample=BETAS_SAMPLE),
           Hyper("eps", 1e-6, _args.eps, sample=("log", 1e-8, 1e-5)),
           # off: 0 drops the decay term (``decayed``), which the default 1e-2 never reaches
           Hyper("weight_decay", 1e-2, _args.nonneg_of("weight_decay"), sample=WEIGHT_DECAY_SAMPLE, off=0.0),
           Hyper("bias_correction", True, keyword=True),
           # from 1 to torch_optimizer.Lamb's 10: within the norms of the tests' tensors, so it binds on some
           Hyper("clamp_value", None, keyword=True, sample=("log", 1.0, 10.0)),
           Hyper("layer_adaptation", True, keyword=True)],
    check=_check,
    per_tensor=("ratio",), writes=("p",),
    first=Pass(lamb_norms, writes=("exp_avg", "exp_avg_sq"), sums=("squares", "squares")))
STATES = LAMB.states


def trust_ratios(param_norms, update_norms, clamp_value=None):
    """phi per tensor: ``min(||p||, clamp_value) / ||u||`` where both norms are > 0, else 1
    (a zero tensor, a zero update; a NaN norm also gives 1, and its NaN update still spreads)."""
    w = np.asarray(param_norms, np.float64)
    u = np.asarray(update_norms, np.float64)
    if clamp_value is not None:
        w = np.minimum(w, clamp_value)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where((w > 0) & (u > 0), w / u, 1.0)


def lamb_reference(params, grads, exp_avgs, exp_avg_sqs, *, step, lr=1e-3, betas=(0.9, 0.999), eps=1e-6,
                   weight_decay=1e-2, bias_correction=True, clamp_value=None, layer_adaptation=True):
    """Textbook LAMB in NumPy (float64), tensor by tensor: the check for :func:`lamb_`.
    Returns the ratios phi."""
    beta1, beta2 = betas
    ratios = []
    for p, g, m, v in zip(params, grads, exp_avgs, exp_avg_sqs):
        m[...] = beta1 * m + (1 - beta1) * g
        v[...] = beta2 * v + (1 - beta2) * g ** 2
        m_hat = m / (1 - beta1 ** step) if bias_correction else m
        v_hat = v / (1 - beta2 ** step) if bias_correction else v
        u = m_hat / (np.sqrt(v_hat) + eps)
        if weight_decay != 0:
            u = u + weight_decay * p
        w_norm, u_norm = np.linalg.norm(p), np.linalg.norm(u)
        if clamp_value is not None:
            w_norm = min(w_norm, clamp_value)
        phi = w_norm / u_norm if w_norm > 0 and u_norm > 0 and layer_adaptation else 1.0
        p -= lr * phi * u
        ratios.append(phi)
    return np.array(ratios)
