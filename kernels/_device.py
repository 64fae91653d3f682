"""A step decided on the device: what lets a guarded, clipped or captured CUDA step run with
no host-device synchronization.

On the CPU the host computes each step's scalars (bias corrections, the clip factor) and
decides whether a step with a non-finite gradient is skipped. On CUDA those decisions need
the gradient norm, which lives on the device: reading it each step would stall the host on
the GPU. Instead, as torch's fused kernels do with ``grad_scale`` / ``found_inf``:

* the norm reduction (``_reduce``) leaves its per-chunk partials in device memory;
* one single-thread *prologue* kernel combines them in chunk order (the host's order and
  precision: float64), writes the norm and the non-finite flag to ``status``, and for each
  param group computes the clip factor, the learning rate (from the device step count and
  a built-in schedule's rows) and the rule's per-step scalars into one row of ``out``; it
  advances the group's step count only when the step is not skipped;
* the update kernel (:func:`make_update`) reads its per-step scalars and the skip flag from
  that row, and returns at once when the step is skipped (it writes nothing).

The per-step scalars are the rule's own host function (``Rule.host_scalars``), compiled for
the device from its source: ``h["name"]`` becomes an argument (the group's value, float64),
and the returned dict becomes a tuple in the kernel's order. So each rule's math is still
written once, and the CPU path keeps its host scalars. The prologue computes in float64, as
the host does: a one-thread kernel, so its ``.f64`` instructions cost nothing measurable,
and the update kernels it feeds stay float64-free.

A rule whose per-step scalars cannot be compiled for the device (a helper keeping a host
cache, as NAdam's ``mu_product``) is :func:`unsupported`: its CUDA steps keep the host's
scalars (one read of the norm per guarded step).
"""
import ast
import hashlib
import inspect
import math
import numbers
import textwrap
import types as pytypes

import numpy as np
from numba.extending import register_jitable

from ._engine import cuda_salt, enable_cuda_cache
from ._formats import compute_dtype

# status slots (float64): the last norm, the last step skipped (0/1), the steps skipped so far
NORM, SKIPPED, SKIPS = 0, 1, 2
STATUS = 3
# the columns of a group's row of ``out`` before its per-step scalars: skip (0/1), gradient factor
SKIP, SCALE = 0, 1
HEAD = 2


# -- the learning-rate schedules on the device ------------------------------------------
# The kinds of built-in schedule (``fastopt.schedules``), and the one formula of each: the
# host's callables and the prologue (``lr_on_device``, from the device step count) both call these.
CONSTANT, STEP, EXPONENTIAL, INVERSE_TIME, COSINE, WARMUP = range(6)
#: a device row: (first update it applies to, the update its own t counts from, kind, a, b, c)
Row = tuple[int, int, int, float, float, float]


@register_jitable
def _step_decay(t, init, factor, every):
    return init * factor ** (t // every)


@register_jitable
def _exponential(t, init, k):
    return init * math.exp(-k * t)


@register_jitable
def _inverse_time(t, init, k):
    return init / (1 + k * t)


@register_jitable
def _cosine(t, init, steps, final):
    return final + (init - final) * 0.5 * (1 + math.cos(math.pi * min(t, steps) / steps))


@register_jitable
def _warmup(t, peak, steps, start):
    return start + (peak - start) * min(t, steps) / steps


@register_jitable
def schedule_value(kind, t, a, b, c):
    """The value after ``t`` updates of a built-in schedule of ``kind`` with parameters a, b, c."""
    if kind == STEP:
        return _step_decay(t, a, b, c)
    if kind == EXPONENTIAL:
        return _exponential(t, a, b)
    if kind == INVERSE_TIME:
        return _inverse_time(t, a, b)
    if kind == COSINE:
        return _cosine(t, a, b, c)
    if kind == WARMUP:
        return _warmup(t, a, b, c)
    return a  # CONSTANT


@register_jitable
def lr_on_device(table, first, count, t):
    """The value after ``t`` updates of the schedule held in rows ``first .. first + count``
    of ``table`` (rows of ``fastopt.schedules.Schedule.rows`` as float64): the last row that has started."""
    k = first
    for j in range(first + 1, first + count):
        if table[j, 0] <= t:
            k = j
    return schedule_value(int(table[k, 2]), t - int(table[k, 1]), table[k, 3], table[k, 4], table[k, 5])


class Unsupported(TypeError):
    """The rule's per-step scalars cannot run on the device; the message says why."""


def _hyper_widths(rule):
    """The hyper-parameters the per-step scalars read, and how many float64 slots each takes."""
    widths = {}
    for name in _read_keys(rule):
        default = rule.defaults.get(name)
        if isinstance(default, tuple):
            widths[name] = len(default)
        elif isinstance(default, (bool, np.bool_, numbers.Real)):
            widths[name] = 1
        else:
            raise Unsupported(f"{rule.name}: its per-step scalars read {name!r}, which is not a number")
    return widths


def _tree(fn):
    return ast.parse(textwrap.dedent(inspect.getsource(fn))).body[0]


def _read_keys(rule):
    fn = _tree(rule.host_scalars)
    h = fn.args.args[0].arg
    keys = []
    for node in ast.walk(fn):
        if isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name) and node.value.id == h:
            if not (isinstance(node.slice, ast.Constant) and isinstance(node.slice.value, str)):
                raise Unsupported(f"{rule.name}: its per-step scalars index {h} with a non-literal key")
            if node.slice.value not in keys:
                keys.append(node.slice.value)
    return keys


