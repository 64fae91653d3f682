"""The optimizer base: one rule applied to whole models, one fused launch per param group.

Parameters come in one of two forms, chosen from what the user passes:

* views of a :class:`~fastopt.ParamBuffer` (the buffer itself, or its views split into
  param groups): gradients are read from the buffer's grad arena, ``step()`` takes no
  argument, and a group that covers a contiguous run of the arena is one flat pass;
* separate arrays: ``step(grads)`` takes the gradients, in the order of the params.

State lives in arenas that mirror the parameters' layout (one per state name, allocated
at the first step on the params' device and dtype). On the CPU every group is one Numba
call: a flat loop over an arena, or a loop over typed lists of tensors with a chunk table
(so a model of many small tensors costs one call, not one per tensor). On CUDA a group is
one launch per contiguous run of a ParamBuffer, or one per tensor for separate arrays.
"""
import inspect
import math

import numpy as np

from . import _dispatch
from .buffer import ALIGN, ParamBuffer, _aligned_empty, find_segment, layout
from .clip import NormPlan, clip_coefficient
from .kernels._reduce import chunk_table

CHUNK = 1 << 15  # elements per work item of the list kernel: big tensors are shared by threads
NONFINITE = ("skip", "raise", "propagate")


class Optimizer:
    """Base class; subclasses set ``rule`` (a ``fastopt.kernels`` module) and call
    ``super().__init__(params, defaults)`` with PyTorch's constructor arguments."""

    rule = None
    torch_names = {}  # fastopt state name -> torch.optim's, where they differ
    initial = {}      # state name -> group key holding its initial value (else zero)
    fixed = {}        # hyper-parameters the class fixes (AdamW: decoupled_weight_decay=True)

    def __init__(self, params, defaults, *, max_grad_norm=None, nonfinite="skip"):
        if max_grad_norm is not None and not (isinstance(max_grad_norm, (int, float)) and max_grad_norm > 0):
            raise ValueError(f"max_grad_norm must be None or a positive number, got {max_grad_norm!r}")
        if nonfinite not in NONFINITE:
            raise ValueError(f"nonfinite must be one of {', '.join(map(repr, NONFINITE))}, got {nonfinite!r}")
        self.max_grad_norm, self.nonfinite = max_grad_norm, nonfinite
        self.last_grad_norm = None     # the global gradient norm of the last step (when computed)
        self.last_step_skipped = False
        self.skipped_steps = 0         # steps skipped for a non-finite gradient (nonfinite="skip")
        self._norm_plan = None
        self.defaults = dict(defaults)
        self._scalar_keys = [k for k in inspect.signature(self.rule.scalars).parameters if k not in ("step", "lr")]
        self.param_groups = []
        self._buffer = None   # the ParamBuffer every param is a view of, in buffer mode
        self._params = []     # every param, in group order
        self.arenas = None    # state name -> arena, after the first step
        self._plans = None
        self._grad_cache = (None, None)
        self.launches = 0     # kernel launches so far (tests read it: one per group per step)
        if isinstance(params, ParamBuffer):
            params = [{"params": params}]
        params = list(params) if not _is_array(params) else [params]
        if not params:
            raise ValueError("params is empty: the optimizer got no parameters")
        if not isinstance(params[0], dict):
            params = [{"params": params}]
        for group in params:
            self.add_param_group(group)

    # -- groups -----------------------------------------------------------------------
    def add_param_group(self, param_group):
        if self.arenas is not None:
            raise RuntimeError("add param groups before the first step: state arenas are laid out then")
        if not isinstance(param_group, dict) or "params" not in param_group:
            raise TypeError("a param group must be a dict with a 'params' entry")
        group = dict(self.defaults, **param_group, **self.fixed)
        arrays = group["params"]
        if isinstance(arrays, ParamBuffer):
            arrays = arrays.params
        arrays = [arrays] if _is_array(arrays) else list(arrays)
        arrays = [_dispatch.as_kernel_array(a) for a in arrays]
        if not arrays:
            raise ValueError(f"param group {len(self.param_groups)} has no parameters")
        self._check_hyper(group, f"param group {len(self.param_groups)}")
        first = len(self._params)
        for i, a in enumerate(arrays):
            name = f"params[{first + i}]"
            checked = _dispatch._Array(name, a)
            if checked.dtype not in _dispatch.SUPPORTED_DTYPES:
                raise TypeError(f"{name} has dtype {checked.dtype}; fastopt supports float32 and float64")
            ref = _dispatch._Array("params[0]", (self._params or arrays)[0])
            if (checked.device, checked.dtype) != (ref.device, ref.dtype):
                raise ValueError(f"{name} is {checked.dtype} on {checked.device} but params[0] is "
                                 f"{ref.dtype} on {ref.device}: one optimizer holds one device and dtype")
            if not checked.contiguous or not checked.writeable:
                raise ValueError(f"{name} must be C-contiguous and writeable: it is updated in place")
        check_disjoint(self._params + arrays)
        self._buffer, self._segments = _resolve_buffer(self._params + arrays)  # raises before any change
        group["params"] = arrays
        self._params += arrays
        self.param_groups.append(group)

    def _check_hyper(self, group, where):
        lr = group["lr"]
        value = lr(0) if callable(lr) else lr
        try:
            self.rule.check(**{**group, "lr": value})
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None

    # -- learning rate ------------------------------------------------------------------
    @property
    def lr(self):
        """The learning rate the next step of the first group will use."""
        return self.lrs[0]

    @property
    def lrs(self):
        steps = self._steps()
        return [_lr_at(g["lr"], t) for g, t in zip(self.param_groups, steps)]

    @property
    def steps(self):
        """Updates done by the first group."""
        return self._steps()[0]

    def _steps(self):
        return [p.step for p in self._plans] if self._plans else [0] * len(self.param_groups)

    # -- state ---------------------------------------------------------------------------
    def _states_needed(self, group):
        """The rule's state slots this group reads and writes (others stay None)."""
        return self.rule.STATES

    def _layout(self):
        """(offsets of each param in a state arena, arena size)."""
        if self._buffer is not None:
            offs = self._buffer.offsets
            return [0 if i is None else offs[i] for i in self._segments], self._buffer.arena.size
        return layout([a.shape for a in self._params], self._params[0].dtype)

    def _allocate(self):
        """State arenas for what the groups' options need (existing ones are kept), and the
        launch plans (rebuilt, step counts kept: a loaded state dict may change options)."""
        needed = {s for g in self.param_groups for s in self._states_needed(g)}
        offsets, size = self._layout()
        dtype = self._params[0].dtype
        self._offsets = offsets
        steps = self._steps()
        self.arenas = self.arenas or {}
        for name in self.rule.STATES:
            if name in needed and name not in self.arenas:
                self.arenas[name] = self._start_value(name, _zeros(self._params[0], size, dtype))
        self._plans = [self._plan(g) for g in self.param_groups]
        for plan, t in zip(self._plans, steps):
            plan.step = t
        if self._buffer is not None:
            align = ALIGN // self._buffer.dtype.itemsize
            runs = _runs([o for o, a in zip(offsets, self._params) if a.size],
                         [a.size for a in self._params if a.size], align)
            self._norm_plan = NormPlan([self._buffer.grad_arena[lo:hi] for lo, hi in runs])

    def _start_value(self, name, arena):
        """Fill ``arena`` (already zero) with the state's start: Adagrad's accumulator starts
        at its group's ``initial_accumulator_value``, every other state at zero."""
        for g in self.param_groups:
            value = g.get(self.initial.get(name), 0)
            if value:
                for a, o in zip(g["params"], self._offsets_of(g)):
                    arena[o:o + a.size] = value
        return arena

    def _offsets_of(self, group):
        k = next(k for k, g in enumerate(self.param_groups) if g is group)  # == would compare arrays
        first = sum(len(g["params"]) for g in self.param_groups[:k])
        return self._offsets[first:first + len(group["params"])]

    def state_views(self, i):
        """Param ``i``'s state arrays (views of the arenas, in the param's shape)."""
        if self.arenas is None:
            return {}
        a, o = self._params[i], self._offsets[i]
        return {n: arena[o:o + a.size].reshape(a.shape) for n, arena in self.arenas.items()}

    def _plan(self, group):
        offsets = self._offsets_of(group)
        params = group["params"]
        slots = [self.arenas[n] if n in self._states_needed(group) else None for n in self.rule.STATES]
        slots += [None] * (3 - len(slots))
        plan = _Plan(self.rule.KERNELS, group, numel=sum(a.size for a in params))
        cpu = isinstance(params[0], np.ndarray)
        if plan.numel == 0:
            plan.flat = []
            return plan
        if self._buffer is not None:
            align = ALIGN // self._buffer.dtype.itemsize
            runs = _runs([o for o, a in zip(offsets, params) if a.size], [a.size for a in params if a.size], align)
            arena, grad_arena = self._buffer.arena, self._buffer.grad_arena
            if len(runs) == 1 or not cpu:
                plan.flat = [[x if x is None else x[lo:hi] for x in (arena, grad_arena, *slots)] for lo, hi in runs]
                return plan
            grads = [grad_arena[o:o + a.size] for o, a in zip(offsets, params)]
        else:
            grads = None  # given to each step
        views = [[x if x is None else x[o:o + a.size] for x in slots] for o, a in zip(offsets, params)]
        if cpu:
            plan.set_lists([a.reshape(-1) for a in params], grads, list(zip(*views)) if views else [], slots)
        else:
            plan.tensors = [[a.reshape(a.size), *v] for a, v in zip(params, views)]
        return plan

    # -- the update --------------------------------------------------------------------
    def zero_grad(self):
        """Zero the ParamBuffer's gradient arena (separate arrays own no gradients here)."""
        if self._buffer is not None:
            self._buffer.zero_grad()

    def step(self, grads=None):
        """One update of every param group: one fused launch per group with a ParamBuffer;
        with separate arrays, ``grads`` lists their gradients in the order of the params."""
        if self._buffer is not None and grads is not None:
            raise ValueError("grads must be None: this optimizer reads gradients from its ParamBuffer's "
                             "grad arena (write them into buffer.grads)")
        if self._buffer is None:
            grads = self._check_grads(grads)
        if self._plans is None:
            self._allocate()
        scale = 1.0
        if self.max_grad_norm is not None or self.nonfinite != "propagate":
            # one reduction pass: the global norm, and whether any gradient is inf or NaN
            norms = self._norm_plan if grads is None else grads.norm_plan()
            total, finite = norms.norm(2.0)
            self.last_grad_norm = total
            if not finite and self.nonfinite == "raise":
                raise FloatingPointError("a gradient holds inf or NaN (nonfinite='raise'): nothing was updated")
            if not finite and self.nonfinite == "skip":
                self.last_step_skipped = True
                self.skipped_steps += 1
                return
            if self.max_grad_norm is not None:
                scale = clip_coefficient(total, self.max_grad_norm)  # applied inside the update kernel
        dtype = self._params[0].dtype
        work = []  # every group's scalars first: a bad schedule value must not leave groups half-stepped
        for i, plan in enumerate(self._plans):
            group = plan.group
            lr = _lr_at(group["lr"], plan.step)
            if not 0 <= lr < math.inf:
                raise ValueError(f"param group {i}: the learning rate is {lr} at step {plan.step}")
            work.append(_dispatch.cast_scalars(
                self.rule.scalars(step=plan.step + 1, lr=lr, **{k: group[k] for k in self._scalar_keys}), dtype,
                scale))
        self.last_step_skipped = False
        for plan, scalars in zip(self._plans, work):
            self.launches += plan.run(scalars, grads)
            plan.step += 1

    def _check_grads(self, grads):
        if grads is None:
            raise ValueError("grads is required: the params are separate arrays, so step(grads) takes "
                             "their gradients (or build the optimizer on a ParamBuffer)")
        grads = [grads] if _is_array(grads) else list(grads)
        cached, checked = self._grad_cache
        if cached is not None and len(cached) == len(grads) and all(a is b for a, b in zip(cached, grads)):
            return checked
        originals, grads = grads, [_dispatch.as_kernel_array(g) for g in grads]
        if len(grads) != len(self._params):
            raise ValueError(f"grads has {len(grads)} arrays for {len(self._params)} params")
        for i, (p, g) in enumerate(zip(self._params, grads)):
            a, b = _dispatch._Array(f"params[{i}]", p), _dispatch._Array(f"grads[{i}]", g)
            if b.device != a.device:
                raise ValueError(f"grads[{i}] is on {b.device} but params[{i}] is on {a.device}")
            if b.dtype != a.dtype:
                raise TypeError(f"grads[{i}] has dtype {b.dtype} but params[{i}] has dtype {a.dtype}")
            if b.shape != a.shape:
                raise ValueError(f"grads[{i}] has shape {b.shape} but params[{i}] has shape {a.shape}")
            if not b.contiguous:
                raise ValueError(f"grads[{i}] is not C-contiguous")
            if _dispatch._overlap(a, b):
                raise ValueError(f"grads[{i}] shares memory with params[{i}]")
        checked = _GradLists(grads, self.param_groups)
        self._grad_cache = (originals, checked)
        return checked

    # -- state dicts ---------------------------------------------------------------------
    def state_dict(self, torch=False):
        """PyTorch's layout: ``{"state": {i: {"step", <state>...}}, "param_groups": [...]}``.

        Arrays are host copies (NumPy), or ``torch`` tensors under torch.optim's state names
        with ``torch=True``, ready for ``torch_optimizer.load_state_dict``.
        """
        state, groups, i = {}, [], 0
        for g, t, lr in zip(self.param_groups, self._steps(), self.lrs):
            idx = list(range(i, i + len(g["params"])))
            groups.append({**{k: v for k, v in g.items() if k != "params"}, "params": idx})
            if t:
                for j in idx:
                    views = {n: v for n, v in self.state_views(j).items() if n in self._states_needed(g)}
                    state[j] = {"step": float(t), **{n: _to_host(v) for n, v in views.items()}}
                    if torch:
                        state[j] = self._to_torch_state(state[j], g)
            if torch:
                # torch has no schedules (a schedule is code): it gets the lr the next step uses
                groups[-1] = {k: list(v) if isinstance(v, tuple) else v for k, v in groups[-1].items()}
                groups[-1]["lr"] = lr
            i += len(idx)
        return {"state": state, "param_groups": groups}

    def _to_torch_state(self, entry, group):
        import torch
        out = {"step": torch.tensor(entry["step"], dtype=torch.float32)}
        out.update({self.torch_names.get(n, n): torch.from_numpy(v) for n, v in entry.items() if n != "step"})
        return out

    def load_state_dict(self, state_dict):
        """Load a state dict of this rule: fastopt's own, or ``torch.optim``'s (tensors and
        torch's state names are converted). Everything is checked before anything is written."""
        groups, state = state_dict["param_groups"], state_dict["state"]
        if len(groups) != len(self.param_groups):
            raise ValueError(f"the state dict has {len(groups)} param groups, this optimizer {len(self.param_groups)}")
        renamed = {t: f for f, t in self.torch_names.items()}
        new_groups, steps, arrays = [], [], {}
        for k, (saved, mine) in enumerate(zip(groups, self.param_groups)):
            if len(saved["params"]) != len(mine["params"]):
                raise ValueError(f"param group {k} has {len(saved['params'])} params in the state dict, "
                                 f"{len(mine['params'])} here")
            g = dict(mine)
            for key in mine:
                if key != "params" and key in saved and key not in self.fixed:
                    value = _from_torch_value(saved[key])
                    if key == "lr" and callable(mine["lr"]) and not callable(value):
                        continue  # a schedule is code: it stays, and the step count sets its value
                    g[key] = tuple(value) if isinstance(value, list) else value
            self._check_hyper(g, f"param group {k} of the state dict")
            new_groups.append(g)
            first = sum(len(x["params"]) for x in self.param_groups[:k])
            group_steps = set()
            for j, saved_index in enumerate(saved["params"]):
                entry = state.get(saved_index, state.get(str(saved_index)))
                p = self._params[first + j]
                if entry is None:
                    group_steps.add(0)
                    continue
                # torch's SGD keeps no step count: a momentum buffer means at least one step
                group_steps.add(int(_from_torch_value(entry["step"])) if "step" in entry else int(bool(entry)))
                for name, value in entry.items():
                    name = renamed.get(name, name)
                    if name not in self.rule.STATES:
                        continue  # e.g. NAdam's mu_product: recomputed from the step
                    value = np.asarray(_from_torch_value(value))
                    if value.shape != tuple(p.shape):
                        raise ValueError(f"state {name!r} of param {first + j} has shape {value.shape}, "
                                         f"the param {tuple(p.shape)}")
                    arrays[(first + j, name)] = value
            if len(group_steps) > 1:
                raise ValueError(f"param group {k}: params at different steps {sorted(group_steps)}; "
                                 "fastopt steps a group as one")
            steps.append(group_steps.pop())
        for g, new in zip(self.param_groups, new_groups):
            g.update({k: v for k, v in new.items() if k != "params"})
        self._allocate()
        for name, arena in self.arenas.items():  # a param with no entry starts afresh
            self._start_value(name, _zero(arena))
        for (i, name), value in arrays.items():
            if name in self.arenas:
                o, a = self._offsets[i], self._params[i]
                _copy_in(self.arenas[name], o, value.reshape(-1).astype(a.dtype, copy=False))
        for plan, t in zip(self._plans, steps):
            plan.step = t

    def __repr__(self):
        where = f"ParamBuffer of {len(self._params)} tensors" if self._buffer is not None else \
            f"{len(self._params)} arrays"
        return f"{type(self).__name__}({where}, {len(self.param_groups)} group(s), lr={self.lr})"


