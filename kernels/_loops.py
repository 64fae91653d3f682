"""Turn a rule's element-wise math into kernels.

A rule writes its math once, as a plain function on scalars::

    def math(p, g, s0, s1, s2, c):  ->  (p, s0, s1, s2)

``p`` and ``g`` are one parameter and its gradient, ``s0..s2`` up to three state values
(a rule that has fewer ignores the rest), ``c`` the tuple of per-step scalars computed on
the host. This module compiles that one function three ways: a serial and a parallel
CPU loop (``numba.njit``) and a CUDA grid-stride loop (``numba.cuda.jit``). A state array
passed as ``None`` is pruned at compile time: it is never read nor written, so a step
moves only the bytes its options need.

Every constant the math uses must come from ``c``: a bare literal such as ``1.0`` is a
float64 and silently promotes a float32 kernel (``python -m fastopt.kernels ptx`` counts
the ``.f64`` instructions that would betray it).
"""
import hashlib
import inspect

from numba import njit, prange

_CPU_OPTIONS = dict(error_model="numpy", nogil=True)  # "numpy": no ZeroDivision check, so loops vectorize


def _make_apply(math):
    def apply(i, param, grad, s0, s1, s2, c):
        g = grad[i]
        # A missing state gets a dummy value; its result is dropped and the branch pruned.
        x0 = s0[i] if s0 is not None else g
        x1 = s1[i] if s1 is not None else g
        x2 = s2[i] if s2 is not None else g
        p, x0, x1, x2 = math(param[i], g, x0, x1, x2, c)
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
        self._cpu = {}
        self._cuda = None
        src = inspect.getsource(inspect.getmodule(math)) + inspect.getsource(_make_apply)
        self._salt = hashlib.sha256(src.encode()).hexdigest()

    def cpu(self, parallel):
        if parallel not in self._cpu:
            apply = njit(**_CPU_OPTIONS)(_make_apply(njit(**_CPU_OPTIONS)(self.math)))
            loop = njit(parallel=parallel, **_CPU_OPTIONS)(_make_cpu_loop(apply))
            kind = "parallel" if parallel else "serial"
            self._cpu[parallel] = _enable_cache(loop, f"{self.name}_cpu_{kind}", self._salt)
        return self._cpu[parallel]

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
