"""Check the arrays of one update and run it on the device they live on.

NumPy arrays run the CPU kernel; anything with ``__cuda_array_interface__`` (CuPy,
PyTorch CUDA tensors, Numba device arrays) runs the CUDA kernel on the arrays in place.
Every check runs before any kernel does, so a rejected call writes nothing.
"""
import os
import sys
import weakref

import numpy as np

from ._formats import BFLOAT16, BY_NAME, _dtype_or_none, compute_dtype, kernel_view

#: float64, float32, float16 and bfloat16 (``ml_dtypes.bfloat16``; see ``_formats``)
SUPPORTED_DTYPES = tuple(BY_NAME.values())
_SUPPORTED = ", ".join(BY_NAME)

# Below this many elements the serial CPU loop wins: waking the thread pool costs a few
# microseconds (benchmarks/test_threshold.py measures the crossover on a given machine).
PARALLEL_THRESHOLD = int(os.environ.get("FASTOPT_PARALLEL_THRESHOLD", 65536))


class _Array:
    """What the checks need to know of one argument, whatever library it came from."""

    __slots__ = ("contiguous", "device", "dtype", "name", "obj", "shape", "writeable")

    def __init__(self, name, obj):
        self.name, self.obj = name, obj
        if isinstance(obj, np.ndarray):
            self.device = "cpu"
            self.dtype, self.shape = obj.dtype, obj.shape
            flags = obj.flags
            self.contiguous, self.writeable = flags.c_contiguous, flags.writeable
        elif hasattr(obj, "__cuda_array_interface__"):
            cai = obj.__cuda_array_interface__
            self.device = "cuda"
            self.dtype, self.shape = _cuda_dtype(obj, cai), tuple(cai["shape"])
            c_strides = _c_strides(self.shape, self.dtype.itemsize)
            strides = cai.get("strides")
            self.contiguous = strides is None or tuple(strides) == c_strides or _size(self.shape) <= 1
            self.writeable = not cai["data"][1]
        elif _is_simulated_device_array(obj):
            self.device = "cuda"
            self.dtype, self.shape = obj.dtype, tuple(obj.shape)
            self.contiguous = obj.is_c_contiguous()
            self.writeable = True
        else:
            raise TypeError(
                f"{name} must be a NumPy array or a CUDA array (CuPy, PyTorch CUDA tensor, "
                f"Numba device array), got {type(obj).__name__}")

    def span(self):
        """[first, last) byte addresses (a simulated device array's: those of the host memory
        it simulates), or None where unknown."""
        if self.device == "cpu":
            ptr = self.obj.__array_interface__["data"][0]
        elif hasattr(self.obj, "__cuda_array_interface__"):
            ptr = self.obj.__cuda_array_interface__["data"][0]
        elif _is_simulated_device_array(self.obj):
            ptr = self.obj._ary.__array_interface__["data"][0]
        else:
            return None
        return ptr, ptr + _size(self.shape) * self.dtype.itemsize


def _cuda_dtype(obj, cai):
    """The dtype of a CUDA array: its own NumPy ``dtype`` where it has one of the interface's
    width (a Numba view of bfloat16 memory: the interface can only say ``<V2``), else the
    interface's ``typestr``."""
    typestr = np.dtype(cai["typestr"])
    own = _dtype_or_none(getattr(obj, "dtype", None))
    return own if own is not None and own.itemsize == typestr.itemsize else typestr


def _c_strides(shape, itemsize):
    strides, step = [], itemsize
    for d in reversed(shape):
        strides.append(step)
        step *= d
    return tuple(reversed(strides))


def _size(shape):
    n = 1
    for d in shape:
        n *= d
    return n


def _is_simulated_device_array(obj):
    sim = sys.modules.get("numba.cuda.simulator.cudadrv.devicearray")
    return sim is not None and isinstance(obj, sim.FakeCUDAArray)


def as_kernel_array(a):
    """A PyTorch CUDA tensor as a Numba device array over the same memory (its ``size`` is a
    method, its ``reshape`` a copy-or-view, and a tensor that requires grad raises on
    ``__cuda_array_interface__``); every other array as it is.

    torch refuses ``__cuda_array_interface__`` for bfloat16, so a bfloat16 tensor crosses as
    its 16-bit pattern (``view(torch.int16)``, no copy) and the Numba array is viewed back
    as ``ml_dtypes.bfloat16``: the dtype the checks and the kernels expect of bf16 memory."""
    if is_torch(a) and getattr(a, "is_cuda", False):
        from numba import cuda
        t = a.detach()
        if str(t.dtype) == "torch.bfloat16" and BFLOAT16 is not None:
            return cuda.as_cuda_array(t.view(sys.modules["torch"].int16), sync=False).view(BFLOAT16)
        return cuda.as_cuda_array(t, sync=False)
    return a


