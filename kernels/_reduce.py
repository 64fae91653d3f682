"""Deterministic norms of many arrays in one pass: the reduction behind global-norm
clipping, the non-finite guard and the per-tensor norms of LAMB and LARS.

The arrays are cut into a fixed table of chunks (:func:`chunk_table`); each chunk is
reduced in a fixed order and written to its own slot, and the host adds the slots up in
chunk order. The same inputs therefore give the same bits on every run, whatever the
thread scheduling (a shared atomic accumulator would not).

Per chunk two numbers come back: ``sum(|x|**p)`` (``max |x|`` for p = inf) and
``sum(x * 0)``, which is NaN exactly when the chunk holds an inf or a NaN: the non-finite
check costs no branch and no extra pass.
"""
import hashlib
import inspect
import math
import sys

import numpy as np
from numba import njit, prange
from numba.extending import register_jitable

from . import _formats
from ._engine import _CPU_OPTIONS, _enable_cache, cuda_salt, enable_cuda_cache
from ._formats import compute_dtype, load

_SALT = hashlib.sha256((inspect.getsource(sys.modules[__name__]) + inspect.getsource(_formats)).encode()).hexdigest()
CHUNK = 1 << 15  # elements per chunk: enough work per thread, few partials to add up

# mode of the reduction (a compile-time branch): p = 2, p = inf, any other p
SQUARES, MAX, POWER = 0, 1, 2

# The CPU kernels sum in float64 with reordering allowed inside a chunk, so LLVM can use
# SIMD lanes; the order is still fixed by the compiled code, hence the same every run.
_REDUCE_OPTIONS = dict(_CPU_OPTIONS, fastmath={"reassoc", "contract"})


@njit(cache=True, **_REDUCE_OPTIONS)
def _squares(x):
    total, check = 0.0, 0.0
    for i in range(x.size):
        v = np.float64(load(x, i))
        check += v * 0.0
        total += v * v
    return total, check


@njit(cache=True, **_REDUCE_OPTIONS)
def _max_abs(x):
    total, check = 0.0, 0.0
    for i in range(x.size):
        v = np.float64(load(x, i))
        check += v * 0.0
        total = max(total, abs(v))
    return total, check


@njit(cache=True, **_REDUCE_OPTIONS)
def _powers(x, p):
    total, check = 0.0, 0.0
    for i in range(x.size):
        v = np.float64(load(x, i))
        check += v * 0.0
        total += abs(v) ** p
    return total, check


@njit(cache=True, **_CPU_OPTIONS)
def _chunk(x, mode, p):
    # one loop per mode: a branch inside the loop would stop it from vectorizing
    if mode == SQUARES:
        return _squares(x)
    if mode == MAX:
        return _max_abs(x)
    return _powers(x, p)


def _make_cpu(parallel):
    def reduce_chunks(arrays, chunks, mode, p, totals, checks):
        """Fills the per-chunk slots, and returns their combination in chunk order."""
        for k in prange(chunks.shape[0]):
            t, lo, hi = chunks[k, 0], chunks[k, 1], chunks[k, 2]
            totals[k], checks[k] = _chunk(arrays[t][lo:hi], mode, p)
        return combine_in_order(totals, checks, mode)
    kind = "parallel" if parallel else "serial"
    return _enable_cache(njit(parallel=parallel, **_CPU_OPTIONS)(reduce_chunks), f"reduce_{kind}", _SALT)


@register_jitable
def combine_in_order(totals, checks, mode):
    """The per-chunk partials added up in chunk order (the max for ``MAX``): ``(total, check)``.
    Compiled into the CPU reduction and into the CUDA step prologue (``_device``)."""
    total, check = 0.0, 0.0
    for k in range(totals.size):
        check += checks[k]
        total = max(total, totals[k]) if mode == MAX else total + totals[k]
    return total, check


# the host's combination of a CUDA reduction's partials: compiled, no NumPy round trip
combine = njit(cache=True, **_CPU_OPTIONS)(combine_in_order)


_CPU = {}


def cpu(parallel):
    if parallel not in _CPU:
        _CPU[parallel] = _make_cpu(parallel)
    return _CPU[parallel]


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
    norm_type = float(norm_type)
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
    return total, check == check  # the check is NaN exactly when some element was inf or NaN


def segment_sums(totals, chunks, n_tensors, mode):
    """Per-tensor totals (sum of |x|**p, or max) from the chunk partials, in chunk order."""
    t = chunks[:, 3]
    if mode == MAX:
        out = np.zeros(n_tensors)
        np.maximum.at(out, t, totals)
        return out
    return np.bincount(t, weights=totals, minlength=n_tensors)


# -- CUDA -------------------------------------------------------------------------------

_CUDA = {}


def cuda_kernel(dtype):
    """One block per chunk (grid-stride over chunks), the shared fixed tree (``_cuda``).

    Sums in the math's dtype of the arrays (float32 for 16-bit formats: no float64 in a
    float32 kernel); ``zero`` comes from the host for the same reason."""
    key = np.dtype(dtype)
    if key not in _CUDA:
        from numba import cuda

        from ._cuda import make_reduce
        _CUDA[key] = enable_cuda_cache(cuda.jit(make_reduce(compute_dtype(key).name, (SQUARES, MAX))),
                                       f"norm_{key.name}_cuda", cuda_salt(_SALT))
    return _CUDA[key]


@register_jitable
def clip_coefficient(total, max_norm):
    """torch's factor ``min(1, max_norm / (total + 1e-6))`` (NaN for a NaN norm)."""
    coef = max_norm / (total + 1e-6)
    return coef if math.isnan(coef) else min(coef, 1.0)