class _Plan:
    """How one group is launched; ``step`` counts its updates."""

    def __init__(self, kernels, group, numel):
        self.kernels, self.group, self.numel = kernels, group, numel
        self.step = 0
        self.flat = self.lists = self.tensors = self.entry = None
        self.parallel = numel >= _dispatch.PARALLEL_THRESHOLD

    def set_lists(self, params, grads, state_views, slots):
        from numba.typed import List
        self.lists = [List(params), None if grads is None else List(grads)]
        self.lists += [None if s is None else List(v) for s, v in zip(slots, state_views or [()] * 3)]
        self.chunks = chunk_table([a.size for a in params], CHUNK)
        self.kernel = self.kernels.cpu_multi(self.parallel)

    def run(self, scalars, grads):
        if self.flat is not None:
            for k, arrays in enumerate(self.flat):
                if self.entry is not None:
                    self.entry(*arrays, scalars)
                elif isinstance(arrays[0], np.ndarray):
                    kernel = self.kernels.cpu(parallel=self.parallel)
                    kernel(*arrays, scalars)
                    if len(self.flat) == 1:
                        self.entry = _entry_point(kernel, (*arrays, scalars))
                else:
                    _dispatch._launch_cuda(self.kernels, arrays, scalars)
            return len(self.flat)
        if self.lists is not None:
            params, own_grads, s0, s1, s2 = self.lists
            g = own_grads if own_grads is not None else grads.typed(self.group)
            self.kernel(params, g, s0, s1, s2, self.chunks, scalars)
            return 1
        g = grads.arrays(self.group)
        for (p, *states), grad in zip(self.tensors, g):
            _dispatch._launch_cuda(self.kernels, [p, grad.reshape(grad.size), *states], scalars)
        return len(self.tensors)


