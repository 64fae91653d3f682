"""The engine: one rule's element-wise math compiled into every loop that applies it.

A rule writes its math once, as a plain function of scalars whose arguments are named::

    def adam_math(p, g, exp_avg, exp_avg_sq, max_exp_avg_sq,      # the param, its gradient, each state
                  beta1, one_minus_beta1, ..., amsgrad, maximize):  # the step's scalars, by name
        return p, exp_avg, exp_avg_sq, max_exp_avg_sq

From it the engine generates ``apply(i, param, grad, <one array per state>, c)``, the update
of element ``i``, and around it a serial and a parallel CPU loop over flat arrays
(``numba.njit``), the same two over typed lists of arrays cut into a chunk table (a model's
separate tensors in one call), and a CUDA grid-stride loop (``numba.cuda.jit``). ``c`` is the
kernel's scalar tuple ``(grad_scale, *floats, *flags)`` (:class:`Scalars` builds it); the
gradient is multiplied by ``grad_scale`` as it is read, so clipping costs no pass of its own.

Every array is read through :func:`load` and written through :func:`store`: the one place a
storage format (bf16 bits, an 8-bit code and its block scale) would go. A state array passed
as ``None`` is pruned at compile time: never read nor written, so a step moves only the
bytes its options need.

A rule whose step works tensor by tensor (LAMB, LARS) gets the *layer* forms of the same
kind of math (:meth:`Kernels.layers_cpu`, :meth:`Kernels.layers_cuda`): one pass over the
chunk table ``(base, start, stop, tensor)`` of :func:`._reduce.chunk_table`, where the math
may also take per-tensor scalars (a trust ratio, read through the chunk's tensor column),
may store only some of its arrays (``writes``; a math whose gradient argument is named
``_g`` reads none, and its pass takes ``grad=None``), and may return more values that the
pass reduces per chunk, each by its kind in ``sums``: ``"squares"`` (the sum of their
squares: the norms of a LAMB step cost no pass of their own), ``"sum"``, ``"max"`` (of
their absolute values) or ``"nonfinite"`` (NaN exactly when one was inf or NaN). A
reduction is such a pass that writes nothing: the global norm and the non-finite guard are
the math ``x -> (x, x)`` reduced as ``("squares", "nonfinite")`` (:mod:`._reduce`); the
runner of layer passes is :mod:`._layers`. The reductions are float64 on the CPU (only they
may be reordered, for SIMD lanes) and in the math's dtype on CUDA (the one tree reduction
of :mod:`._cuda`); either way in a fixed order, so the same bits on every run.

Every constant the math uses must come from the scalars: a bare literal such as ``1.0`` is
a float64 and silently promotes a float32 kernel (``python -m fastopt.kernels ptx`` counts
the ``.f64`` instructions that would betray it).
"""
import hashlib
import inspect
import operator
import textwrap

import numpy as np
from numba import njit, prange, types
from numba.extending import overload, register_jitable

from . import _formats
from ._formats import compute_dtype, load, noise, store

_CPU_OPTIONS = dict(error_model="numpy", nogil=True)  # "numpy": no ZeroDivision check, so loops vectorize


@register_jitable  # callable from a rule's math in both the CPU and the CUDA kernels
def nan_max(a, b):
    """``max(a, b)``, NaN when either is NaN, as ``torch.maximum``: Python's ``max(a, nan)``
    is ``a``, which would hide a NaN gradient in a running maximum for ever. A compare and
    a select in the arrays' dtype: no float64, and the loops still vectorize."""
    return a if a > b or a != a else b




def entry_point(dispatcher, args):
    """The machine code ``dispatcher`` compiled for exactly the types of ``args`` (call it
    once first). A caller whose arrays and scalar types never change (an optimizer's plan, a
    guard's norm) calls it directly and skips the dispatcher's type resolution, about half
    of the call's cost for a tiny model."""
    try:
        return dispatcher.overloads[tuple(dispatcher.typeof_pyval(a) for a in args)].entry_point
    except (AttributeError, KeyError):  # a Numba that moved these internals: keep the dispatcher
        return dispatcher


