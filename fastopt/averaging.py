"""Weight averaging, from the lecture notes' "use Polyak averaging" for SGD:

    PolyakAverage:  avg_k = 1 / (k + 1) * sum_{i=0..k} p_i
    EMA:            avg_k = decay_k * avg_{k-1} + (1 - decay_k) * p_k
                    decay_k = decay, or min(decay, (1 + k) / (10 + k)) with warmup=True

``p_0`` is the params when the averager is built (the average starts as their copy) and
``p_k`` the params at the k-th ``update()``, called after each optimizer step.

The average mirrors the params' layout. For a :class:`~fastopt.ParamBuffer` it is one
arena like ``buffer.arena``, updated by one kernel launch; for separate arrays it is one
arena with a view per array, updated on the CPU by one call over typed lists and on CUDA
by one launch per array. Each pass reads the average and the params and writes the
average, 12 B per float32 parameter: the rule kernels (``fastopt.kernels.ema`` /
``.polyak``) run with the average in their param slot and the params in their read-only
gradient slot.

The average of bfloat16 or float16 params is kept in float32: an EMA's increments
``(1 - decay) * (p - avg)`` are far below half a 16-bit step (at decay 0.999 a bf16 average
would never move), so the 16-bit params are read, the float32 average written (8 B per
parameter), and the average is rounded to nearest into the params' format only when it is
swapped or copied into params.

``with averager.average_parameters(): evaluate()`` swaps the averaged weights into the
params and swaps them back on exit, exception or not; ``swap()`` is the same exchange by
hand (a second call undoes it). Swaps copy, so the live weights come back bit for bit (and
a float32 average of 16-bit params stays as it was: the live weights are kept aside).
"""
import contextlib

import numpy as np

from .buffer import ParamBuffer, _copy_in, _numel, _to_host, _zeros, layout
from .clip import SCALE
from .kernels import _dispatch, _formats, ema, polyak
from .optimizer import _is_array, _Plan, check_disjoint

# a copy that converts: clip's in-place scaling pass (param slot = grad slot * grad_scale) with
# the float32 average in the gradient slot, the 16-bit weights in the param slot, a factor of 1;
# the engine's store rounds to nearest, on the CPU and on CUDA alike
_CAST = SCALE.kernels
_FACTOR_ONE = _CAST.scalars.pack({}, np.float32)


