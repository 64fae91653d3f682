"""8-bit blockwise optimizer state (``state_bits=8``) for an :class:`~fastopt.Optimizer`.

Each state a rule keeps (Adam's ``exp_avg`` and ``exp_avg_sq``, ...) lives in three arenas:
``name`` (one uint8 code per element of every tensor of at least
:data:`~fastopt.kernels._blockwise.MIN_SIZE` elements, tensor after tensor), ``name.absmax``
(one float32 scale per block of 256 elements of those tensors) and ``name.small`` (float32
state of the smaller tensors, which keep 32-bit state as bitsandbytes does). Adam's state
costs 2 + 8/256 = 2.03 bytes per parameter of the large tensors.

A group's step is one call of the fused blockwise kernel (``kernels/_blockwise.py``) over
its large tensors and one call of the rule's ordinary kernel over its small ones (CUDA: one
launch per tensor). Conversions: :meth:`State8.dequantized` (``state_dict(torch=True)``,
``state_views``) and quantizing 32-bit values on load (a fastopt or torch state dict of
32-bit state); codes and scales themselves are saved and restored exactly.
"""
import numpy as np

from .buffer import _copy_in, _from_torch_value, _to_host, _zeros
from .kernels import _blockwise, _dispatch, _formats
from .kernels._reduce import chunk_table

ABSMAX, SMALL = ".absmax", ".small"
ARENAS = (("", np.uint8), (ABSMAX, np.float32), (SMALL, np.float32))  # a state's three arenas: suffix, dtype


class Quantized:
    """A param's 8-bit state as saved: its ``codes`` (uint8) and per-block ``absmax`` (float32)."""

    def __init__(self, codes, absmax):
        self.codes = np.ascontiguousarray(codes, np.uint8).reshape(-1)
        self.absmax = np.ascontiguousarray(absmax, np.float32).reshape(-1)
        if self.absmax.size != _blockwise.n_blocks(self.codes.size):
            raise ValueError(f"{self.absmax.size} block scales for {self.codes.size} codes: a block holds "
                             f"{_blockwise.BLOCK}")

    @property
    def size(self):
        return self.codes.size


def check_options(opt, state_bits, state_code):
    """Named errors before anything is allocated."""
    if state_bits not in (None, 8, 32) or isinstance(state_bits, bool):
        raise ValueError(f"state_bits must be None, 32 or 8, got {state_bits!r}")
    if state_code not in _blockwise.CODES:
        raise ValueError(f"state_code must be one of {', '.join(map(repr, _blockwise.CODES))}, got {state_code!r}")
    if state_bits == 8:
        if opt.rule.kernels is None or opt.rule.kernels.name not in _blockwise.RULES or opt.rule.per_tensor:
            raise ValueError(f"state_bits=8: {type(opt).__name__} has no 8-bit form (8-bit state is kept by "
                             "Adam, AdamW, Lion, SGD with momentum and RMSprop)")
        if opt._state_dtype is not None:
            raise ValueError("state_bits=8 and state_dtype are two choices of the state's storage: give one")


def check_params(opt):
    if opt.state_bits == 8 and opt.dtype == np.float64:
        raise ValueError("state_bits=8 takes float32, bfloat16 or float16 params, not float64")