class Scalars:
    """The per-step scalars of a math function, by name: the math's arguments after its
    states. ``pack`` turns the dict a rule's host code returns into the kernel's tuple
    ``(grad_scale, *floats, *flags)``, floats in the arrays' dtype (a Python float would
    compile a float64 kernel), flags as Python bools (compile-time-like branches).

    ``constant`` names the scalars that depend on the hyper-parameters alone: they come last
    in the tuple, so a caller packs them once (``pack_constants``) and then per step only the
    scalars that change (``pack(values, dtype, grad_scale, constants)``)."""

    def __init__(self, names, flags, constant=()):
        self.names = tuple(names)
        self.flags = tuple(n for n in self.names if n in flags)
        self.floats = tuple(n for n in self.names if n not in flags)
        per_step = [n for n in self.names if n not in constant]
        self.constant = tuple(n for n in self.names if n in constant)
        split = [[n for n in names if n in self.floats] + [n for n in names if n in self.flags]
                 for names in (per_step, self.constant)]
        self.order = tuple(split[0] + split[1])  # position in c, after grad_scale
        self._step_floats = _getter([n for n in split[0] if n in self.floats])
        self._step_flags = _getter([n for n in split[0] if n in self.flags])
        self._const_floats = _getter([n for n in split[1] if n in self.floats])
        self._const_flags = _getter([n for n in split[1] if n in self.flags])

    def pack_constants(self, values, dtype):
        """The tuple's tail: the constant scalars, floats in the math's dtype for arrays of ``dtype``."""
        return (*np.array(self._const_floats(values), compute_dtype(dtype)), *self._const_flags(values))

    def pack(self, values, dtype, grad_scale=1.0, constants=None, key=None, native=False):
        """The kernel's tuple from ``values`` (every scalar by name, or with ``constants`` from
        :meth:`pack_constants`, only the per-step ones), floats in the math's dtype for arrays
        of ``dtype`` (float32 for every 16-bit format); last the rounding ``key`` (None: to
        nearest; else stochastic rounding of 16-bit writes, see ``_formats.rounding_key``).

        ``native=True``: the floats as they are (Python floats), for an :func:`entry_point`
        only: its unboxing rounds each to the math's dtype, the same bits as NumPy's cast,
        and a tiny model's step skips the array (a dispatcher would type them float64)."""
        if constants is None:
            constants = self.pack_constants(values, dtype)
        if native:
            return (grad_scale, *self._step_floats(values), *self._step_flags(values), *constants, key)
        return (*np.array((grad_scale, *self._step_floats(values)), compute_dtype(dtype)),
                *self._step_flags(values), *constants, key)

    @staticmethod
    def native(packed):
        """``packed`` (a tuple of :meth:`pack_constants`) with Python floats and bools: for ``native`` packing."""
        return tuple(x.item() if isinstance(x, np.generic) else x for x in packed)

    def check(self, values):
        """The names a host function returned must be exactly the math's: say which differ."""
        missing, extra = set(self.names) - set(values), set(values) - set(self.names)
        if missing or extra:
            raise TypeError(f"scalars: missing {sorted(missing)}, unexpected {sorted(extra)}")
        wrong = [n for n in self.names if isinstance(values[n], (bool, np.bool_)) != (n in self.flags)]
        if wrong:
            raise TypeError(f"scalars {wrong}: a flag must always be a bool and a float never one")


def _getter(names):
    if not names:
        return lambda values: ()
    if len(names) == 1:
        name = names[0]
        return lambda values: (values[name],)
    return operator.itemgetter(*names)


# The update of element i, written once: the body of ``apply`` (CUDA) and, pasted in, of the
# CPU loops (LLVM's inliner declines a body as big as a stochastically rounded step, and a
# call left in a loop stops it vectorizing). A missing state gets a dummy value: its result
# is dropped and the branch pruned.
_BODY = '''\
g = load(grad, i) * c[0]
{loads}
p, {outs} = math(load(master, i) if master is not None else load(param, i), g, {ins}{scalars})
if master is not None:  # the master copy keeps the exact value: the param is its nearest rounding
    store(master, i, p)
    store(param, i, p)
else:
    store(param, i, p, noise(c[{key}], base + i, 0))
{stores}'''