class _Averager:
    """The average of a set of params; subclasses set ``rule`` and the per-update scalars."""

    rule = None

    def __init__(self, params):
        if isinstance(params, ParamBuffer):
            self._buffer, self._live = params, list(params.params)
            self._shapes, self._dtype = list(params.shapes), params.dtype
            self._offsets, size = list(params.offsets), params.arena.size
        else:
            self._buffer, self._live = None, _check_params(params)
            checked = [_dispatch._Array("", a) for a in self._live]
            self._shapes, self._dtype = [c.shape for c in checked], checked[0].dtype
            self._offsets, size = layout(self._shapes, self._dtype)
        self._sizes = [_numel(s) for s in self._shapes]
        self._live_flat = [a.reshape(n) for a, n in zip(self._live, self._sizes)]
        like = params.arena if self._buffer is not None else self._live[0]
        # 16-bit params: a float32 average (the module docstring)
        self._avg_dtype = np.dtype(np.float32) if self._dtype in _formats.BITS else self._dtype
        self._arena = _zeros(like, size, self._avg_dtype)
        self._avg_flat = [self._arena[o:o + n] for o, n in zip(self._offsets, self._sizes)]
        self._kept_live = None  # the live 16-bit weights while a float32 average is swapped in
        self._plan = self._make_plan()
        self._to_params = self._cast_plan(self._pairs()) if self._avg_dtype != self._dtype else None
        if self._to_params is not None:  # the average starts as the params (exact in float32)
            self._cast_plan([(p, a) for a, p in self._pairs()]).run(_FACTOR_ONE, None)
        else:
            for a, p in self._pairs():
                _assign(a, p)
        self.num_updates = 0
        self.launches = 0  # kernel launches so far (one per update for a ParamBuffer)
        self._swapped = False
        self._cast = (None, None)  # (host scalars, the same cast for the kernel)

    def _pairs(self):
        """(average, live) flat arrays that swaps and copies exchange: whole arenas for a buffer."""
        if self._buffer is not None:
            return [(self._arena, self._buffer.arena)]
        return list(zip(self._avg_flat, self._live_flat))

    @staticmethod
    def _cast_plan(pairs):
        """A launch plan writing each pair's second array into its first, converted."""
        view = _formats.kernel_view
        plan = _Plan(_CAST, None, numel=sum(a.size for a, _ in pairs))
        plan.flat = [[view(dst), view(src), None] for src, dst in pairs if dst.size]
        return plan

    def _make_plan(self):
        kernels = self.rule.kernels
        view = _formats.kernel_view  # a 16-bit float as its bits
        if self._buffer is not None:
            plan = _Plan(kernels, None, numel=self._arena.size)
            plan.flat = [[view(self._arena), view(self._buffer.arena), None]] if self._arena.size else []
            return plan
        plan = _Plan(kernels, None, numel=sum(self._sizes))
        if isinstance(self._arena, np.ndarray):
            plan.set_lists([view(a) for a in self._avg_flat], [view(a) for a in self._live_flat], [], [None])
        else:
            plan.flat = [[view(a), view(p), None] for a, p, n in zip(self._avg_flat, self._live_flat, self._sizes) if n]
        return plan

    # -- the update ------------------------------------------------------------------------
    def update(self):
        """Fold the params' current values into the average (call after each optimizer step)."""
        self._not_swapped("update()")
        step = self.num_updates + 1
        host = self._scalars(step)
        if host != self._cast[0]:  # an EMA's scalars rarely change: cast them once (about 1 us)
            self._cast = (host, self.rule.kernels.scalars.pack(host, self._avg_dtype))
        self.launches += self._plan.run(self._cast[1], None)
        self.num_updates = step

    def averaged(self):
        """The averaged weights, one array per param in the params' shapes: views of the
        average (float32 for 16-bit params), or of the params while the averaged weights are
        swapped in."""
        if self._swapped and self._kept_live is None:
            return list(self._live)
        return [a.reshape(s) for a, s in zip(self._avg_flat, self._shapes)]

    # -- evaluating with the average -------------------------------------------------------
    @property
    def swapped(self):
        """True while the params hold the averaged weights (after an odd number of swaps)."""
        return self._swapped

    def swap(self):
        """Exchange the averaged and the live weights in place; a second call undoes the first."""
        if self._to_params is not None:  # a float32 average: the live weights kept aside, the average kept
            if not self._swapped:
                self._kept_live = [_to_host(p) for _, p in self._pairs()]
                self._to_params.run(_FACTOR_ONE, None)
            else:
                for (_, p), kept in zip(self._pairs(), self._kept_live):
                    _copy_in(p, 0, kept)
                self._kept_live = None
        else:
            for a, p in self._pairs():
                _swap(a, p)
        self._swapped = not self._swapped

    @contextlib.contextmanager
    def average_parameters(self):
        """``with averager.average_parameters(): ...`` runs the block with the averaged
        weights in the params, and puts the live weights back however the block ends."""
        self._not_swapped("average_parameters()")
        self.swap()
        try:
            yield self
        finally:
            self.swap()

    def copy_to(self, params=None):
        """Write the averaged weights into ``params``: a ParamBuffer or a list of arrays
        shaped like the averaged params, in the params' dtype or the average's (float32 for
        16-bit params); default: those params, replacing the live weights."""
        self._not_swapped("copy_to()")
        if params is None and self._to_params is not None:
            self._to_params.run(_FACTOR_ONE, None)
            return
        if params is None:
            targets = self._pairs()
        elif (self._buffer is not None and isinstance(params, ParamBuffer) and params.arena.size == self._arena.size
              and params.shapes == self._shapes and params.dtype == self._dtype
              and _device(params.arena) == _device(self._arena)):
            targets = [(self._arena, params.arena)]  # the same layout: one arena copy
        else:
            arrays = params.params if isinstance(params, ParamBuffer) else _check_params(params)
            self._check_like(arrays, "params")
            targets = [(a, p.reshape(n)) for a, p, n in zip(self._avg_flat, arrays, self._sizes)]
        if self._to_params is not None:
            self._cast_plan(targets).run(_FACTOR_ONE, None)
            return
        for a, p in targets:
            _assign(p, a)

    def _check_like(self, arrays, name):
        if len(arrays) != len(self._shapes):
            raise ValueError(f"{name} has {len(arrays)} arrays but {len(self._shapes)} params are averaged")
        for i, (a, average) in enumerate(zip(arrays, self._avg_flat)):
            like = _dispatch._Array(f"averaged param {i}", average.reshape(self._shapes[i]))
            a = _dispatch._Array(f"{name}[{i}]", a)
            # the params' own dtype too: a float32 average of 16-bit params is rounded into it, as by swap()
            _dispatch.check_array(a, like=like, shape_of=like, written=False, dtype=a.dtype != self._dtype)

    def _not_swapped(self, what):
        if self._swapped:
            raise RuntimeError(f"{what} while the averaged weights are swapped into the params: "
                               "call swap() again first")

    # -- state dicts -----------------------------------------------------------------------
    def state_dict(self):
        """``{"kind", <hyper-parameters>, "num_updates", "average": [host arrays]}``."""
        return {"kind": type(self).__name__, **self._hyper(), "num_updates": self.num_updates,
                "average": [_to_host(a) for a in self.averaged()]}

    def load_state_dict(self, state_dict):
        """Restore from :meth:`state_dict`; every entry is checked before anything is written."""
        self._not_swapped("load_state_dict()")
        if not isinstance(state_dict, dict):
            raise TypeError(f"state_dict must be a dict, got {type(state_dict).__name__}")
        missing = [k for k in ("kind", *self._hyper(), "num_updates", "average") if k not in state_dict]
        if missing:
            raise ValueError(f"state_dict has no {missing[0]!r} entry")
        kind, name = state_dict["kind"], type(self).__name__
        if kind != name:
            raise ValueError(f"state_dict['kind'] is {kind!r} but this averager is {name}")
        hyper = {k: state_dict[k] for k in self._hyper()}
        self._check_hyper(hyper)
        count = state_dict["num_updates"]
        if isinstance(count, (bool, np.bool_)) or not isinstance(count, (int, np.integer)) or count < 0:
            raise ValueError(f"state_dict['num_updates'] must be an integer >= 0, got {count!r}")
        if not isinstance(state_dict["average"], (list, tuple)):
            raise TypeError(f"state_dict['average'] must be a list of arrays, one per averaged param, got "
                            f"{type(state_dict['average']).__name__}")
        average = [np.asarray(a) for a in state_dict["average"]]
        if len(average) != len(self._shapes):
            raise ValueError(f"state_dict['average'] has {len(average)} arrays but {len(self._shapes)} "
                             "params are averaged")
        for i, (a, shape) in enumerate(zip(average, self._shapes)):
            if a.shape != shape:
                raise ValueError(f"state_dict['average'][{i}] has shape {a.shape} but averaged param {i} "
                                 f"has shape {shape}")
            if a.dtype not in (self._dtype, self._avg_dtype):
                raise TypeError(f"state_dict['average'][{i}] has dtype {a.dtype} but the average is "
                                f"{self._avg_dtype}")
        for a, o in zip(average, self._offsets):
            _copy_in(self._arena, o, a.reshape(-1).astype(self._avg_dtype, copy=False))
        for k, v in hyper.items():
            setattr(self, k, type(getattr(self, k))(v))
        self.num_updates = int(count)

    def _hyper(self):
        return {}

    def _check_hyper(self, hyper):
        pass

    def __repr__(self):
        where = f"ParamBuffer of {len(self._shapes)} tensors" if self._buffer is not None else \
            f"{len(self._shapes)} arrays"
        extra = "".join(f", {k}={v}" for k, v in self._hyper().items())
        return f"{type(self).__name__}({where}, {self._dtype.name}{extra}, num_updates={self.num_updates})"