class State8:
    """The 8-bit arenas and launch plans of one optimizer (see the module docstring): the
    layout of its params is fixed here, the arenas of a state are made when an option first
    needs it (:meth:`ensure`: SGD's momentum turned on mid-run)."""

    def __init__(self, opt):
        self.opt, self.code = opt, opt.state_code
        sizes = [a.size for a in opt._params]
        self.big = [n >= _blockwise.MIN_SIZE for n in sizes]
        self.code_at, self.block_at, self.small_at = [], [], []
        c = b = s = 0
        for n, big in zip(sizes, self.big):
            self.code_at.append(c)
            self.block_at.append(b)
            self.small_at.append(s)
            if big:
                c, b = c + n, b + _blockwise.n_blocks(n)
            else:
                s += n
        self.sizes = {"": c, ABSMAX: b, SMALL: s}  # elements of each of a state's three arenas
        self.names, self.arenas, self.signed = [], {}, {}

    def ensure(self, names):
        """Zero arenas for each state in ``names`` that has none yet."""
        for name in names:
            if name not in self.signed:
                for suffix, dtype in ARENAS:
                    self.arenas[name + suffix] = _zeros(self.opt._params[0], self.sizes[suffix], dtype)
                self.signed[name] = _blockwise.SIGNED[name]
        self.names = [s for s in self.opt.rule.states if s in self.signed]

    # -- one param's state ------------------------------------------------------------------
    def parts(self, i, name):
        """``(codes, absmax)`` views of param ``i``'s 8-bit state, or ``(small,)`` for a small param."""
        n = self.opt._params[i].size
        if self.big[i]:
            o, b = self.code_at[i], self.block_at[i]
            return (self.arenas[name][o:o + n], self.arenas[name + ABSMAX][b:b + _blockwise.n_blocks(n)])
        return (self.arenas[name + SMALL][self.small_at[i]:self.small_at[i] + n],)

    def dequantized(self, i, name):
        """Param ``i``'s state ``name`` as float32 values (a host copy)."""
        parts = [_to_host(x) for x in self.parts(i, name)]
        if len(parts) == 1:
            return parts[0]
        return _blockwise.dequantize(parts[0], parts[1], self.signed[name], self.code)

    def saved(self, i, name):
        """Param ``i``'s state as a state dict keeps it: ``{name: codes, name.absmax: scales}``
        (exact), or ``{name: float32 values}`` for a small param."""
        parts = [_to_host(x) for x in self.parts(i, name)]
        if len(parts) == 1:  # 32-bit values, shaped as the param as any 32-bit state
            return {name: parts[0].reshape(self.opt._params[i].shape)}
        return {name: parts[0], name + ABSMAX: parts[1]}

    def write(self, i, name, value):
        """Set param ``i``'s state: a :class:`Quantized` (exact) or float values (quantized
        here for a large param)."""
        parts = self.parts(i, name)
        if len(parts) == 1:
            values = value.codes if isinstance(value, Quantized) else value
            if isinstance(value, Quantized):
                raise ValueError(f"state {name!r} of param {i}: 8-bit codes for a param of fewer than "
                                 f"{_blockwise.MIN_SIZE} elements, which keeps 32-bit state")
            _copy_in(parts[0], 0, np.asarray(values, np.float32).reshape(-1))
            return
        if not isinstance(value, Quantized):
            value = Quantized(*_blockwise.quantize(np.asarray(value, np.float32), self.signed[name], self.code))
        _copy_in(parts[0], 0, value.codes)
        _copy_in(parts[1], 0, value.absmax)

    def split(self, arenas):
        """``{(param, name): value}`` from whole saved arenas (a checkpoint's, checked by
        :meth:`header_problems`), in this layout: every state the file holds, needed now or not
        (the saved options may need it)."""
        out = {}
        for name in self.saved_names(arenas):
            for i, a in enumerate(self.opt._params):
                n = a.size
                if self.big[i]:
                    o, b = self.code_at[i], self.block_at[i]
                    out[(i, name)] = Quantized(arenas[name][o:o + n],
                                               arenas[name + ABSMAX][b:b + _blockwise.n_blocks(n)])
                else:
                    out[(i, name)] = arenas[name + SMALL][self.small_at[i]:self.small_at[i] + n]
        return out

    def saved_names(self, entries):
        return [s for s in self.opt.rule.states if s in entries]

    def header_problems(self, headers):
        """Why saved arena headers ``{"state.<arena>": (shape, dtype)}`` do not fit this layout."""
        problems = []
        for name in self.saved_names({k[len("state."):] for k in headers if k.startswith("state.")}):
            for suffix, dtype in ARENAS:
                key, want = f"state.{name}{suffix}", ((self.sizes[suffix],), np.dtype(dtype))
                if key not in headers:
                    problems.append(f"{key} is missing (8-bit state {name!r} is kept in three arenas)")
                elif headers[key] != want:
                    problems.append(f"{key} is {headers[key][1]}{list(headers[key][0])}, not {want[1]}"
                                    f"{list(want[0])} (8-bit state of these params)")
        return problems

    # -- plans ------------------------------------------------------------------------------
    def plan(self, group, k):
        return Plan8(self, group, k)