_TEMPLATE = '''
def make(math, load, store, jit, prange, piece, noise):
    @jit
    def apply(i, param, grad, {states}master, c, base):
{body8}

    def flat_loop(param, grad, {states}master, c):
        base = 0
        for i in prange(param.size):
{body12}

    @jit
    def segment_loop(param, grad, {states}master, c, base):
        # a loop from 0 over sliced arrays: LLVM vectorizes this form, not range(lo, hi)
        for i in range(param.size):
{body12}

    def multi_loop(params, grads, {states}masters, chunks, c):
        # chunks[k] = (tensor, start, stop): big tensors are split so that threads share them
        for k in prange(chunks.shape[0]):
            t, lo, hi = chunks[k, 0], chunks[k, 1], chunks[k, 2]
            segment_loop(params[t][lo:hi], grads[t][lo:hi], {pieces}piece(masters, t, lo, hi), c, (t << 32) + lo)

    return apply, flat_loop, segment_loop, multi_loop
'''


def _generate(n_states, scalar_positions):
    """The source of the loops for a math of ``n_states`` states whose scalar arguments sit
    at ``scalar_positions`` of the kernel tuple (after grad_scale; the rounding key last)."""
    key = 1 + len(scalar_positions)
    s = [f"s{k}" for k in range(n_states)]
    x = [f"x{k}" for k in range(n_states)]
    body = _BODY.format(
        loads="\n".join(f"{b} = load({a}, i) if {a} is not None else g" for a, b in zip(s, x)) or "pass",
        outs="".join(f"{b}, " for b in x) or "_,",
        ins="".join(f"{b}, " for b in x),
        scalars=", ".join(f"c[{1 + k}]" for k in scalar_positions),
        stores="\n".join(f"if {a} is not None:\n    store({a}, i, {b}, noise(c[{key}], base + i, {k + 1}))"
                         for k, (a, b) in enumerate(zip(s, x))) or "pass",
        key=key)
    if not n_states:  # the math returns p alone
        body = body.replace("p, _, = math(", "p = math(")
    return _TEMPLATE.format(
        states="".join(f"{a}, " for a in s),
        body8=textwrap.indent(body, " " * 8), body12=textwrap.indent(body, " " * 12),
        pieces="".join(f"piece({a}, t, lo, hi), " for a in s))


# how a layer pass reduces one returned value, per element and when adding up partial results
# (float64 values ``a`` on the CPU; the CUDA form is in ``_cuda.make_cuda_layers``)
REDUCTIONS = {"squares": ("t{j} += a * a", "t{j} += b{j}"),
              "sum": ("t{j} += a", "t{j} += b{j}"),
              "max": ("t{j} = max(t{j}, abs(a))", "t{j} = max(t{j}, b{j})"),
              # the sum of a * 0: NaN exactly when some value was inf or NaN, else 0 (no branch)
              "nonfinite": ("t{j} += a * 0.0", "t{j} += b{j}")}