def is_torch(a):
    return type(a).__module__.startswith("torch")


def check_array(a, *, like=None, shape_of=None, written=True, dtype=True):
    """The one check of an array of an update (an :class:`_Array`), with one wording for
    each kind of error: a supported dtype; ``like``'s device and (``dtype=True``) dtype;
    ``shape_of``'s shape; C-contiguous; writeable when it is ``written`` (updated in place)."""
    if (like is None or not dtype) and a.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{a.name} has dtype {a.dtype}; fastopt supports {_SUPPORTED}")
    if like is not None and a.device != like.device:
        raise ValueError(f"{a.name} is a {_where(a)} array but {like.name} is a {_where(like)} array: "
                         "the arrays of an update live on one device")
    if like is not None and dtype and a.dtype != like.dtype:
        raise TypeError(f"{a.name} has dtype {a.dtype} but {like.name} has dtype {like.dtype}")
    if shape_of is not None and tuple(a.shape) != tuple(shape_of.shape):
        raise ValueError(f"{a.name} has shape {tuple(a.shape)} but {shape_of.name} has shape {tuple(shape_of.shape)}")
    if not a.contiguous:
        raise ValueError(f"{a.name} is not C-contiguous; pass a contiguous array (e.g. np.ascontiguousarray) "
                         "so that it can be read as one block")
    if written and not a.writeable:
        raise ValueError(f"{a.name} is read-only; it is updated in place and must be writeable")
    return a


def check_arrays(param, grad, states):
    """Validate ``param``, ``grad`` and the named ``states`` (None entries are skipped).

    Returns the list of checked arrays, param first. Raises TypeError / ValueError naming
    the offending argument.
    """
    arrays = [_Array("param", param), _Array("grad", grad)]
    arrays += [_Array(name, a) for name, a in states.items() if a is not None]
    ref = check_array(arrays[0])
    for a in arrays[1:]:
        check_array(a, like=ref, shape_of=ref, written=a is not arrays[1])
    check_no_overlap(arrays[:1] + arrays[2:], arrays[1:2])
    return arrays


def _where(a):
    return "NumPy (CPU)" if a.device == "cpu" else "CUDA"


def check_no_overlap(written, read=()):
    """Raise ValueError when an array that is written shares memory with any other array
    (written or read); read-only arrays may share memory with each other. ``written`` and
    ``read`` are :class:`_Array` lists. Memory spans are compared, not base objects (an
    ``np.frombuffer`` alias has another base), sorted by address: n log n for a model of
    thousands of tensors. Arrays whose addresses are unknown are skipped."""
    spans = []
    for order, (a, writes) in enumerate([(a, True) for a in written] + [(a, False) for a in read]):
        span = a.span()
        if span is not None and span[0] < span[1]:
            spans.append((span[0], span[1], writes, order, a.name))
    # sweep by start: a span overlaps an earlier one iff it starts before the furthest end so far
    written_end = read_end = 0
    written_by = read_by = None
    clashes = []
    for start, stop, writes, order, name in sorted(spans):
        other = written_by if start < written_end else read_by if writes and start < read_end else None
        if other is not None:
            clashes.append(tuple(sorted((other, (order, name)))))
        if writes and stop > written_end:
            written_end, written_by = stop, (order, name)
        elif not writes and stop > read_end:
            read_end, read_by = stop, (order, name)
    if clashes:  # name the clash that comes first in argument order, whatever the addresses
        first, second = min(clashes)
        raise ValueError(f"{first[1]} and {second[1]} share memory: every array that is written "
                         "must be its own buffer")


def launch(kernels, param, grad, states, values, master=None, key=None):
    """Run ``kernels`` (a rule's, see ``_engine.Kernels``) over the arrays, already checked by
    :func:`check_arrays`; ``values``: the math's scalars by name, from the rule's host code;
    ``master``: None, or the float32 copy the math reads and writes (``param`` then receives
    it rounded); ``key``: None, or the rounding key of stochastic rounding."""
    arrays = [kernel_view(a) for a in (param, grad, *states, master)]
    dtype = compute_dtype(_Array("param", param).dtype if master is None else _Array("master", master).dtype)
    if isinstance(param, np.ndarray):
        flat = [None if a is None else a.reshape(-1) for a in arrays]
        kernel = kernels.cpu(parallel=param.size >= PARALLEL_THRESHOLD)
        kernel(*flat, kernels.scalars.pack(values, dtype, key=key))
        return
    _launch_cuda(kernels, arrays, kernels.scalars.pack(values, dtype, key=key))