class _Rewrite(ast.NodeTransformer):
    """``h["k"]`` -> ``h_k`` (or a tuple of slots); ``return {..}`` / ``dict(..)`` -> a tuple."""

    def __init__(self, h, widths, order):
        self.h, self.widths, self.order = h, widths, order

    def visit_Subscript(self, node):
        if isinstance(node.value, ast.Name) and node.value.id == self.h:  # before visit_Name sees h
            key = node.slice.value
            if self.widths[key] == 1:
                return ast.Name(f"h_{key}", ast.Load())
            return ast.Tuple([ast.Name(f"h_{key}_{j}", ast.Load()) for j in range(self.widths[key])], ast.Load())
        return self.generic_visit(node)

    def visit_Name(self, node):
        if node.id == self.h:
            raise Unsupported("its per-step scalars use the hyper-parameters other than as h['name']")
        return node

    def visit_Return(self, node):
        value = node.value
        if isinstance(value, ast.Dict) and all(isinstance(k, ast.Constant) for k in value.keys):
            by_name = {k.value: v for k, v in zip(value.keys, value.values)}
        elif isinstance(value, ast.Call) and isinstance(value.func, ast.Name) and value.func.id == "dict" \
                and not value.args:
            by_name = {k.arg: k.value for k in value.keywords}
        else:
            raise Unsupported("its per-step scalars must return a dict literal")
        node.value = ast.Tuple([self.visit(by_name[n]) for n in self.order], ast.Load())
        return node


def _device_scope(fn, jit, seen):
    """The globals ``fn`` needs on the device: modules and numbers as they are, functions
    compiled (from their source, recursively) with ``jit``; anything else is Unsupported."""
    scope = {"__builtins__": __builtins__}
    for name in fn.__code__.co_names:
        if name not in fn.__globals__:
            continue  # a builtin or an attribute name
        g = fn.__globals__[name]
        if isinstance(g, (pytypes.ModuleType, numbers.Number, np.bool_)):
            scope[name] = g
        elif inspect.isfunction(g):
            scope[name] = _device_function(g, jit, seen)
        elif hasattr(g, "py_func") or type(g).__name__.endswith("Dispatcher"):
            scope[name] = g  # already compiled (register_jitable, njit, cuda.jit)
        else:
            raise Unsupported(f"{fn.__module__}.{fn.__name__} reads {name}, a {type(g).__name__} kept on the host")
    return scope


def _device_function(fn, jit, seen):
    key = (fn, jit)
    if key not in seen:
        scope = _device_scope(fn, jit, seen)
        tree = _tree(fn)
        tree.decorator_list = []  # compiled by ``jit`` alone
        exec(compile(ast.Module([tree], []), inspect.getsourcefile(fn), "exec"), scope)  # noqa: S102
        seen[key] = jit(scope[fn.__name__])
    return seen[key]