def _generate_layers(n_states, scalar_positions, n_tensor, written, write_param, sums):
    """The source of the layer forms of a math of ``n_states`` states: ``written[k]`` says
    whether state k is stored, ``write_param`` whether p is; ``n_tensor`` per-tensor scalars
    come after the states, then the kernel tuple's scalars at ``scalar_positions``; the math
    returns ``p``, the states, then one value per entry of ``sums``, reduced per chunk by
    that entry's kind (:data:`REDUCTIONS`)."""
    n_sums = len(sums)
    s = [f"s{k}" for k in range(n_states)]
    x = [f"x{k}" for k in range(n_states)]
    w = [f"w{j}" for j in range(n_tensor)]
    y = [f"y{j}" for j in range(n_sums)]
    r = [f"r{j}" for j in range(n_sums)]
    states, tensor = "".join(f"{a}, " for a in s), "".join(f"{v}, " for v in w)
    scalars = ", ".join(f"c[{1 + k}]" for k in scalar_positions)
    lines = ["def make(math, load, store, jit, prange, piece, span, sum_jit, reduce_jit, block, np, scratch):",
             "    @jit",
             f"    def apply(i, param, grad, {states}{tensor}c):",
             "        g = load(grad, i) * c[0] if grad is not None else c[0]  # a pass given no gradient reads none"]
    lines += [f"        {b} = load({a}, i) if {a} is not None else g" for a, b in zip(s, x)]
    outs = ", ".join(["p", *x, *y])
    lines.append(f"        {outs}{',' if x or y else ''} = math(load(param, i), g, {''.join(f'{b}, ' for b in x)}"
                 f"{tensor}{scalars})".replace("p, = math", "p = math"))
    if write_param:
        lines.append("        store(param, i, p)")
    lines += [f"        if {a} is not None:\n            store({a}, i, {b})" for a, b, on in zip(s, x, written) if on]
    lines.append(f"        return {', '.join(y) or 'None'}")
    args = f"param, grad, {states}{tensor}c"
    tuple_end = "," if n_sums == 1 else ""
    if not n_sums:
        lines += ["", "    @jit", f"    def segment(param, grad, {states}{tensor}c):",
                  "        # a loop from 0 over sliced arrays: LLVM vectorizes this form, not range(lo, hi)",
                  "        for i in range(param.size):", f"            apply(i, {args})"]
    elif not write_param and not any(written):
        # a pure reduction (a norm): one loop reads and reduces; the fast-math flag of its
        # additions does not reach the math (compiled on its own without it), which a pass
        # that also stores its results could not afford to inline this way (_BODY's comment)
        lines += ["", "    @reduce_jit", f"    def segment(param, grad, {states}{tensor}c):"]
        lines += [f"        t{j} = 0.0" for j in range(n_sums)]
        lines += ["        for i in range(param.size):", f"            {', '.join(y)}{tuple_end} = apply(i, {args})"]
        for j, kind in enumerate(sums):
            lines += [f"            a = np.float64(y{j})", "            " + REDUCTIONS[kind][0].format(j=j)]
        lines.append(f"        return {', '.join(f't{j}' for j in range(n_sums))}")
    else:
        lines += ["", "    @jit", f"    def block_loop({args}, {', '.join(r)}):",
                  "        for i in range(param.size):",
                  f"            {', '.join(y)}{tuple_end} = apply(i, {args})"]
        lines += [f"            {a}[i] = {b}" for a, b in zip(r, y)]
        # only the reductions may be reordered (SIMD lanes): a function of their own, so that
        # the fast-math flag never reaches the math (a reassociated 1 - beta2 times g times g
        # would differ from Adam's in the last bit); float64, all rows in one loop
        lines += ["", "    @sum_jit", f"    def reduce_rows({', '.join(r)}):"]
        lines += [f"        t{j} = 0.0" for j in range(n_sums)]
        lines.append(f"        for i in range({r[0]}.size):")
        for j, (a, kind) in enumerate(zip(r, sums)):
            lines += [f"            a = np.float64({a}[i])", "            " + REDUCTIONS[kind][0].format(j=j)]
        lines.append(f"        return {', '.join(f't{j}' for j in range(n_sums))}{tuple_end}")
        lines += ["", "    @jit", f"    def segment(param, grad, {states}{tensor}c):",
                  "        # blocks whose returned values wait in scratch rows (in L1) to be reduced",
                  "        n = min(block, param.size)"]
        lines += [f"        {a} = scratch(param, n)" for a in r]
        lines += [f"        t{j} = 0.0" for j in range(n_sums)]
        lines += ["        for lo in range(0, param.size, block):", "            hi = min(lo + block, param.size)",
                  f"            block_loop(param[lo:hi], span(grad, lo, hi), "
                  f"{''.join(f'span({a}, lo, hi), ' for a in s)}{tensor}c, {', '.join(f'{a}[:hi - lo]' for a in r)})"]
        lines.append(f"            {', '.join(f'b{j}' for j in range(n_sums))}{tuple_end} = "
                     f"reduce_rows({', '.join(f'{a}[:hi - lo]' for a in r)})")
        lines += ["            " + REDUCTIONS[kind][1].format(j=j) for j, kind in enumerate(sums)]
        lines.append(f"        return {', '.join(f't{j}' for j in range(n_sums))}")
    call = (f"params[b][lo:hi], piece(grads, b, lo, hi), {''.join(f'piece({a}, b, lo, hi), ' for a in s)}"
            f"{tensor}c")
    lines += ["", f"    def layer_loop(params, grads, {states}chunks, per_tensor, c, sums):",
              "        for k in prange(chunks.shape[0]):",
              "            b, lo, hi, t = chunks[k, 0], chunks[k, 1], chunks[k, 2], chunks[k, 3]"]
    lines += [f"            {v} = per_tensor[{j}, t]" for j, v in enumerate(w)]
    if n_sums:
        lines.append(f"            {', '.join(f'sums[{j}, k]' for j in range(n_sums))}{',' if n_sums == 1 else ''}"
                     f" = segment({call})")
        # and the totals of all chunks, added in chunk order (as _reduce.combine_in_order): a
        # global norm is one call
        lines += [f"        t{j} = 0.0" for j in range(n_sums)]
        lines.append("        for k in range(chunks.shape[0]):")
        for j, kind in enumerate(sums):
            lines += [f"            b{j} = sums[{j}, k]", "            " + REDUCTIONS[kind][1].format(j=j)]
        lines.append(f"        return {', '.join(f't{j}' for j in range(n_sums))}{',' if n_sums == 1 else ''}")
    else:
        lines.append(f"            segment({call})")
    lines += ["", "    return apply, layer_loop", ""]
    return "\n".join(lines)


