"""Turn a rule's element-wise math into kernels.

A rule writes its math once, as a plain function on scalars::

    def math(p, g, s0, s1, s2, c):  ->  (p, s0, s1, s2)

``p`` and ``g`` are one parameter and its gradient, ``s0..s2`` up to three state values
(a rule that has fewer ignores the rest), ``c`` the tuple of per-step scalars computed on
the host. The compiled loops take ``(grad_scale, *c)``: the gradient is multiplied by
``grad_scale`` as it is read (see ``fastopt._dispatch.cast_scalars``). This module compiles that one function into a serial and a parallel CPU loop over flat
arrays (``numba.njit``), the same two over lists of arrays (a whole model's separate
tensors in one call), and a CUDA grid-stride loop (``numba.cuda.jit``). A state array
passed as ``None`` is pruned at compile time: it is never read nor written, so a step
moves only the bytes its options need.

Every constant the math uses must come from ``c``: a bare literal such as ``1.0`` is a
float64 and silently promotes a float32 kernel (``python -m fastopt.kernels ptx`` counts
the ``.f64`` instructions that would betray it).
"""
import hashlib
import inspect

from numba import njit, prange, types
from numba.extending import overload, register_jitable

_CPU_OPTIONS = dict(error_model="numpy", nogil=True)  # "numpy": no ZeroDivision check, so loops vectorize


@register_jitable  # callable from a rule's math in both the CPU and the CUDA kernels
def nan_max(a, b):
    """``max(a, b)``, NaN when either is NaN, as ``torch.maximum``: Python's ``max(a, nan)``
    is ``a``, which would hide a NaN gradient in a running maximum for ever. A compare and
    a select in the arrays' dtype: no float64, and the loops still vectorize."""
    return a if a > b or a != a else b


def _make_apply(math):
    def apply(i, param, grad, s0, s1, s2, c):
        # c[0] scales the gradient (the global-norm clip factor; exactly 1 otherwise), so
        # clipping costs no pass of its own; c[1:] are the rule's scalars.
        g = grad[i] * c[0]
        # A missing state gets a dummy value; its result is dropped and the branch pruned.
        x0 = s0[i] if s0 is not None else g
        x1 = s1[i] if s1 is not None else g
        x2 = s2[i] if s2 is not None else g
        p, x0, x1, x2 = math(param[i], g, x0, x1, x2, c[1:])
        param[i] = p
        if s0 is not None:
            s0[i] = x0
        if s1 is not None:
            s1[i] = x1
        if s2 is not None:
            s2[i] = x2
    return apply


def _make_cpu_loop(apply):
    def cpu_loop(param, grad, s0, s1, s2, c):
        for i in prange(param.size):
            apply(i, param, grad, s0, s1, s2, c)
    return cpu_loop


def _make_segment_loop(apply):
    def segment_loop(param, grad, s0, s1, s2, c):
        # A loop from 0 over sliced arrays: LLVM vectorizes this form, not range(lo, hi).
        for i in range(param.size):
            apply(i, param, grad, s0, s1, s2, c)
    return segment_loop


def _piece(arrays, t, lo, hi):
    """``arrays[t][lo:hi]``, or None where the state slot is unused."""


@overload(_piece)
def _piece_impl(arrays, t, lo, hi):
    if isinstance(arrays, types.NoneType):
        return lambda arrays, t, lo, hi: None
    return lambda arrays, t, lo, hi: arrays[t][lo:hi]


def _make_multi_loop(segment_loop):
    def multi_loop(params, grads, s0, s1, s2, chunks, c):
        # chunks[k] = (tensor, start, stop): big tensors are split so threads share them.
        for k in prange(chunks.shape[0]):
            t, lo, hi = chunks[k, 0], chunks[k, 1], chunks[k, 2]
            segment_loop(params[t][lo:hi], grads[t][lo:hi], _piece(s0, t, lo, hi), _piece(s1, t, lo, hi),
                         _piece(s2, t, lo, hi), c)
    return multi_loop


def _enable_cache(dispatcher, name, salt):
    """Cache a generated CPU kernel on disk under its own name.

    Numba keys the cache of a closure on a pickle of its cells, which differs in every
    process, so ``cache=True`` would compile (and write a new file) on every run. The
    rule's name and the source of the rule and of this module identify the kernel instead.
    """
    try:
        from numba.core.caching import FunctionCache

        class _RuleCache(FunctionCache):
            def _index_key(self, sig, codegen):
                return (sig, codegen.magic_tuple(), salt)

        dispatcher.py_func.__qualname__ = name
        dispatcher._cache = _RuleCache(dispatcher.py_func)
    except Exception:  # a Numba whose cache internals moved: compile every run, still correct
        pass
    return dispatcher


class Kernels:
    """The compiled forms of one rule's math, each built on first use."""

    def __init__(self, name, math):
        self.name, self.math = name, math
        self._cpu, self._multi = {}, {}
        self._cuda = None
        src = inspect.getsource(inspect.getmodule(math)) + inspect.getsource(inspect.getmodule(Kernels))
        self._salt = hashlib.sha256(src.encode()).hexdigest()

    def cpu(self, parallel):
        if parallel not in self._cpu:
            apply = njit(**_CPU_OPTIONS)(_make_apply(njit(**_CPU_OPTIONS)(self.math)))
            loop = njit(parallel=parallel, **_CPU_OPTIONS)(_make_cpu_loop(apply))
            kind = "parallel" if parallel else "serial"
            self._cpu[parallel] = _enable_cache(loop, f"{self.name}_cpu_{kind}", self._salt)
        return self._cpu[parallel]

    def cpu_multi(self, parallel):
        """The loop over typed lists of 1-D arrays and a (n_chunks, 3) int64 chunk table."""
        if parallel not in self._multi:
            apply = njit(**_CPU_OPTIONS)(_make_apply(njit(**_CPU_OPTIONS)(self.math)))
            segment = njit(**_CPU_OPTIONS)(_make_segment_loop(apply))
            loop = njit(parallel=parallel, **_CPU_OPTIONS)(_make_multi_loop(segment))
            kind = "parallel" if parallel else "serial"
            self._multi[parallel] = _enable_cache(loop, f"{self.name}_multi_{kind}", self._salt)
        return self._multi[parallel]

    def cuda_loop(self):
        """The Python CUDA kernel function (not yet compiled), for ``cuda.jit`` or ``compile_ptx``."""
        from numba import cuda
        from ._cuda import make_cuda_loop  # numba-cuda is optional: imported on first GPU use
        math = cuda.jit(device=True)(self.math)
        return make_cuda_loop(cuda.jit(device=True)(_make_apply(math)))

    def cuda(self):
        if self._cuda is None:
            from numba import cuda
            self._cuda = cuda.jit(self.cuda_loop())
        return self._cuda
