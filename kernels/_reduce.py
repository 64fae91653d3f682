"""Deterministic norms of many arrays in one pass: the reduction behind global-norm
clipping, the non-finite guard and the per-tensor norms of LARS.

A norm is one of the engine's layer passes (:mod:`._engine`, run by :mod:`._layers`): the
math of an element returns the values to reduce and the pass writes nothing. The arrays
are cut into a fixed table of chunks (:func:`chunk_table`); each chunk is reduced in a
fixed order and written to its own slot, and the slots are added up in chunk order. The
same inputs therefore give the same bits on every run, whatever the thread scheduling (a
shared atomic accumulator would not).

Per chunk two numbers come back: ``sum(|x|**p)`` (``max |x|`` for p = inf) and
``sum(x * 0)``, which is NaN exactly when the chunk holds an inf or a NaN: the non-finite
check costs no branch and no extra pass.
"""
import math
import numbers

import numpy as np
from numba import njit
from numba.extending import register_jitable

from ._engine import _CPU_OPTIONS, Kernels, Scalars

CHUNK = 1 << 15  # elements per chunk: enough work per thread, few partials to add up

# mode of the reduction: p = 2, p = inf, any other p
SQUARES, MAX, POWER = 0, 1, 2


def norm_math(x, _g):
    """Element ``x`` of a norm, twice: reduced as the norm's (its square summed for p = 2,
    its absolute value's maximum for p = inf) and as the non-finite check. The pass reads no
    gradient and writes nothing."""
    return x, x, x


def power_math(x, _g, norm_type):
    """Element ``x`` of a norm of any other order: ``|x|**norm_type`` (summed), and ``x``
    for the non-finite check."""
    return x, abs(x) ** norm_type, x


#: the compiled norm pass of each mode
NORM = {SQUARES: Kernels("norm_squares", norm_math, (), Scalars((), ()), writes=(), sums=("squares", "nonfinite")),
        MAX: Kernels("norm_max", norm_math, (), Scalars((), ()), writes=(), sums=("max", "nonfinite")),
        POWER: Kernels("norm_power", power_math, (), Scalars(("norm_type",), ()), writes=(), sums=("sum", "nonfinite"))}


@register_jitable
def combine_in_order(totals, checks, mode):
    """The per-chunk partials added up in chunk order (the max for ``MAX``): ``(total, check)``.
    The order of the engine's layer passes (their CPU form returns these totals); compiled
    into the CUDA step prologue (``_device``) and for the host (:data:`combine`)."""
    total, check = np.float64(0.0), np.float64(0.0)  # float64 in the simulator too (0.0 + float32 is float32 there)
    for k in range(totals.size):
        check += checks[k]
        total = max(total, totals[k]) if mode == MAX else total + totals[k]
    return total, check


# the host's combination of a CUDA reduction's partials: compiled, no NumPy round trip
combine = njit(cache=True, **_CPU_OPTIONS)(combine_in_order)


def chunk_table(sizes, chunk=None, places=None):
    """The one chunk table: (n_chunks, 4) int64 rows ``(base, start, stop, tensor)`` cutting
    every tensor into pieces of at most ``chunk`` elements (the unit of work of a CPU thread
    or a CUDA block, and of a partial sum). Tensor ``t`` has ``sizes[t]`` elements and lies
    in base array ``places[t] = (base, offset)`` (default: tensor t is base t, from 0);
    rows come tensor by tensor, in order, so adding partials in row order is a fixed order."""
    chunk = chunk or CHUNK
    places = places if places is not None else [(t, 0) for t in range(len(sizes))]
    rows = [(b, s + lo, s + min(lo + chunk, n), t) for t, (n, (b, s)) in enumerate(zip(sizes, places))
            for lo in range(0, n, chunk)]
    return np.array(rows, np.int64).reshape(-1, 4)


def mode_of(norm_type):
    if isinstance(norm_type, bool) or not isinstance(norm_type, (numbers.Real, str)):
        raise ValueError(f"norm_type must be a positive number or inf, got {norm_type!r}")
    try:
        norm_type = float(norm_type)  # "inf" as torch takes it
    except ValueError:
        raise ValueError(f"norm_type must be a positive number or inf, got {norm_type!r}") from None
    if norm_type == 2.0:
        return SQUARES
    if norm_type == math.inf:
        return MAX
    if not norm_type > 0:
        raise ValueError(f"norm_type must be > 0 (or inf), got {norm_type}")
    return POWER


@register_jitable
def finish(total, check, mode, norm_type):
    """``(norm, all finite)`` from the combined sum (or max) and check."""
    if mode == SQUARES:
        total = math.sqrt(total)
    elif mode == POWER:
        total = total ** (1.0 / norm_type)
    elif check != check and total < math.inf:
        # a max passes NaN over (max(t, nan) is t); a NaN, not an inf, made the check NaN: the
        # norm is NaN, as torch's (its clip then spreads NaN, as for the other norms)
        total = check
    return total, check == check  # the check is NaN exactly when some element was inf or NaN


def segment_sums(totals, chunks, n_tensors, mode):
    """Per-tensor totals (sum of |x|**p, or max) from the chunk partials, in chunk order."""
    t = chunks[:, 3]
    if mode == MAX:
        out = np.zeros(n_tensors)
        np.maximum.at(out, t, totals)
        return out
    return np.bincount(t, weights=totals, minlength=n_tensors)


@register_jitable
def clip_coefficient(total, max_norm):
    """torch's factor ``min(1, max_norm / (total + 1e-6))`` (NaN for a NaN norm)."""
    coef = max_norm / (total + 1e-6)
    return coef if math.isnan(coef) else min(coef, 1.0)
