"""Compile every CUDA kernel to PTX, without a GPU, and count its float64 instructions.

A float32 kernel with any ``.f64`` instruction has a float64 leak (a bare literal, a
Python-float scalar): it runs at a fraction of the speed on most GPUs, and nothing else
catches it (the simulator accepts float64 silently).
"""
import itertools
import re

import numpy as np

from ._cuda_cc import _target_cc
from ._formats import BITS, compute_dtype, kernel_dtype

_F64 = re.compile(r"\.f64\b")


def f64_count(ptx):
    return sum(1 for line in ptx.splitlines() if _F64.search(line))


def variants(rule):
    """The state layouts a rule's kernel is launched with: each optional state present or not."""
    optional = [st.name for st in rule.state_list if st.when is not None]
    for present in itertools.product((True, False), repeat=len(optional)):
        on = dict(zip(optional, present))
        yield tuple(on.get(s, True) for s in rule.states)


def example_scalars(rule, dtype, key=None):
    """The kernel's scalar tuple at the rule's defaults (the types are what PTX depends on);
    ``key``: a stochastic-rounding key, or None."""
    c = rule.kernel_scalars(rule.defaults, 1, rule.defaults.get("lr"), np.dtype(dtype))
    return (*c[:-1], key)


def _array_types(dtype, layout, master, state=None):
    """The argument types every rule kernel starts with: (params' array type, one type per
    state slot of ``layout`` (``state``: the types one present state takes, default an array
    like the params'; ``none`` for each absent one), the float32 master copy's type or none)."""
    import numba
    from numba import types
    arr = types.Array(numba.from_dtype(kernel_dtype(dtype)), 1, "C")
    state = (arr,) if state is None else state
    states = [t for on in layout for t in (state if on else (types.none,) * len(state))]
    return arr, states, types.Array(types.float32, 1, "C") if master else types.none


def _ptx(fn, sig, cc):
    from numba import cuda
    with _target_cc(cc):
        ptx, _ = cuda.compile_ptx(fn, sig, cc=cc)
    return ptx


def compile_kernel(kernels, layout, scalars, dtype, cc, master=False):
    """PTX of a rule's CUDA loop with the states of ``layout`` present (the others None), for
    arrays stored as ``dtype``; ``master``: with a float32 master copy of the params."""
    import numba
    arr, states, copy = _array_types(dtype, layout, master)
    return _ptx(kernels.cuda_loop(), (arr, arr, *states, copy, numba.typeof(scalars)), cc)


#: the storage formats of the report: float64 (the only one allowed .f64), float32 and the 16-bit ones
DTYPES = (np.float32, np.float64, *BITS)


def report(ccs, dtypes=DTYPES):
    """Rows (kernel, states, dtype, cc, PTX lines, .f64 count) for every rule's kernels; a
    16-bit format also with a float32 master copy and stochastic rounding (``+master+sr``)."""
    from . import RULES
    seen = set()
    for rule, _, _ in RULES.values():
        if rule.kernels in seen:  # adamw runs adam's kernels
            continue
        seen.add(rule.kernels)
        for n, layout in enumerate(variants(rule)):
            states = "+".join(s for s, on in zip(rule.states, layout) if on)
            for dtype in dtypes:
                forms = [(False, None)] + ([(True, np.uint64(1))] if np.dtype(dtype) in BITS and n == 0 else [])
                for master, key in forms:
                    scalars = example_scalars(rule, dtype, key)
                    for cc in ccs:
                        ptx = compile_kernel(rule.kernels, layout, scalars, dtype, cc, master)
                        yield (rule.name, states + ("+master+sr" if master else ""), np.dtype(dtype).name, cc,
                               len(ptx.splitlines()), f64_count(ptx))


def compile_layers(kernels, layout, scalars, dtype, cc):
    """PTX of a CUDA layer kernel (``_engine``'s layer forms: a norm, LAMB's, LARS's) with the
    states of ``layout`` present, as ``kernels._layers`` launches it for arrays stored as ``dtype``."""
    import numba
    from numba import types
    arr, states, _ = _array_types(dtype, layout, False)
    table = types.Array(numba.from_dtype(compute_dtype(dtype)), 2, "C")
    sig = (arr, arr if kernels.reads_grad else types.none, *states, types.Array(types.int64, 2, "C"),
           table if kernels.per_tensor else types.none, numba.typeof(scalars), table if kernels.sums else types.none)
    return _ptx(kernels.layers_cuda_loop(dtype), sig, cc)


def layer_kernels(rule):
    """(kernels, layout) of every CUDA layer kernel of a per-tensor rule: its first pass, then its update."""
    for kernels in (rule.first_kernels, rule.kernels):
        if kernels is not None:
            for layout in variants(rule):
                yield kernels, layout


def report_extra(ccs, dtypes=DTYPES):
    """The kernels outside RULES: the gradient-norm reduction, LAMB and LARS, the averages."""
    from . import _reduce, ema, polyak
    for mode, kernels in _reduce.NORM.items():
        for dtype in dtypes:
            c = kernels.scalars.pack({"norm_type": 3.0} if mode == _reduce.POWER else {}, dtype)
            for cc in ccs:
                ptx = compile_layers(kernels, (), c, dtype, cc)
                yield (kernels.name, "-", np.dtype(dtype).name, cc, len(ptx.splitlines()), f64_count(ptx))
    from . import lamb, lars
    for rule in (lamb.LAMB, lars.LARS):
        for kernels, layout in layer_kernels(rule):
            states = "+".join(s for s, on in zip(rule.states, layout) if on) or "-"
            for dtype in (np.float32, np.float64):  # fastopt.layerwise takes float32 and float64
                scalars = example_scalars(rule, dtype)
                for cc in ccs:
                    ptx = compile_layers(kernels, layout, scalars, dtype, cc)
                    yield (rule.name, states, np.dtype(dtype).name, cc, len(ptx.splitlines()), f64_count(ptx))
    for rule in (ema.EMA, polyak.POLYAK):
        for dtype in dtypes:
            scalars = example_scalars(rule, dtype)
            for cc in ccs:
                ptx = compile_kernel(rule.kernels, (), scalars, dtype, cc)
                yield (rule.name, "-", np.dtype(dtype).name, cc, len(ptx.splitlines()), f64_count(ptx))
    yield from report_8bit(ccs)
    yield from report_device(ccs, dtypes)