def _launch_cuda(kernels, arrays, scalars):
    """Launch on CUDA arrays ``(param, grad, *states, master)`` (kernel views: a 16-bit float
    as its bits); ``scalars`` already packed. The arrays' device views come from
    :func:`device_views` and the stream from :func:`_stream_of`, so a plan's steps convert
    nothing and allocate nothing but the scalars."""
    from numba import config, cuda

    from . import _cuda
    flat = device_views(arrays)
    stream = 0 if config.ENABLE_CUDASIM else _stream_of(arrays[0], cuda)
    _cuda.launch_stride(kernels.cuda(), flat[0].size, stream, *flat, scalars)


# id(array) per argument -> (weak references to the arrays, their flat Numba device views)
_VIEWS = {}


def device_views(arrays):
    """Flat Numba device views of CUDA ``arrays`` (None stays None), converted once per tuple
    of arrays and reused while every one of them lives: an optimizer's plan launches on the
    same arrays every step, and a conversion (``cuda.as_cuda_array``) costs microseconds of
    host time per array. The views do not own the memory (the arrays do): the entry goes
    when any of its arrays is collected. Arrays that take no weak reference are converted at
    every call."""
    key = tuple(map(id, arrays))
    hit = _VIEWS.get(key)
    if hit is not None and all(r is None if a is None else r is not None and r() is a for r, a in zip(hit[0], arrays)):
        return hit[1]
    try:
        refs = _weak_refs(arrays, key)
    except TypeError:  # no weak references: a view that owns a reference, every call
        return [None if a is None else _flat_view(a, owned=True) for a in arrays]
    views = [None if a is None else _flat_view(a, owned=False) for a in arrays]
    _VIEWS[key] = (refs, views)
    return views


def _weak_refs(arrays, key):
    def drop(_):
        entry = _VIEWS.get(key)
        if entry is not None and entry[0] is refs:  # not a newer entry under a reused id
            del _VIEWS[key]
    refs = [None if a is None else weakref.ref(a, drop) for a in arrays]
    return refs


def _flat_view(a, owned):
    """``a`` as a 1-D Numba device array over the same memory; ``owned``: the view keeps ``a``
    alive (else the caller must)."""
    if not hasattr(a, "__cuda_array_interface__") or _is_numba_device_array(a):
        return a.reshape(a.size)  # a Numba device array (or the simulator's): a view of its own
    from numba import cuda
    view = cuda.from_cuda_array_interface(a.__cuda_array_interface__, owner=a if owned else None, sync=False)
    return view.reshape(view.size)


def _is_numba_device_array(a):
    return type(a).__module__.startswith(("numba.cuda", "numba_cuda"))


_STREAMS = {}  # stream handle -> Numba stream object (one process, one device: fastopt's GPU scope)


def _stream_of(obj, cuda):
    """The stream the producer of ``obj`` launches on now: CuPy's current stream for a CuPy
    array, torch's current stream for memory a torch tensor owns (its array interface, v2,
    names none), a Numba array's own stream, else the stream its array interface names (v3)."""
    module = type(obj).__module__
    if module.startswith("cupy"):
        ptr = sys.modules["cupy"].cuda.get_current_stream().ptr
    elif _is_numba_device_array(obj):
        owner = getattr(getattr(obj, "gpu_data", None), "owner", None)
        if type(owner).__module__.startswith("torch"):
            ptr = sys.modules["torch"].cuda.current_stream(owner.device).cuda_stream
        elif obj.stream:
            return obj.stream
        else:
            ptr = None
    else:
        ptr = getattr(obj, "__cuda_array_interface__", {}).get("stream")
    stream = _STREAMS.get(ptr)
    if stream is None:
        if ptr is None:
            stream = cuda.default_stream()
        elif ptr in (0, 1):  # 0: CuPy's and torch's null stream, 1: the interface's name for it
            stream = cuda.legacy_default_stream()
        elif ptr == 2:
            stream = cuda.per_thread_default_stream()
        else:
            stream = cuda.external_stream(ptr)
        _STREAMS[ptr] = stream
    return stream


def update(kernels, param, grad, states, values):
    """Check every array, then run one fused pass of ``kernels``."""
    check_arrays(param, grad, states)
    launch(kernels, param, grad, list(states.values()), values)