def _compile_factory(src):
    scope = {"__name__": __name__}  # a cached kernel rebuilds its environment from this module
    exec(compile(src, __file__, "exec"), scope)  # noqa: S102 - generated from the declaration alone
    return scope["make"]


def _piece(arrays, t, lo, hi):
    """``arrays[t][lo:hi]``, or None where the state slot is unused."""


@overload(_piece)
def _piece_impl(arrays, t, lo, hi):
    if isinstance(arrays, types.NoneType):
        return lambda arrays, t, lo, hi: None
    return lambda arrays, t, lo, hi: arrays[t][lo:hi]


def _span(array, lo, hi):
    """``array[lo:hi]``, or None where the slot is unused."""


@overload(_span)
def _span_impl(array, lo, hi):
    if isinstance(array, types.NoneType):
        return lambda array, lo, hi: None
    return lambda array, lo, hi: array[lo:hi]


def _scratch(param, n):
    """``n`` scratch values in the math's dtype for arrays like ``param`` (a 16-bit format
    travels as integer bits; its math, hence its returned values, are float32): the values a
    block pass reduces wait there in L1 (float64 rows would move twice the bytes, about 10% of
    a LAMB step); the reduction itself is float64."""


@overload(_scratch)
def _scratch_impl(param, n):
    dtype = param.dtype if isinstance(param.dtype, types.Float) else types.float32
    return lambda param, n: np.empty(n, dtype)


BLOCK = 1024  # elements of a layer pass whose returned values wait in L1 before being reduced


_SUM_JIT = njit(**_CPU_OPTIONS, fastmath={"reassoc"})  # the per-block sums of a layer pass (see _generate_layers)
_REDUCE_JIT = njit(**_CPU_OPTIONS, fastmath={"reassoc", "contract"})  # the loop of a pure reduction (a norm)


def _sources(fn, seen=None):
    """The source of ``fn``'s module and of the modules of the functions it calls (a rule's
    math calls pieces of other rules' math: adam_moments), for the cache key."""
    seen = set() if seen is None else seen
    module = inspect.getmodule(fn)
    if module is None or module.__name__ in seen:
        return ""
    seen.add(module.__name__)
    out = inspect.getsource(module)
    names = getattr(getattr(fn, "__code__", None), "co_names", ())
    for name in names:
        g = getattr(fn, "__globals__", {}).get(name)
        if inspect.isfunction(g) and g.__module__.startswith(__name__.rsplit(".", 1)[0]):
            out += _sources(g, seen)
    return out


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


