"""Global gradient norms: ``clip_grad_norm_`` (as ``torch.nn.utils.clip_grad_norm_``) and
the one-pass norm + non-finite check the optimizers run before a guarded or clipped step.

    total = (sum_i sum_j |g_ij|**p) ** (1/p)       (max |g_ij| for p = inf)
    coef  = min(1, max_norm / (total + 1e-6));  g *= coef
"""
import math
import numbers
import weakref

import numpy as np

from .buffer import ParamBuffer
from .kernels import _dispatch, _formats, _layers, _reduce
from .kernels._reduce import clip_coefficient
from .kernels._rule import Rule


class NormPlan:
    """A reusable reduction over fixed arrays (flattened views), laid out once as the
    engine's layer passes take them (``kernels._layers.Layers``: the chunk table, the typed
    list on the CPU, the row tables on CUDA, the output slots), so a per-step guard
    allocates nothing. The pass itself is ``kernels._reduce.NORM``'s."""

    def __init__(self, arrays):
        self.arrays = [_formats.kernel_view(a.reshape(a.size) if hasattr(a, "reshape") else a) for a in arrays]
        self.sizes = [int(a.size) for a in self.arrays]
        self.layers = _layers.Layers(self.arrays, {}, chunk=(_reduce.CHUNK,) * 2) if self.arrays else None
        self.chunks = self.layers.chunks if self.arrays else np.zeros((0, 4), np.int64)
        self.cpu = bool(self.arrays) and self.layers.cpu
        self._passes = {}  # norm_type -> (its pass, bound to the arrays and scalars, mode, p)

    def _launch(self, norm_type):
        """Run the pass of ``norm_type``'s mode; returns ``(the pass, mode, p)``."""
        found = self._passes.get(norm_type)
        if found is None:
            mode = _reduce.mode_of(norm_type)
            p = float(norm_type) if mode == _reduce.POWER else 2.0
            kernels = _reduce.NORM[mode]
            # float64 scalars on the CPU: |x|**p in float64, as the reference; CUDA's in the math's dtype
            c = kernels.scalars.pack({"norm_type": p} if mode == _reduce.POWER else {},
                                     np.float64 if self.cpu else self.layers.dtype)
            found = self._passes[norm_type] = (self.layers.bind(kernels, c), mode, p)
        found[0]()
        return found

    def _run(self, norm_type):
        """(combined total, combined check, per-chunk totals, per-chunk checks, mode)."""
        if not self.chunks.shape[0]:
            return 0.0, 0.0, np.zeros(0), np.zeros(0), _reduce.mode_of(norm_type)
        _, mode, _ = self._launch(norm_type)
        if self.cpu:  # the pass returned the totals, added in chunk order
            total, check = self.layers.totals
            totals, checks = self.layers.sums
            return total, check, totals, checks, mode
        stream = self.layers.stream()
        sums = self.layers.sums.copy_to_host(stream=stream)
        if hasattr(stream, "synchronize"):  # not the simulator's 0
            stream.synchronize()
        totals, checks = sums.astype(np.float64)
        return (*_reduce.combine(totals, checks, mode), totals, checks, mode)

    def device_partials(self, norm_type=2.0):
        """CUDA: launch the reduction and return ``(totals, checks, mode, p)``, the per-chunk
        partials left in device memory (no copy, no sync) for a device-side combination
        (``kernels._device``); None for an empty plan."""
        if self.cpu or not self.chunks.shape[0]:
            return None
        _, mode, p = self._launch(norm_type)
        return self.layers.sums[0], self.layers.sums[1], mode, p

    def norm(self, norm_type=2.0):
        """``(total norm, all finite)``: one pass, one compiled call on the CPU."""
        if self.cpu and self.chunks.shape[0]:  # a guarded step's hot path: the totals, no partials
            _, mode, p = self._launch(norm_type)
            total, check = self.layers.totals
            return _reduce.finish(total, check, mode, p)
        total, check, _, _, mode = self._run(norm_type)
        return _reduce.finish(total, check, mode, float(norm_type))

    def segment_norms(self, norm_type=2.0):
        """The norm of each array, and whether all were finite."""
        _, check, totals, _, mode = self._run(norm_type)
        sums = _reduce.segment_sums(totals, self.chunks, len(self.arrays), mode)
        finite = check == check
        if mode == _reduce.SQUARES:
            return np.sqrt(sums), finite
        return (sums if mode == _reduce.MAX else sums ** (1.0 / float(norm_type))), finite


_BUFFER_PLANS = weakref.WeakKeyDictionary()  # ParamBuffer -> NormPlan of its params' gradient spans


def _grad_spans(buf):
    """``buf``'s params' spans of its grad arena, flat (the alignment padding left out)."""
    return [buf.grad_arena[o:o + g.size] for o, g in zip(buf.offsets, buf.grads) if g.size]