class EMA(_Averager):
    """``EMA(params, decay=0.999, warmup=False)``: exponential moving average of ``params``
    (a ParamBuffer, or a list of NumPy or CUDA arrays: float32, float64, or bfloat16/float16,
    whose average is float32); see the module doc."""

    rule = ema.EMA

    def __init__(self, params, decay=0.999, warmup=False):
        ema.EMA.check(dict(decay=decay, warmup=warmup))
        self.decay, self.warmup = float(decay), bool(warmup)
        super().__init__(params)

    @property
    def current_decay(self):
        """The decay the next ``update()`` will use."""
        return ema.decay_at(self.num_updates + 1, self.decay, self.warmup)

    def _scalars(self, step):
        hyper = self._hyper()
        ema.EMA.check(hyper)  # the attributes are public: re-check them
        return ema.scalars(hyper, step)

    def _hyper(self):
        return {"decay": self.decay, "warmup": self.warmup}

    def _check_hyper(self, hyper):
        try:
            ema.EMA.check(hyper)
        except (TypeError, ValueError) as e:
            raise type(e)(f"state_dict: {e}") from None


class PolyakAverage(_Averager):
    """``PolyakAverage(params)``: the uniform average of the params at construction and at
    every ``update()`` since (the lecture notes' ``1/(k+1) * sum_{i=0..k} theta_i``)."""

    rule = polyak.POLYAK

    def _scalars(self, step):
        return polyak.scalars({}, step)


