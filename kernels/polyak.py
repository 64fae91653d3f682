"""Polyak averaging: the uniform average of every iterate, as in the lecture notes,

    avg_k = 1 / (k + 1) * sum_{i=0..k} p_i
          = avg_{k-1} + (p_k - avg_{k-1}) / (k + 1)     (the form computed; avg_0 = p_0)

``p_0`` is the parameters before the first update, so after ``k`` updates the average
holds ``k + 1`` iterates. Host scalar: ``1 / (k + 1)``. As in :mod:`.ema`, the average
sits in the kernel's param slot and the parameters in its read-only gradient slot (one
pass, 12 B per float32 parameter), and a constant parameter keeps an exact average.
"""
from ._rule import Rule


def polyak_math(avg, p, inv_count):
    return avg + inv_count * (p - avg)


def scalars(h, step, lr=None):
    return dict(inv_count=1 / (step + 1))


POLYAK = Rule("polyak", polyak_math, scalars)


def polyak_reference(average, param, *, step):
    """Update ``average`` (the mean of ``step`` iterates) to the mean of ``step + 1``,
    in NumPy (float64): a weighted sum, not the kernel's running form."""
    average[...] = (step * average + param) / (step + 1)
