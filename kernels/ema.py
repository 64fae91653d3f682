"""Exponential moving average of the parameters (the lecture notes' second form of Polyak
averaging, ``avg_k = (1 - beta) * theta_k + beta * avg_{k-1}``):

    avg_k   = decay_k * avg_{k-1} + (1 - decay_k) * p_k
            = avg_{k-1} + (1 - decay_k) * (p_k - avg_{k-1})          (computed for decay_k > 1/2)
            = p_k - decay_k * (p_k - avg_{k-1})                       (computed for decay_k <= 1/2)
    decay_k = decay, or min(decay, (1 + k) / (10 + k)) with warm-up  (k = 1, 2, ... updates)

The warm-up is TensorFlow's ``ExponentialMovingAverage(num_updates=k)`` (and torch_ema's
``use_num_updates``): early averages forget the initial weights quickly.

The kernel runs with the AVERAGE in the rule's param slot and the model's parameters in
the gradient slot (read only), so one pass reads both and writes the average: 12 B per
float32 parameter. The lerp forms need the host scalars ``1 - decay_k`` and ``decay_k``, and
keep the average of a constant parameter exactly constant; ``decay * avg + (1 - decay) * p`` with
both factors rounded to float32 does not (their sum is not exactly 1: at decay 0.9999 the
average of a constant settles 1.6e-4 away from it, relatively).
"""
import numpy as np

from . import _args
from ._rule import Hyper, Rule


def ema_math(avg, p, one_minus_decay, decay, near_p):
    # torch.lerp's two forms: stepping from the nearer end, a weight of 1 (decay 0) lands on p
    # exactly (avg + 1 * (p - avg) loses p when |avg| >> |p|)
    return p - decay * (p - avg) if near_p else avg + one_minus_decay * (p - avg)


def _decay(value):
    if isinstance(value, (bool, np.bool_)) or not _args._in(value, 0.0, 1.0, True):
        raise ValueError(f"decay must be a number in [0, 1], got {value!r}")


def _warmup(value):
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"warmup must be True or False, got {value!r}")


def decay_at(step, decay, warmup):
    """The decay of update number ``step`` (1-based)."""
    return min(decay, (1 + step) / (10 + step)) if warmup else decay


def scalars(h, step, lr=None):
    decay = decay_at(step, h["decay"], h["warmup"])
    return dict(one_minus_decay=1 - decay, decay=decay, near_p=decay <= 0.5)


EMA = Rule("ema", ema_math, scalars, hyper=[Hyper("decay", 0.999, _decay), Hyper("warmup", False, _warmup)])


def ema_reference(average, param, *, step, decay, warmup=False):
    """Textbook EMA update in NumPy (float64), in place on ``average``."""
    if warmup:
        decay = min(decay, (step + 1) / (step + 10))
    average *= decay
    average += (1 - decay) * param