def _entry_point(dispatcher, args):
    """The machine code compiled for exactly these argument types. A plan's arrays and
    scalar types never change, so later steps call it directly and skip the dispatcher's
    type resolution (about half of a tiny model's 1 us call)."""
    try:
        return dispatcher.overloads[tuple(dispatcher.typeof_pyval(a) for a in args)].entry_point
    except (AttributeError, KeyError):  # a Numba that moved these internals: keep the dispatcher
        return dispatcher


class _GradLists:
    """The checked gradients of one step, split by group (typed lists built once per list)."""

    def __init__(self, grads, groups):
        self._all, self._norms = grads, None
        self._by_group, i = {}, 0
        for g in groups:
            self._by_group[id(g)] = grads[i:i + len(g["params"])]
            i += len(g["params"])
        self._typed = {}

    def arrays(self, group):
        return self._by_group[id(group)]

    def norm_plan(self):
        if self._norms is None:
            self._norms = NormPlan(self._all)
        return self._norms

    def typed(self, group):
        if id(group) not in self._typed:
            from numba.typed import List
            self._typed[id(group)] = List([g.reshape(-1) for g in self._by_group[id(group)]])
        return self._typed[id(group)]


def check_disjoint(params):
    """No param may appear twice or share memory with another: sorted by address, each
    array must start after every earlier one ends (n log n: a model may hold thousands)."""
    seen, spans = {}, []
    for i, a in enumerate(params):
        if id(a) in seen:
            raise ValueError(f"params[{i}] appears more than once among the params (it is params[{seen[id(a)]}])")
        seen[id(a)] = i
        span = _dispatch._Array(f"params[{i}]", a).span()
        if span is not None and span[0] < span[1]:
            spans.append((span[0], span[1], i))
    spans.sort()
    end, last = 0, None
    for start, stop, i in spans:
        if last is not None and start < end:
            first, second = sorted((i, last))
            raise ValueError(f"params[{second}] shares memory with params[{first}]: each param must be its "
                             "own buffer")
        if stop > end:
            end, last = stop, i