def _check_params(params):
    """The arrays of ``params`` (a list, or one array), checked: float32/float64, one device
    and dtype, contiguous, writeable (swaps write into them), no two sharing memory."""
    if _is_array(params):
        params = [params]
    try:
        arrays = list(params)
    except TypeError:
        raise TypeError(f"params must be a ParamBuffer or a list of arrays, got {type(params).__name__}") from None
    if not arrays:
        raise ValueError("params is empty: there is nothing to average")
    # written: swap() and copy_to() write into the params
    ref = _dispatch.check_array(_dispatch._Array("params[0]", arrays[0]))
    for i, a in enumerate(arrays[1:], start=1):
        _dispatch.check_array(_dispatch._Array(f"params[{i}]", a), like=ref)
    check_disjoint(arrays)
    return arrays


def _device(a):
    return _dispatch._Array("", a).device


def _same_library(a, b):
    """Both NumPy, or both CuPy: arrays that copy with ``dst[...] = src``."""
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return isinstance(a, np.ndarray) and isinstance(b, np.ndarray)
    return type(a).__module__.startswith("cupy") and type(b).__module__.startswith("cupy")


def _as_numba(a):
    """A Numba device array on the same memory (CuPy arrays, torch CUDA tensors)."""
    if hasattr(a, "copy_to_device"):
        return a
    from numba import cuda
    return cuda.as_cuda_array(a, sync=False)


def _assign(dst, src):
    """``dst[...] = src`` for flat arrays of one size on one device."""
    if _same_library(dst, src):
        dst[...] = src
    else:
        _as_numba(dst).copy_to_device(_as_numba(src))


def _swap(a, b):
    """Exchange the contents of two flat arrays of one size on one device."""
    if _same_library(a, b):
        tmp = a.copy()
    else:
        from numba import cuda
        a, b = _as_numba(a), _as_numba(b)
        tmp = cuda.device_array(a.shape, a.dtype)
        tmp.copy_to_device(a)
    _assign(a, b)
    _assign(b, tmp)