def compile_blockwise(blockwise, layout, scalars, dtype, cc, master=False):
    """PTX of an 8-bit blockwise kernel (``_blockwise``) with the states of ``layout`` kept as
    codes and block scales (the others None), params stored as ``dtype``."""
    import numba
    from numba import types
    codes_and_scales = (types.Array(types.uint8, 1, "C"), types.Array(types.float32, 1, "C"))
    arr, states, copy = _array_types(dtype, layout, master, codes_and_scales)
    return _ptx(blockwise.cuda_loop(), (arr, arr, *states, copy, numba.typeof(scalars)), cc)


def report_8bit(ccs):
    """Rows (``<rule>8bit``, states and code map, param dtype, ...) for every rule with an 8-bit
    form: every state layout with float32 params and the default code; the first layout also
    with the other code map, with 16-bit params, and with 16-bit params + float32 masters +
    stochastic rounding (8-bit state takes no float64 params: there is no float64 form)."""
    from . import RULES, _blockwise
    seen = set()
    for rule, _, _ in RULES.values():
        if rule.kernels in seen or rule.kernels.name not in _blockwise.RULES:
            continue
        seen.add(rule.kernels)
        for n, layout in enumerate(variants(rule)):
            states = "+".join(s for s, on in zip(rule.states, layout) if on) or "-"
            forms = [(np.float32, code, False, None) for code in _blockwise.CODES if n == 0 or
                     code == _blockwise.DEFAULT_CODE]
            if n == 0:
                forms += [(d, _blockwise.DEFAULT_CODE, master, key) for d in BITS
                          for master, key in ((False, None), (True, np.uint64(1)))]
            for dtype, code, master, key in forms:
                scalars = example_scalars(rule, dtype, key)
                for cc in ccs:
                    ptx = compile_blockwise(_blockwise.blockwise(rule.kernels, code), layout, scalars, dtype, cc,
                                            master)
                    yield (f"{rule.name}8bit", f"{states}:{code}" + ("+master+sr" if master else ""),
                           np.dtype(dtype).name, cc, len(ptx.splitlines()), f64_count(ptx))


# -- the steps decided on the device (kernels/_device.py) -----------------------------------

def compile_update(rule, layout, dtype, cc, master=False):
    """PTX of ``rule``'s device-row update kernel (``_device.make_update``) for ``dtype``."""
    import numba
    from numba import types

    from . import _device
    arr, states, copy = _array_types(dtype, layout, master)
    acc = numba.from_dtype(compute_dtype(dtype))
    sig = (arr, arr, *states, copy, numba.typeof(example_scalars(rule, dtype)), types.Array(acc, 1, "C"), acc)
    return _ptx(_device.make_update(rule.kernels, rule), sig, cc)


def compile_prologue(rule, dtype, cc):
    """PTX of ``rule``'s one-thread prologue for params of ``dtype`` (partials and output rows
    in its math's dtype; the norm, status and scalars in float64, as the host computes them)."""
    import numba
    from numba import types

    from . import _device
    acc = numba.from_dtype(compute_dtype(dtype))
    f64, i64 = types.float64, types.int64
    flag = types.boolean
    amp = types.Array(types.float32, 1, "C")  # GradScaler's scale and found_inf are float32 tensors
    sig = (types.Array(acc, 1, "C"), types.Array(acc, 1, "C"), i64, f64, flag, flag, flag, flag, f64, f64, amp, amp,
           types.Array(f64, 1, "C"), types.Array(i64, 1, "C"), types.Array(i64, 1, "C"), types.Array(f64, 2, "C"),
           types.Array(f64, 2, "C"), types.Array(i64, 2, "C"), types.Array(acc, 2, "C"))
    return _ptx(_device.make_prologue(rule), sig, cc)


def report_device(ccs, dtypes=DTYPES):
    """Rows of the device-decided steps' kernels: per rule that supports them, its update
    (every storage format, a 16-bit one also with a float32 master copy) and its prologue.
    The prologue is float64 by design (the host's precision for the norm and the per-step
    scalars, in one thread per step: its ``.f64`` cost nothing measurable): its row says
    ``float64``, so the float64 leak count leaves it out, as every float64 kernel."""
    from . import RULES, _device
    seen = set()
    for rule, _, _ in RULES.values():
        if rule.kernels in seen or _device.unsupported(rule):
            continue
        seen.add(rule.kernels)
        layout = next(variants(rule))
        states = "+".join(s for s, on in zip(rule.states, layout) if on)
        for dtype in dtypes:
            for master in (False, True) if np.dtype(dtype) in BITS else (False,):
                for cc in ccs:
                    ptx = compile_update(rule, layout, dtype, cc, master)
                    yield (rule.name, f"{states}{'+master' if master else ''}:device-row", np.dtype(dtype).name, cc,
                           len(ptx.splitlines()), f64_count(ptx))
        for cc in ccs:
            ptx = compile_prologue(rule, np.float32, cc)
            yield (rule.name, "prologue:float64-by-design", "float64", cc, len(ptx.splitlines()), f64_count(ptx))