def _resolve_buffer(params):
    """``(buffer, segment index of each param)`` when the params are views of one live
    ParamBuffer, ``(None, ...)`` when none is; a mix is an error."""
    owners = [find_segment(a) if a.size else () for a in params]  # () : empty, fits anywhere
    found = [o for o in owners if o]
    if len({id(o[0]) for o in found}) > 1 or (found and None in owners):
        raise ValueError("params mix views of a ParamBuffer with other arrays (or views of several "
                         "buffers): pass the views of one ParamBuffer, or separate arrays only")
    return (found[0][0] if found else None), [o[1] if o else None for o in owners]


def _runs(offsets, sizes, align):
    """Merge segments that follow each other in the arena (the padding between them is
    zeros, which every rule keeps at zero) into ``(start, stop)`` runs."""
    runs = []
    for o, n in sorted(zip(offsets, sizes)):
        if runs and o == -(-runs[-1][1] // align) * align:
            runs[-1][1] = o + n
        else:
            runs.append([o, o + n])
    return [tuple(r) for r in runs]


def _lr_at(lr, t):
    return float(lr(t)) if callable(lr) else lr


def _is_array(x):
    if isinstance(x, np.ndarray) or _dispatch.is_torch(x):  # a torch tensor that requires grad raises on
        return hasattr(x, "shape")                           # __cuda_array_interface__: do not ask it
    return hasattr(x, "__cuda_array_interface__") or hasattr(x, "copy_to_host")


def _zeros(like, n, dtype):
    """A zeroed arena of ``n`` elements on ``like``'s device, cache-line aligned."""
    if isinstance(like, np.ndarray) or type(like).__module__.startswith("cupy"):
        xp = np if isinstance(like, np.ndarray) else _cupy()
        arena = _aligned_empty(xp, n, dtype)
        arena.fill(0)
        return arena
    from numba import cuda  # torch CUDA tensors, Numba device arrays (and the simulator's)
    return cuda.to_device(np.zeros(n, dtype))


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
        return x.item() if x.ndim == 0 else x.numpy()
    return x
