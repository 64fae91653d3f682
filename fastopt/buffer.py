"""ParamBuffer: a model's parameters as views into one contiguous arena, and a twin
arena for their gradients, so that an optimizer updates the whole model in one pass."""
import copy
import operator
import weakref

import numpy as np

from .kernels._dispatch import SUPPORTED_DTYPES, _Array
from .kernels._formats import BFLOAT16, BY_NAME

ALIGN = 64  # bytes: each view starts on a cache line (and so on a 16-byte boundary)


def _array_module(device):
    if device == "cpu":
        return np
    if device == "cuda":
        try:
            import cupy
        except ImportError as e:
            raise ImportError("device='cuda' needs CuPy: pip install fastopt[cuda]") from e
        return cupy
    raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")


def layout(shapes, dtype):
    """Offsets (in elements) of each shape's segment in an arena, and the arena's size."""
    step = ALIGN // np.dtype(dtype).itemsize
    offsets, end = [], 0
    for s in shapes:
        offsets.append(end)
        end += -(-_numel(s) // step) * step  # round each segment up to whole cache lines
    return offsets, end


def _shape(shape, i):
    """``shape`` as a tuple of non-negative ints; a negative or fractional size is an error."""
    dims = (shape,) if isinstance(shape, (int, np.integer)) else tuple(shape)
    out = []
    for d in dims:
        try:
            d = operator.index(d)  # 3.5 is refused, not truncated to 3
        except TypeError:
            raise TypeError(f"shapes[{i}] = {shape!r}: sizes must be integers") from None
        if d < 0:
            raise ValueError(f"shapes[{i}] = {shape!r}: sizes must be >= 0")
        out.append(d)
    return tuple(out)


def _numel(shape):
    return int(np.prod(shape, dtype=np.int64))


_BUFFERS = weakref.WeakSet()  # live buffers, so an optimizer can recognise their views


def find_segment(array):
    """``(buffer, i)`` when ``array`` is exactly view ``i`` of a live ParamBuffer, else None."""
    span = _Array("param", array).span()
    if span is None:
        return None
    for buf in list(_BUFFERS):
        start, stop = _Array("arena", buf.arena).span()
        if start <= span[0] < stop and array.dtype == buf.dtype:
            offset, rem = divmod(span[0] - start, buf.dtype.itemsize)
            if rem == 0 and offset in buf._index:
                i = buf._index[offset]
                if tuple(array.shape) == buf.shapes[i]:
                    return buf, i
    return None


def _aligned_empty(xp, n, dtype):
    """n elements whose first one sits on an ALIGN-byte boundary."""
    itemsize = np.dtype(dtype).itemsize
    raw = xp.empty(n + ALIGN // itemsize, dtype)
    ptr = raw.data.ptr if xp is not np else raw.ctypes.data
    skip = (-ptr % ALIGN) // itemsize
    return raw[skip:skip + n]


def _realigned(arena):
    """``arena``, or an ALIGN-aligned copy of it where it is not aligned."""
    if arena.ctypes.data % ALIGN == 0:
        return arena
    out = _aligned_empty(np, arena.size, arena.dtype)
    out[...] = arena
    return out


# Arrays on any device: NumPy, CuPy, Numba device arrays (torch CUDA tensors arrive as those)


def _zeros(like, n, dtype):
    """A zeroed arena of ``n`` elements on ``like``'s device, cache-line aligned."""
    if isinstance(like, np.ndarray) or type(like).__module__.startswith("cupy"):
        xp = np if isinstance(like, np.ndarray) else _cupy()
        arena = _aligned_empty(xp, n, dtype)
        arena.fill(0)
        return arena
    from numba import cuda  # torch CUDA tensors, Numba device arrays (and the simulator's)
    return cuda.to_device(np.zeros(n, dtype))


def _all_zero(arena):
    """Whether every element is zero (NumPy, CuPy; False where it cannot be asked cheaply)."""
    return bool(not arena.any()) if hasattr(arena, "any") else False


def _zero(arena):
    if hasattr(arena, "fill"):  # NumPy, CuPy
        arena.fill(0)
    else:                       # Numba device arrays
        arena.copy_to_device(np.zeros(arena.shape, arena.dtype))
    return arena


def _to_host(a):
    if isinstance(a, np.ndarray):
        return a.copy()
    if hasattr(a, "get"):
        return a.get()
    if hasattr(a, "copy_to_host"):
        return a.copy_to_host()
    return np.asarray(a.detach().cpu())


def _copy_in(arena, offset, host):
    if isinstance(arena, np.ndarray):
        arena[offset:offset + host.size] = host
    elif hasattr(arena, "get"):
        arena[offset:offset + host.size] = _cupy().asarray(host)
    else:
        arena[offset:offset + host.size].copy_to_device(np.ascontiguousarray(host))


def _cupy():
    import cupy
    return cupy


def _from_torch_value(x):
    if type(x).__module__.startswith("torch"):
        x = x.detach().cpu()
        if x.ndim == 0:
            return x.item()
        if str(x.dtype) == "torch.bfloat16":  # NumPy's is ml_dtypes': the same bits
            import torch
            return x.view(torch.int16).numpy().view(BFLOAT16)
        return x.numpy()
    return x


class ParamBuffer:
    """``ParamBuffer([w1, b1, w2])`` copies the arrays into one arena;
    ``ParamBuffer(shapes=[(3, 4), (4,)], dtype=np.float32, device="cpu")`` allocates zeros.

    ``params`` / ``grads`` are lists of views (in order) into ``arena`` / ``grad_arena``;
    ``offsets[i]`` is where view i starts in the arena. Gaps between segments (alignment
    padding) hold zeros in both arenas, which every rule leaves at zero.

    The arrays passed in are copied, not adopted: an optimizer over the buffer updates
    ``params[i]``, and ``w1`` itself never changes. Use the views as the model's arrays
    from then on (``w1, b1, w2 = buf.params``), or copy back when the caller's arrays must
    hold the result (``np.copyto(w1, buf.params[0])``). Gradients go into ``grads[i]``
    in place (``buf.grads[0][...] = dw1``): rebinding a name to a new array does not
    reach the arena.
    """

    def __init__(self, arrays=None, *, shapes=None, dtype=np.float32, device="cpu", names=None):
        if (arrays is None) == (shapes is None):
            raise ValueError("pass either arrays or shapes (with dtype and device), not both or neither")
        if arrays is not None:
            arrays = list(arrays)
            if not arrays:
                raise ValueError("arrays is empty: a ParamBuffer needs at least one parameter")
            device = "cpu" if isinstance(arrays[0], np.ndarray) else "cuda"
            dtype = getattr(arrays[0], "dtype", None)
            for i, a in enumerate(arrays):
                cuda = hasattr(a, "__cuda_array_interface__")
                where = "cpu" if isinstance(a, np.ndarray) else "cuda" if cuda else None
                if where is None:
                    raise TypeError(f"arrays[{i}] must be a NumPy or CUDA array, got {type(a).__name__}")
                if where != device:
                    raise ValueError(f"arrays[{i}] is on {where} but arrays[0] is on {device}")
                if a.dtype != dtype:
                    raise TypeError(f"arrays[{i}] has dtype {a.dtype} but arrays[0] has dtype {dtype}")
            shapes = [tuple(a.shape) for a in arrays]
        shapes = [_shape(s, i) for i, s in enumerate(shapes)]
        self.dtype = np.dtype(BY_NAME.get(dtype, dtype) if isinstance(dtype, str) else dtype)
        if self.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"dtype {self.dtype} is not supported; fastopt supports {', '.join(BY_NAME)}")
        if names is not None:
            names = list(names)
            if len(names) != len(shapes):
                raise ValueError(f"names has {len(names)} entries for {len(shapes)} parameters")
            if len(set(names)) != len(names):
                raise ValueError("names must be unique")
        self.device, self.shapes, self.names = device, shapes, names
        xp = _array_module(device)
        self.offsets, end = layout(shapes, self.dtype)
        self._index = {o: i for i, o in enumerate(self.offsets) if _numel(shapes[i])}
        self.arena, self.grad_arena = (_aligned_empty(xp, end, self.dtype) for _ in range(2))
        self.arena.fill(0)
        self.grad_arena.fill(0)
        self.params = self._views(self.arena)
        self.grads = self._views(self.grad_arena)
        if arrays is not None:
            for view, a in zip(self.params, arrays):
                view[...] = a
        _BUFFERS.add(self)

    def _views(self, arena):
        return [arena[o:o + _numel(s)].reshape(s) for o, s in zip(self.offsets, self.shapes)]

    # NumPy pickles (and deep-copies) each view as an array of its own, cut off from the arena
    # the optimizers read: keep the arenas and the layout, and rebuild the views from them
    def __getstate__(self):
        state = self.__dict__.copy()
        del state["params"], state["grads"]
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        if self.device == "cpu":  # an unpickled array starts wherever the allocator put it
            self.arena, self.grad_arena = (_realigned(a) for a in (self.arena, self.grad_arena))
        self.params = self._views(self.arena)
        self.grads = self._views(self.grad_arena)
        _BUFFERS.add(self)

    def __deepcopy__(self, memo):
        """A buffer of its own; a view of this buffer met later in the same deepcopy (a dict
        holding the buffer and its params) becomes the copy's view. One met before the buffer
        was copied as an array of its own, cut off from the copy: refused."""
        views = self.params + self.grads
        if any(id(v) in memo for v in views):
            raise TypeError("deepcopy met a view of this ParamBuffer before the buffer itself: its copy would "
                            "be an array cut off from the copied arena; put the buffer before its views")
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        new.__setstate__(copy.deepcopy(self.__getstate__(), memo))
        for old, fresh in zip(views, new.params + new.grads):
            memo[id(old)] = fresh
        return new

    def __len__(self):
        return len(self.shapes)

    @property
    def numel(self):
        """Parameters held, without the alignment padding."""
        return sum(_numel(s) for s in self.shapes)

    def zero_grad(self):
        self.grad_arena.fill(0)

    def named_params(self):
        names = self.names or [str(i) for i in range(len(self))]
        return list(zip(names, self.params))

    def __repr__(self):
        return (f"ParamBuffer({len(self)} tensors, {self.numel:,} params, {self.dtype.name}, "
                f"{self.device}, arena {self.arena.size:,})")
