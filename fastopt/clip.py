"""Global gradient norms: ``clip_grad_norm_`` (as ``torch.nn.utils.clip_grad_norm_``) and
the one-pass norm + non-finite check the optimizers run before a guarded or clipped step.

    total = (sum_i sum_j |g_ij|**p) ** (1/p)       (max |g_ij| for p = inf)
    coef  = min(1, max_norm / (total + 1e-6));  g *= coef
"""
import numbers

import numpy as np

from .buffer import ParamBuffer
from .kernels import _dispatch, _formats, _reduce
from .kernels._reduce import clip_coefficient
from .kernels._rule import Rule


class NormPlan:
    """A reusable reduction over fixed arrays (flattened views): the chunk table, the
    typed list (CPU) or the per-tensor row tables (CUDA), and the output slots are built
    once, so a per-step guard allocates nothing."""

    def __init__(self, arrays):
        self.arrays = [_formats.kernel_view(a.reshape(a.size) if hasattr(a, "reshape") else a) for a in arrays]
        self.sizes = [int(a.size) for a in self.arrays]
        self.chunks = _reduce.chunk_table(self.sizes)
        self.cpu = bool(self.arrays) and isinstance(self.arrays[0], np.ndarray)
        n = self.chunks.shape[0]
        if self.cpu:
            from numba.typed import List
            self.typed = List(self.arrays) if self.arrays else None
            self.totals, self.checks = np.zeros(n), np.zeros(n)
            self.kernel = _reduce.cpu(parallel=sum(self.sizes) >= _dispatch.PARALLEL_THRESHOLD)
        elif n:
            self._cuda = _CudaReduction(self.arrays, self.chunks)

    def _run(self, norm_type):
        """(combined total, combined check, per-chunk totals, per-chunk checks, mode)."""
        mode = _reduce.mode_of(norm_type)
        p = float(norm_type) if mode == _reduce.POWER else 2.0
        if not self.chunks.shape[0]:
            return 0.0, 0.0, np.zeros(0), np.zeros(0), mode
        if self.cpu:
            total, check = self.kernel(self.typed, self.chunks, mode, p, self.totals, self.checks)
            return total, check, self.totals, self.checks, mode
        totals, checks = self._cuda.partials(mode, p)
        return (*_reduce.combine(totals, checks, mode), totals, checks, mode)

    def device_partials(self, norm_type=2.0):
        """CUDA: launch the reduction and return ``(totals, checks, mode, p)``, the per-chunk
        partials left in device memory (no copy, no sync) for a device-side combination
        (``kernels._device``); None for an empty plan."""
        mode = _reduce.mode_of(norm_type)
        p = float(norm_type) if mode == _reduce.POWER else 2.0
        if self.cpu or not self.chunks.shape[0]:
            return None
        return (*self._cuda.launch(mode, p), mode, p)

    def norm(self, norm_type=2.0):
        """``(total norm, all finite)``: one pass, one compiled call on the CPU."""
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


class _CudaReduction:
    """The CUDA side of a NormPlan: per tensor, its chunks' (start, stop) rows on the device
    and its slots in the device outputs; one block-reduction launch per tensor."""

    def __init__(self, arrays, chunks):
        from numba import config, cuda
        self.dtype = _formats.compute_dtype(_dispatch._Array("grads[0]", arrays[0]).dtype)
        self.kernel = _reduce.cuda_kernel(self.dtype)
        self.totals = cuda.device_array(chunks.shape[0], self.dtype)
        self.checks = cuda.device_array(chunks.shape[0], self.dtype)
        # on the stream the arrays' producer names (CUDA array interface v3), as the updates are
        self.stream = 0 if config.ENABLE_CUDASIM else _dispatch._stream_of(arrays[0], cuda)
        self.launches = []
        for t, a in enumerate(arrays):
            rows = np.nonzero(chunks[:, 0] == t)[0]
            if rows.size:
                lo, hi = int(rows[0]), int(rows[-1]) + 1  # a tensor's chunks are consecutive rows
                x = a if config.ENABLE_CUDASIM else cuda.as_cuda_array(a, sync=False)
                self.launches.append((x, cuda.to_device(np.ascontiguousarray(chunks[lo:hi, 1])),
                                      cuda.to_device(np.ascontiguousarray(chunks[lo:hi, 2])), lo, hi))

    def launch(self, mode, p):
        """Launch the reductions; the per-chunk partials stay on the device (``totals``, ``checks``)."""
        from .kernels import _cuda
        p, zero = self.dtype.type(p), self.dtype.type(0)
        for x, starts, stops, lo, hi in self.launches:
            _cuda.launch(self.kernel, hi - lo, self.stream, x, starts, stops, mode, p, zero,
                         self.totals[lo:hi], self.checks[lo:hi])
        return self.totals, self.checks

    def partials(self, mode, p):
        self.launch(mode, p)
        totals = self.totals.copy_to_host(stream=self.stream)
        checks = self.checks.copy_to_host(stream=self.stream)
        if hasattr(self.stream, "synchronize"):  # not the simulator's 0
            self.stream.synchronize()
        return totals.astype(np.float64), checks.astype(np.float64)


def _grad_arrays(grads, name="grads", writeable=False):
    if isinstance(grads, ParamBuffer):
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
    """The global norm of ``grads`` (a ParamBuffer's grad arena, or a list of arrays)."""
    return NormPlan(_grad_arrays(grads)).norm(norm_type)[0]


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
    arrays = _grad_arrays(grads, writeable=True)  # every array checked before the first is scaled
    total, finite = NormPlan(arrays).norm(norm_type)
    if not finite and error_if_nonfinite:
        raise FloatingPointError(f"the total norm of order {norm_type} of the gradients is non-finite, "
                                 "so it cannot be clipped (error_if_nonfinite=True)")
    coef = clip_coefficient(total, max_norm)
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


SCALE = Rule("scale", scale_math, lambda h, step, lr: {})  # g *= coef in place: the grad in both slots