class Plan8:
    """How one group is launched with 8-bit state (duck-types the optimizer's ``_Plan``)."""

    def __init__(self, state, group, k):
        opt = state.opt
        self.group, self.step, self.restart, self.constants = group, 0, False, None
        first = sum(len(g["params"]) for g in opt.param_groups[:k])
        idx = list(range(first, first + len(group["params"])))
        self.idx = idx
        needed = opt.held_states(k)
        view = _formats.kernel_view
        self.params = [view(opt._params[i].reshape(-1)) for i in idx]
        self.numel = sum(a.size for a in self.params)
        self.parallel = self.numel >= _dispatch.PARALLEL_THRESHOLD
        self.cpu = isinstance(self.params[0], np.ndarray) if self.params else True
        buffer = opt._buffer
        self.grads = None if buffer is None else [view(buffer.grad_arena[opt._offsets[i]:opt._offsets[i] + a.size])
                                                  for i, a in zip(idx, self.params)]
        self.masters = None if opt.masters is None else [opt.masters[opt._offsets[i]:opt._offsets[i] + a.size]
                                                         for i, a in zip(idx, self.params)]
        empty8, empty32 = np.zeros(0, np.uint8), np.zeros(0, np.float32)
        self.q, self.small = [], []  # per rule state: per tensor views, or None
        for name in opt.rule.states:
            if name not in needed:
                self.q.append(None)
                self.small.append(None)
                continue
            parts = [state.parts(i, name) for i in idx]
            self.q.append(([p[0] if len(p) == 2 else empty8 for p in parts],
                           [p[1] if len(p) == 2 else empty32 for p in parts]))
            self.small.append([p[0] if len(p) == 1 else empty32 for p in parts])
        big = [state.big[i] for i in idx]
        self.big = big
        self.blockwise = _blockwise.blockwise(opt.rule.kernels, state.code)
        self.kernels = opt.rule.kernels
        if self.cpu:
            from numba.typed import List
            self.table8 = _blockwise.block_table([a.size if b else None for a, b in zip(self.params, big)])
            rows = chunk_table([a.size for a in self.params], 1 << 15)
            self.table32 = np.ascontiguousarray(rows[[not big[t] for t in rows[:, 3]]][:, [3, 1, 2]]) \
                if len(rows) else np.zeros((0, 3), np.int64)
            self.lists = [List(self.params), None if self.grads is None else List(self.grads)]
            self.q8 = [None if q is None else (List(q[0]), List(q[1])) for q in self.q]
            self.s32 = [None if s is None else List(s) for s in self.small]
            self.m = None if self.masters is None else List(self.masters)

    def run(self, scalars, grads, rounding=None):
        if not self.params:
            return 0
        if not self.cpu:
            return self._run_cuda(scalars, grads, rounding)
        if rounding is not None:
            key, step = rounding
            scalars = (*scalars[:-1], _formats.rounding_key(key, step))
        params, own = self.lists
        g = own if own is not None else grads.typed(self.group)
        launches = 0
        if len(self.table8):
            flat = [x for q in self.q8 for x in ((None, None) if q is None else q)]
            self.blockwise.cpu(self.parallel)(params, g, *flat, self.m, self.table8,
                                              self.blockwise.cpu_scalars(scalars))
            launches += 1
        if len(self.table32):
            self.kernels.cpu_multi(self.parallel)(params, g, *self.s32, self.m, self.table32, scalars)
            launches += 1
        return launches

    def _run_cuda(self, scalars, grads, rounding):
        g = self.grads if self.grads is not None else [_formats.kernel_view(x.reshape(x.size))
                                                       for x in grads.arrays(self.group)]
        for t, (p, big) in enumerate(zip(self.params, self.big)):
            if rounding is not None:  # a launch per tensor, its elements counted from 0: a key per tensor
                scalars = (*scalars[:-1], _formats.rounding_key(*rounding, t))
            master = None if self.masters is None else self.masters[t]
            if big:
                states = [x for q in self.q for x in ((None, None) if q is None else (q[0][t], q[1][t]))]
                self.blockwise.launch_cuda([p, g[t], *states, master], scalars)
            else:
                states = [None if s is None else s[t] for s in self.small]
                _dispatch._launch_cuda(self.kernels, [p, g[t], *states, master], scalars)
        return len(self.params)


def read_saved(codes, absmax, param, where):
    """A state dict's 8-bit entry (codes and scales), checked: a :class:`Quantized`."""
    codes, absmax = np.asarray(_from_torch_value(codes)), np.asarray(_from_torch_value(absmax))
    if codes.dtype != np.uint8 or codes.size != param.size:
        raise ValueError(f"{where}: 8-bit codes must be {param.size} uint8 values, "
                         f"got {codes.dtype}{list(codes.shape)}")
    try:
        return Quantized(codes, absmax)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