def _buffer_plan(buf):
    """The norm of ``buf``'s gradients: its params' spans (the alignment padding never counts),
    laid out once per buffer (a typed list of a view per param costs ms for hundreds of them)."""
    plan = _BUFFER_PLANS.get(buf)
    if plan is None:
        plan = _BUFFER_PLANS[buf] = NormPlan(_grad_spans(buf))
    return plan


def _grad_arrays(grads, name="grads", writeable=False):
    if isinstance(grads, ParamBuffer):  # its norm is _buffer_plan's; it is scaled as one array
        return [grads.grad_arena]
    grads = [grads] if hasattr(grads, "shape") else list(grads)
    grads = [_dispatch.as_kernel_array(g) for g in grads]
    if grads:  # the one array check: dtypes may differ between gradients, devices may not
        first = _dispatch.check_array(_dispatch._Array(f"{name}[0]", grads[0]), written=writeable)
        for i, g in enumerate(grads[1:], 1):
            a = _dispatch.check_array(_dispatch._Array(f"{name}[{i}]", g), written=writeable)
            _dispatch.check_array(a, like=first, written=False, dtype=False)
    return grads


def grad_norm(grads, norm_type=2.0):
    """The global norm of ``grads`` (a ParamBuffer's gradients, or a list of arrays)."""
    return _norm_of(grads, norm_type)[0]


def _norm_of(grads, norm_type, writeable=False):
    """``(norm, all finite, the arrays to scale)`` of ``grads``, every array checked."""
    arrays = _grad_arrays(grads, writeable=writeable)
    if isinstance(grads, ParamBuffer):
        return (*_buffer_plan(grads).norm(norm_type), arrays)
    return (*_global_norm(arrays, norm_type), arrays)


def _global_norm(arrays, norm_type):
    """``(norm, all finite)`` of arrays whose dtypes may differ (as torch's clip takes them):
    one pass per dtype, the partial norms combined in float64, in the order the dtypes come."""
    groups = {}
    for a in arrays:
        groups.setdefault(str(a.dtype), []).append(a)
    if len(groups) <= 1:
        return NormPlan(arrays).norm(norm_type)
    mode = _reduce.mode_of(norm_type)
    parts = [NormPlan(g).norm(norm_type) for g in groups.values()]
    norms = np.array([n for n, _ in parts], np.float64)
    finite = all(f for _, f in parts)
    if mode == _reduce.MAX:
        return float(norms.max()), finite
    p = 2.0 if mode == _reduce.SQUARES else float(norm_type)
    return float(np.sum(norms ** p) ** (1.0 / p)), finite


def clip_grad_norm_(grads, max_norm, norm_type=2.0, error_if_nonfinite=False):
    """Scale ``grads`` in place so their global norm is at most ``max_norm``; returns the
    norm before clipping (a float), as ``torch.nn.utils.clip_grad_norm_`` does.

    ``grads`` is a ParamBuffer (its grad arena, one pass) or a list of arrays. The norm is
    a deterministic reduction: the same gradients give the same bits on every run. An
    optimizer built with ``max_grad_norm=`` does the same without this separate scaling
    pass: the factor is applied inside its update kernel.
    """
    if not (isinstance(max_norm, numbers.Real) and not isinstance(max_norm, (bool, np.bool_)) and max_norm > 0):
        raise ValueError(f"max_norm must be a positive number, got {max_norm!r}")
    total, finite, arrays = _norm_of(grads, norm_type, writeable=True)  # all checked before any is scaled
    if error_if_nonfinite and not (finite and math.isfinite(total)):  # an overflowing sum too, as torch
        raise FloatingPointError(f"the total norm of order {norm_type} of the gradients is non-finite, "
                                 "so it cannot be clipped (error_if_nonfinite=True)")
    coef = clip_coefficient(total, max_norm)
    if isinstance(grads, ParamBuffer) and not math.isfinite(coef):
        arrays = _grad_spans(grads)  # the padding's zeros times a NaN factor would be NaN
    if coef != 1.0:  # NaN included: a non-finite norm spreads to the gradients, as in torch
        for a in arrays:
            if isinstance(a, np.ndarray):
                a *= a.dtype.type(coef)
            else:
                flat = a.reshape(a.size)
                scalars = SCALE.kernels.scalars.pack({}, flat.dtype, coef)
                _dispatch._launch_cuda(SCALE.kernels, [flat, flat, None], scalars)
    return total


def scale_math(p, g):
    return g  # the loop has already multiplied g by the kernel's grad_scale


# g *= coef in place (the grad in both slots); also the averagers' converting copy (fastopt/averaging.py)
SCALE = Rule("scale", scale_math, lambda h, step, lr: {})