class StepScalars:
    """A rule's per-step scalars as a device function ``(step, lr, *hyper slots) -> tuple``
    in the kernel's order (``names``: the per-step floats, then the per-step flags)."""

    def __init__(self, rule):
        spec = rule.kernels.scalars
        self.rule, self.names = rule, tuple(n for n in spec.order if n not in spec.constant)
        self.flags = tuple(n in spec.flags for n in self.names)
        self.widths = _hyper_widths(rule)
        self.slots = sum(self.widths.values())
        fn = _tree(rule.host_scalars)
        h, step, lr = (a.arg for a in fn.args.args[:3])
        fn = _Rewrite(h, self.widths, self.names).visit(fn)
        fn.decorator_list = []
        slots = [f"h_{k}" if w == 1 else f"h_{k}_{j}" for k, w in self.widths.items() for j in range(w)]
        fn.args = ast.arguments(posonlyargs=[], args=[ast.arg(a) for a in (step, lr, *slots)], kwonlyargs=[],
                                kw_defaults=[], defaults=[])
        fn.name = f"{rule.name}_step_scalars"
        self._tree = ast.fix_missing_locations(fn)
        self._compiled = {}
        self.function(lambda f: f)  # the rewrite and the helpers' globals are checked now

    def function(self, jit):
        """The rewritten scalars compiled with ``jit`` (``cuda.jit(device=True)``, or identity)."""
        if jit not in self._compiled:
            host = self.rule.host_scalars
            scope = _device_scope(host, jit, {})
            exec(compile(ast.Module([self._tree], []), inspect.getsourcefile(host), "exec"), scope)  # noqa: S102
            self._compiled[jit] = jit(scope[self._tree.name])
        return self._compiled[jit]

    def hyper_row(self, group):
        """The group's hyper-parameter slots, float64 (bools as 0 / 1)."""
        row = []
        for k, w in self.widths.items():
            v = group[k]
            row += [float(x) for x in v] if w > 1 else [float(v)]
        return row


_STEP_SCALARS = {}


def step_scalars(rule):
    """The rule's :class:`StepScalars` (cached), or raise :class:`Unsupported`."""
    key = rule.kernels
    if key not in _STEP_SCALARS:
        try:
            _STEP_SCALARS[key] = StepScalars(rule)
        except Unsupported as e:
            _STEP_SCALARS[key] = e
    found = _STEP_SCALARS[key]
    if isinstance(found, Unsupported):
        raise found
    return found


def unsupported(rule):
    """Why ``rule``'s per-step scalars cannot run on the device, or None if they can."""
    try:
        step_scalars(rule)
    except Unsupported as e:
        return str(e)
    return None


# -- the kernels ------------------------------------------------------------------------

def make_prologue(rule):
    """The prologue kernel of ``rule`` (see the module docstring), a Python function for
    ``cuda.jit`` or ``compile_ptx``: the partials combined, the norm finished and the clip
    factor taken by the host's own functions (``_reduce``), compiled for the device.

    ``(totals, checks, mode, p, norm_on, guard, count, clip, max_norm, grad_scale,
    loss_scale, found_inf, status, steps, restarts, hyper, table, rows, out)``: the
    reduction's partials and its mode and order ``p``; whether a norm is computed, whether a
    non-finite one skips the step (and counts in ``status[SKIPS]``), whether it clips at
    ``max_norm``; the caller's gradient factor; an AMP scaler's loss scale (the gradients
    are divided by ``loss_scale[0]``) and inf flag (a nonzero ``found_inf[0]`` skips the
    step, counted), one-element device arrays read here, so the host never waits for them;
    the status slots; per group its step count, restart flag (the next update starts a
    state: its scalars see step 1), hyper slots, schedule rows ``(first, count)`` of
    ``table``, and its ``out`` row."""
    from numba import cuda

    from ._reduce import clip_coefficient, combine_in_order, finish
    spec = step_scalars(rule)
    device = cuda.jit(device=True)
    args = ", ".join(f"hyper[g, {j}]" for j in range(spec.slots))
    lines = [
        "def prologue(totals, checks, mode, p, norm_on, guard, count, clip, max_norm, grad_scale, loss_scale,",
        "             found_inf, status, steps, restarts, hyper, table, rows, out):",
        "    ls = float64(loss_scale[0])  # (the simulator would keep float32's precision)",
        "    unscale = grad_scale / ls if 0.0 < ls < INF else NAN",
        "    # a loss scale that is not a finite positive number skips the step as an inf does",
        "    skip = found_inf[0] != 0 or not 0.0 < unscale <= MAX_GRAD_SCALE",
        "    counted = skip",
        "    scale = unscale",
        "    if norm_on and not skip:",
        "        total, check = combine(totals, checks, mode)",
        "        total, finite = finish(total, check, mode, p)",
        "        total *= unscale",
        "        status[NORM] = total",
        "        skip = guard and not finite",
        "        counted = skip and count",
        "        if clip:",
        "            scale = unscale * clip_coefficient(total, max_norm)",
        "    status[SKIPPED] = 1.0 if skip else 0.0",
        "    if counted:",
        "        status[SKIPS] += 1.0",
        "    for g in range(steps.size):",
        "        out[g, SKIP] = 1.0 if skip else 0.0",
        "        out[g, SCALE] = scale",
        "        if not skip:",
        "            t = 1 if restarts[g] != 0 else steps[g] + 1",
        "            lr = lr_at(table, rows[g, 0], rows[g, 1], steps[g])",
        f"            v = scalars(t, lr{', ' if args else ''}{args})",
    ]
    for j, flag in enumerate(spec.flags):
        lines.append(f"            out[g, HEAD + {j}] = " + (f"1.0 if v[{j}] else 0.0" if flag else f"v[{j}]"))
    lines += ["            steps[g] += 1", "            restarts[g] = 0"]
    scope = {"float64": np.float64, "INF": math.inf, "NAN": math.nan, "MAX_GRAD_SCALE": float(np.finfo(np.float32).max),
             "lr_at": device(lr_on_device), "scalars": spec.function(device),
             "combine": combine_in_order,
             "finish": finish, "clip_coefficient": clip_coefficient, "NORM": NORM, "SKIPPED": SKIPPED,
             "SKIPS": SKIPS, "SKIP": SKIP, "SCALE": SCALE, "HEAD": HEAD}
    exec(compile("\n".join(lines) + "\n", __file__, "exec"), scope)  # noqa: S102 - generated from the declaration
    return scope["prologue"]