def enable_cuda_cache(dispatcher, name, salt):
    """Cache a generated CUDA kernel on disk (PTX and the device's cubin) under its own name:
    the CPU cache's keying (:func:`_enable_cache`) for ``numba.cuda.jit``.

    numba-cuda keys its cache on the kernel's bytecode and closure cells, and names the file
    after the function: every rule's generated ``cuda_loop`` has the same name, file, line
    and bytecode (only its global ``apply`` differs), so a plain ``cache=True`` would hand one
    rule's kernel to another. ``salt`` (the source of everything the kernel is generated from)
    takes the bytecode's place; the launch-config part of numba-cuda's key is kept. A no-op on
    the simulator and on a numba-cuda whose cache internals moved (compiled every run)."""
    try:
        from numba import config
        if config.ENABLE_CUDASIM:
            return dispatcher
        import numba_cuda
        from numba.cuda.dispatcher import CUDACache

        class _RuleCudaCache(CUDACache):
            def _index_key(self, sig, codegen):
                key = (sig, codegen.magic_tuple(), numba_cuda.__version__, salt)
                if self._launch_config_key is not None:
                    key += (("launch_config", self._launch_config_key),)
                return key

        dispatcher.py_func.__qualname__ = name
        dispatcher._cache = _RuleCudaCache(dispatcher.py_func)
    except Exception:
        pass
    return dispatcher


def cuda_salt(salt):
    """``salt`` with the source of the CUDA pieces (``_cuda``) and of the storage formats."""
    from . import _cuda
    return hashlib.sha256((salt + inspect.getsource(_cuda) + inspect.getsource(_formats)).encode()).hexdigest()


def math_arguments(math, states):
    """The scalar names of ``math``: its arguments after ``p, g`` and the ``states``, which
    must be named as the rule names them."""
    names = list(inspect.signature(math).parameters)
    if names[2:2 + len(states)] != list(states):
        raise TypeError(f"{math.__name__} takes {names[2:2 + len(states)]} where its rule keeps states "
                        f"{list(states)}: name them alike, in the same order")
    return names[2 + len(states):]


