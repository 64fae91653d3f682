"""Compile every CUDA kernel to PTX, without a GPU, and count its float64 instructions.

A float32 kernel with any ``.f64`` instruction has a float64 leak (a bare literal, a
Python-float scalar): it runs at a fraction of the speed on most GPUs, and nothing else
catches it (the simulator accepts float64 silently).
"""
import inspect
import itertools
import re
from contextlib import contextmanager

import numpy as np

_F64 = re.compile(r"\.f64\b")


def f64_count(ptx):
    return sum(1 for line in ptx.splitlines() if _F64.search(line))


@contextmanager
def _target_cc(cc):
    """Device functions ask the current device for its compute capability; without a GPU,
    answer with the target's."""
    import numba.cuda.dispatcher as dispatcher

    class _Target:
        compute_capability = cc

    saved = dispatcher.get_current_device
    dispatcher.get_current_device = lambda: _Target
    try:
        yield
    finally:
        dispatcher.get_current_device = saved


def variants(fn, module):
    """The state layouts a rule's kernel is launched with: each optional state present or not."""
    params = inspect.signature(fn).parameters
    optional = [s for s in module.STATES if params[s].default is None]
    for present in itertools.product((True, False), repeat=len(optional)):
        on = dict(zip(optional, present))
        yield tuple(on.get(s, True) for s in module.STATES)


def example_scalars(fn, module, dtype):
    from fastopt._dispatch import cast_scalars
    params = inspect.signature(fn).parameters
    hp = {k: (p.default if p.default is not inspect.Parameter.empty else 1e-3)
          for k, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY and k != "step"}
    return cast_scalars(module.scalars(step=1, **hp), np.dtype(dtype))


def compile_kernel(kernels, layout, scalars, dtype, cc):
    import numba
    from numba import cuda, types
    arr = types.Array(numba.from_dtype(np.dtype(dtype)), 1, "C")
    states = [arr if on else types.none for on in layout]
    states += [types.none] * (3 - len(states))
    with _target_cc(cc):
        ptx, _ = cuda.compile_ptx(kernels.cuda_loop(), (arr, arr, *states, numba.typeof(scalars)), cc=cc)
    return ptx


def report(ccs, dtypes=(np.float32, np.float64)):
    """Rows (kernel, states, dtype, cc, PTX lines, .f64 count) for every rule's kernels."""
    from . import RULES
    seen = set()
    for name, (module, fn, _) in RULES.items():
        if module.KERNELS in seen:  # adamw_ runs adam's kernel
            continue
        seen.add(module.KERNELS)
        for layout in variants(fn, module):
            states = "+".join(s for s, on in zip(module.STATES, layout) if on)
            for dtype in dtypes:
                scalars = example_scalars(fn, module, dtype)
                for cc in ccs:
                    ptx = compile_kernel(module.KERNELS, layout, scalars, dtype, cc)
                    yield (module.KERNELS.name, states, np.dtype(dtype).name, cc, len(ptx.splitlines()),
                           f64_count(ptx))


def compile_reduce(dtype, cc):
    """PTX of the norm reduction (``_reduce``) for ``dtype``."""
    import numba
    from numba import cuda, types
    from . import _reduce
    from ._cuda import make_reduce
    elem = numba.from_dtype(np.dtype(dtype))
    arr, idx = types.Array(elem, 1, "C"), types.Array(types.int64, 1, "C")
    fn = make_reduce(np.dtype(dtype).name, _reduce.THREADS, (_reduce.SQUARES, _reduce.MAX))
    with _target_cc(cc):
        ptx, _ = cuda.compile_ptx(fn, (arr, idx, idx, types.int64, elem, elem, arr, arr), cc=cc)
    return ptx


def report_extra(ccs, dtypes=(np.float32, np.float64)):
    """The kernels outside RULES: the gradient-norm reduction, LAMB and LARS, the averages."""
    from fastopt._dispatch import cast_scalars
    from . import ema, polyak
    for dtype in dtypes:
        for cc in ccs:
            ptx = compile_reduce(dtype, cc)
            yield ("norm", "-", np.dtype(dtype).name, cc, len(ptx.splitlines()), f64_count(ptx))
    from . import lamb, lars
    for dtype in dtypes:
        for cc in ccs:
            for name, ptx in [("lamb", p) for p in lamb.ptx(dtype, cc)] + [
                    ("lars", lars.ptx(dtype, cc, momentum=m)) for m in (True, False)]:
                yield (name, "-", np.dtype(dtype).name, cc, len(ptx.splitlines()), f64_count(ptx))
    for module in (ema, polyak):
        for dtype in dtypes:
            scalars = cast_scalars(module.scalars(step=1), np.dtype(dtype))
            for cc in ccs:
                ptx = compile_kernel(module.KERNELS, (), scalars, dtype, cc)
                yield (module.KERNELS.name, "-", np.dtype(dtype).name, cc, len(ptx.splitlines()), f64_count(ptx))