def make_update(kernels, rule):
    """The update kernel of ``kernels`` whose per-step scalars come from a device row ``d``
    (a prologue's): ``(param, grad, *states, master, c, d, zero)``, where ``c`` is the
    host's tuple (only its constant tail is read) and ``zero`` a 0 in the math's dtype (a
    bare 0 would compare in float64). A row whose skip flag is set writes nothing."""
    from numba import cuda

    from ._cuda import cuda as kernel_cuda  # the simulator's module where it is on
    spec = step_scalars(rule)
    n = len(kernels.states)
    states = "".join(f"s{k}, " for k in range(n))
    per_step = [f"d[{HEAD + j}] != zero" if flag else f"d[{HEAD + j}]" for j, flag in enumerate(spec.flags)]
    rest = [f"c[{1 + len(spec.names) + k}]" for k in range(len(kernels.scalars.order) - len(spec.names) + 1)]
    items = ", ".join([f"d[{SCALE}]", *per_step, *rest])
    src = (f"def device_update(param, grad, {states}master, c, d, zero):\n"
           f"    if d[{SKIP}] != zero:\n"
           f"        return\n"
           f"    c2 = ({items},)\n"
           f"    for i in range(cuda.grid(1), param.size, cuda.gridsize(1)):\n"
           f"        apply(i, param, grad, {states}master, c2, 0)\n")
    apply = kernels._forms(cuda.jit(device=True), range)[0]
    scope = {"cuda": kernel_cuda, "apply": apply}
    exec(compile(src, __file__, "exec"), scope)  # noqa: S102 - generated from the declaration
    return scope["device_update"]


_PROLOGUES, _UPDATES = {}, {}


def _salt(rule):
    """What a rule's device-step kernels are generated from (its math and host scalars' module,
    the engine, this module, the CUDA pieces and the formats): their disk cache's key."""
    source = rule.kernels._salt + inspect.getsource(inspect.getmodule(_salt))
    return cuda_salt(hashlib.sha256(source.encode()).hexdigest())


def prologue(rule):
    """The compiled prologue of ``rule`` (kept in memory and on disk, as every CUDA kernel)."""
    key = rule.kernels
    if key not in _PROLOGUES:
        from numba import cuda
        _PROLOGUES[key] = enable_cuda_cache(cuda.jit(make_prologue(rule)), f"{key.name}_prologue", _salt(rule))
    return _PROLOGUES[key]


def update(rule):
    """The compiled device-row update kernel of ``rule`` (kept in memory and on disk)."""
    key = rule.kernels
    if key not in _UPDATES:
        from numba import cuda
        _UPDATES[key] = enable_cuda_cache(cuda.jit(make_update(key, rule)), f"{key.name}_device_update",
                                          _salt(rule))
    return _UPDATES[key]


def launch_update(rule, arrays, c, d, stream):
    """Launch the device-row update over CUDA arrays ``(param, grad, *states, master)``
    (kernel views) on ``stream``; ``d``: the group's row of the prologue's ``out``."""
    from . import _cuda, _dispatch
    flat = _dispatch.device_views(arrays)  # converted once per plan, as every update's
    _cuda.launch_stride(update(rule), flat[0].size, stream, *flat, c, d, compute_dtype(d.dtype).type(0))


def launch_prologue(rule, stream, *args):
    """One thread of :func:`prologue` on ``stream`` (arguments: see :func:`make_prologue`)."""
    from . import _cuda
    _cuda._configured(prologue(rule), 1, 1, stream)(*args)