class Kernels:
    """The compiled forms of one math function, each built on first use.

    ``cpu(parallel)(param, grad, *states, c)`` over flat arrays; ``cpu_multi(parallel)(params,
    grads, *states, chunks, c)`` over typed lists and a chunk table; ``cuda()`` the CUDA
    kernel with the flat signature; ``layers_cpu(parallel)`` and ``layers_cuda(dtype)`` the
    layer forms (module docstring). ``states`` are the state names, ``scalars`` the
    :class:`Scalars` of the math; ``per_tensor`` the names of the math's per-tensor scalars
    (after its states), ``writes`` the names among ``p`` and the states it stores (default
    all), ``sums`` the kinds of reduction (:data:`REDUCTIONS`) of the values it returns after
    the states, one per value, reduced per chunk."""

    def __init__(self, name, math, states, scalars, *, per_tensor=(), writes=None, sums=()):
        self.name, self.math, self.states, self.scalars = name, math, tuple(states), scalars
        self.per_tensor = tuple(per_tensor)
        self.sums = tuple(sums)
        unknown = [k for k in self.sums if k not in REDUCTIONS]
        if unknown or "max" in self.sums[1:]:  # the CUDA tree takes a maximum in its first row only
            raise ValueError(f"{name}: sums must be kinds among {sorted(REDUCTIONS)}, 'max' first if at all; "
                             f"got {self.sums}")
        self.writes = ("p", *self.states) if writes is None else tuple(writes)
        # a math whose gradient argument is named with a leading underscore reads none: its
        # layer pass takes grad=None and moves no gradient bytes
        self.reads_grad = not list(inspect.signature(math).parameters)[1].startswith("_")
        positions = [scalars.order.index(n) for n in scalars.names]
        self._positions = positions
        self.source = _generate(len(self.states), positions) if not (self.per_tensor or sums) else None
        self._make = _compile_factory(self.source) if self.source else None
        self._cpu, self._multi, self._layers, self._cuda_layers = {}, {}, {}, {}
        self._cuda = None
        self._salt = hashlib.sha256((_sources(math) + inspect.getsource(inspect.getmodule(Kernels))
                                     + inspect.getsource(_formats)).encode()).hexdigest()

    def scalar(self, c, name):
        """The value of scalar ``name`` in the kernel tuple ``c``."""
        return c[1 + self.scalars.order.index(name)]

    def _forms(self, jit, loop_range):
        """(apply, flat loop, segment loop, multi loop) with the math, load and store jitted by ``jit``."""
        # load, store and noise are overloaded for every target: called as they are
        return self._make(jit(self.math), load, store, jit, loop_range, _piece, noise)

    def _layer_forms(self, jit, loop_range):
        """(apply, layer loop) of the layer forms, the math, load and store jitted by ``jit``."""
        src = _generate_layers(len(self.states), self._positions, len(self.per_tensor),
                               [s in self.writes for s in self.states], "p" in self.writes, self.sums)
        make = _compile_factory(src)
        return make(jit(self.math), load, store, jit, loop_range, _piece, _span, _SUM_JIT, _REDUCE_JIT, BLOCK, np,
                    _scratch)

    def _cpu_form(self, compiled, form, parallel, loop):
        """``compiled[parallel]``, made on first use: ``loop()`` (a Python loop of the
        generated source) compiled serial or parallel, cached on disk as ``<rule>_<form>_<kind>``."""
        if parallel not in compiled:
            kind = "parallel" if parallel else "serial"
            compiled[parallel] = _enable_cache(njit(parallel=parallel, **_CPU_OPTIONS)(loop()),
                                               f"{self.name}_{form}_{kind}", self._salt)
        return compiled[parallel]

    def cpu(self, parallel):
        return self._cpu_form(self._cpu, "cpu", parallel, lambda: self._forms(njit(**_CPU_OPTIONS), prange)[1])

    def cpu_multi(self, parallel):
        return self._cpu_form(self._multi, "multi", parallel, lambda: self._forms(njit(**_CPU_OPTIONS), prange)[3])

    def layers_cpu(self, parallel):
        """``(params, grads, *states, chunks, per_tensor, c, sums)`` over typed lists of 1-D
        bases (``grads`` or a state None: not read), the chunk table, a ``(len(per_tensor),
        n_tensors)`` array (or None), and a ``(len(sums), n_chunks)`` float64 array (or None)
        that receives the per-chunk results; returns their totals over all chunks, in chunk order."""
        return self._cpu_form(self._layers, "layers", parallel,
                              lambda: self._layer_forms(njit(**_CPU_OPTIONS), prange)[1])

    def cuda_loop(self):
        """The Python CUDA kernel function (not yet compiled), for ``cuda.jit`` or ``compile_ptx``."""
        from numba import cuda

        from ._cuda import make_cuda_loop  # numba-cuda is optional: imported on first GPU use
        apply, _, _, _ = self._forms(cuda.jit(device=True), range)
        return make_cuda_loop(apply, len(self.states))

    def cuda(self):
        if self._cuda is None:
            from numba import cuda
            self._cuda = enable_cuda_cache(cuda.jit(self.cuda_loop()), f"{self.name}_cuda", cuda_salt(self._salt))
        return self._cuda

    def layers_cuda_loop(self, dtype):
        """The Python CUDA layer kernel for arrays of ``dtype``: ``(param, grad, *states, rows,
        per_tensor, c, sums)`` over one base, one block per row ``(slot, start, stop, tensor)``
        (``slot``: the column of ``sums`` the chunk's sums go to)."""
        from numba import cuda

        from ._cuda import make_cuda_layers
        apply, _ = self._layer_forms(cuda.jit(device=True), range)
        return make_cuda_layers(apply, len(self.states), len(self.per_tensor), self.sums, compute_dtype(dtype).name)

    def layers_cuda(self, dtype):
        key = np.dtype(dtype)
        if key not in self._cuda_layers:
            from numba import cuda
            self._cuda_layers[key] = enable_cuda_cache(cuda.jit(self.layers_cuda_loop(key)),
                                                       f"{self.name}_cuda_layers_{key.name}", cuda_salt(self._salt))
        return self._cuda_layers[key]
