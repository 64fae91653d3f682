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
import contextlib
import inspect
import math
import numbers
import threading
import warnings
from collections.abc import Mapping

import numpy as np

from . import schedules, state8bit
from .buffer import (
    ALIGN,
    ParamBuffer,
    _all_zero,
    _copy_in,
    _from_torch_value,
    _to_host,
    _zero,
    _zeros,
    find_segment,
    layout,
)
from .clip import NormPlan, clip_coefficient
from .kernels import _args, _device, _dispatch, _formats
from .kernels._engine import Scalars, entry_point
from .kernels._reduce import SQUARES, chunk_table

CHUNK = 1 << 15  # elements per work item of the list kernel: big tensors are shared by threads
NONFINITE = ("skip", "raise", "propagate")
MAX_STEPS = 2 ** 53  # a float64 counts every whole number up to here
#: fastopt's keyword options after a rule's hyper-parameters, with their defaults
# the largest gradient factor a step takes: a kernel multiplies in float32 (float64 for float64
# params) and a factor past float32's range would make every gradient inf; no AMP unscale or
# clip factor comes near it
MAX_GRAD_SCALE = float(np.finfo(np.float32).max)
MASTER = "master"  # the float32 copy of 16-bit params (master_weights=True), saved beside the states
OPTIONS = {"max_grad_norm": None, "nonfinite": "skip", "state_dtype": None, "master_weights": False,
           "stochastic_rounding": False, "rounding_seed": 0, "state_bits": None, "state_code": "fp8",
           "capturable": False}


class GuardOptions:
    """``max_grad_norm`` and ``nonfinite``, checked whenever they are set (a step reads them as
    they are: -1 would climb the gradient, NaN make every param NaN, "skp" let NaN through);
    :class:`Optimizer` and ``fastopt.distributed.ShardedOptimizer`` hold them so."""

    @property
    def max_grad_norm(self):
        """The global gradient norm clipped to (None: no clipping); may be set between steps."""
        return self._max_grad_norm

    @max_grad_norm.setter
    def max_grad_norm(self, value):  # checked when set: a step reads it as it is (-1 would climb the gradient)
        if value is not None and not (_is_real(value) and 0 < value < math.inf):
            raise ValueError(f"max_grad_norm must be None or a positive number, got {value!r}")
        self._max_grad_norm = value

    @property
    def nonfinite(self):
        """What a step does with an inf or NaN gradient: "skip", "raise" or "propagate"."""
        return self._nonfinite

    @nonfinite.setter
    def nonfinite(self, value):
        if value not in NONFINITE:
            raise ValueError(f"nonfinite must be one of {', '.join(map(repr, NONFINITE))}, got {value!r}")
        if value == "raise" and getattr(self, "capturable", False):
            raise ValueError("capturable=True decides each step on the device: nonfinite='raise' would read the "
                             "gradient norm on the host (use 'skip' or 'propagate')")
        self._nonfinite = value


class Optimizer(GuardOptions):
    """Base class; a subclass names its ``rule`` (a ``fastopt.kernels`` :class:`Rule`), whose
    declaration gives the constructor (torch's arguments and defaults, then fastopt's
    keyword options ``max_grad_norm`` and ``nonfinite``), the states and their checks.

    ``capturable=True`` (torch's name; CUDA arrays only): the step counts and the learning
    rate live on the device (a number, or a built-in schedule evaluated there from the step
    count), so a whole ``step()`` launches kernels only and can be captured in a CUDA graph;
    see :meth:`step`. Anything that would need the host per step is a named ValueError.

    A state the rule starts from the gradient on its first update (``rule.start_from_grad``:
    SGD's momentum buffer, as torch) may be turned on after the first step, the group's next
    step seeing step=1; any other state turned on late is an error, as it is in torch."""

    rule = None

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.rule is not None and "__init__" not in cls.__dict__:
            cls.__init__ = _constructor(cls.rule)

    def __init__(self, params, defaults, *, max_grad_norm=None, nonfinite="skip", state_dtype=None,
                 master_weights=False, stochastic_rounding=False, rounding_seed=0, state_bits=None, state_code="fp8",
                 capturable=False):
        self.max_grad_norm, self.nonfinite = max_grad_norm, nonfinite  # checked (properties below)
        if state_dtype is not None and str(state_dtype) not in _formats.BY_NAME:
            raise ValueError(f"state_dtype must be None or one of {', '.join(map(repr, _formats.BY_NAME))}, "
                             f"got {state_dtype!r}")
        for name, flag in (("master_weights", master_weights), ("stochastic_rounding", stochastic_rounding),
                           ("capturable", capturable)):
            if not isinstance(flag, (bool, np.bool_)):
                raise TypeError(f"{name} must be True or False, got {flag!r}")
        if not (isinstance(rounding_seed, numbers.Integral) and 0 <= rounding_seed < 2 ** 64):
            raise ValueError(f"rounding_seed must be an integer in [0, 2**64), got {rounding_seed!r}")
        self._state_dtype = None if state_dtype is None else _formats.BY_NAME[str(state_dtype)]
        self.master_weights, self.stochastic_rounding = bool(master_weights), bool(stochastic_rounding)
        self.rounding_seed = int(rounding_seed)
        # 8-bit blockwise state (fastopt/state8bit.py): checked before anything is allocated
        state8bit.check_options(self, state_bits, state_code)
        self.state_bits, self.state_code, self._state8 = state_bits, state_code, None
        self.masters = None   # master_weights: the float32 copy of the params (an arena)
        # CUDA: the step counts, the lr and the guard's decision live on the device (_DeviceSteps)
        self.capturable, self._dev = bool(capturable), None
        self._last_grad_norm = None     # the global gradient norm of the last step (when computed)
        self._last_step_skipped = False
        self._skipped_steps = 0         # steps skipped for a non-finite gradient (nonfinite="skip")
        self._norm_plan = None
        self.defaults = dict(defaults)
        self._edited = [False]  # set by an edit of param_groups: re-check before the next step
        # step, state_dict, load_state_dict, save and load run one at a time: a checkpoint is
        # a consistent snapshot and two threads never interleave an update (RLock: a hook may re-enter)
        self.lock = threading.RLock()
        self.param_groups = _GroupList(self._edited, self.lock)
        self._buffer = None   # the ParamBuffer every param is a view of, in buffer mode
        self._params = []     # every param, in group order
        self.arenas = None    # state name -> arena, after the first step
        self._plans = None
        self._grad_cache = (None, None)
        self.launches = 0     # kernel launches so far (tests read it: one per group per step)
        self._started = []    # per group: the states its updates have started (they hold values)
        self._running = []    # per group: the rule's running host values (NAdam's mu_product), once stepped
        self._group_params = []  # per group: its params when added (an edit may not replace them)
        if isinstance(params, ParamBuffer):
            params = [{"params": params}]
        params = list(params) if not _is_array(params) else [params]
        if not params:
            raise ValueError("params is empty: the optimizer got no parameters")
        if not isinstance(params[0], dict):
            params = [{"params": params}]
        for group in params:
            self.add_param_group(group)
        self._check_precision()
        self._on_cuda = not isinstance(self._params[0], np.ndarray)  # add_param_group keeps one device
        if self.capturable:
            self._check_capturable()

    def _check_capturable(self):
        """capturable=True: every per-step value on the device, or a named ValueError."""
        why = None
        if not self._on_cuda:
            why = "the params are NumPy arrays (on the CPU); it needs CUDA arrays"
        elif self.nonfinite == "raise":
            why = "nonfinite='raise' reads the gradient norm on the host each step (use 'skip' or 'propagate')"
        elif self.stochastic_rounding:
            why = "stochastic_rounding=True keys its noise on a host-side step count"
        elif self.state_bits == 8:
            why = "8-bit state (state_bits=8) launches its own kernels, which take host-side scalars"
        elif type(self)._plan is not Optimizer._plan:
            why = f"{type(self).__name__}'s layer-wise passes take host-side scalars"
        elif _device.unsupported(self.rule):
            why = f"{self.rule.name}'s per-step scalars cannot run on the device ({_device.unsupported(self.rule)})"
        if why:
            raise ValueError(f"capturable=True keeps the step count and lr on the device so that a step "
                             f"launches kernels only: {why}")

    # -- what a step leaves: on CUDA, device values read (with a sync) only when asked ------
    def _status(name, doc, convert=lambda v: v):  # a property factory, run in the class body
        attr = "_" + name

        def get(self):
            self._pull()
            return getattr(self, attr)

        def put(self, value):
            self._pull()
            setattr(self, attr, convert(value))
            if self._dev is not None:  # the device's copy follows the host's edit
                self._dev.push_status(self)
        return property(get, put, doc=doc)

    last_grad_norm = _status("last_grad_norm", "The global gradient norm of the last step (when one was "
                                               "computed), else None.")
    last_step_skipped = _status("last_step_skipped", 'Whether the last step was skipped for an inf or NaN '
                                                     'gradient (nonfinite="skip").', bool)
    skipped_steps = _status("skipped_steps", 'Steps skipped for a non-finite gradient (nonfinite="skip").')
    del _status

    def _pull(self):
        """After CUDA steps decided on the device: their step counts and status to the host."""
        if self._dev is not None and self._dev.stale:
            self._dev.pull(self)

    def _check_precision(self):
        narrow = self.dtype in _formats.BITS
        if self.master_weights and not narrow:
            raise ValueError(f"master_weights=True keeps a float32 copy of bfloat16 or float16 params; these params "
                             f"are {self.dtype}")
        if self.stochastic_rounding and not (narrow and not self.master_weights) and \
                self.state_dtype not in _formats.BITS:
            raise ValueError("stochastic_rounding=True rounds bfloat16 or float16 writes; with these options "
                             f"nothing is stored in 16 bits (params {self.dtype}, state {self.state_dtype}"
                             f"{', master weights' if self.master_weights else ''})")
        state8bit.check_params(self)

    @property
    def state_dtype(self):
        """The dtype of the state arenas: ``state_dtype`` if given, else the params' (torch's rule)."""
        if self.state_bits == 8:  # the state of tensors too small for 8 bits
            return np.dtype(np.float32)
        return self._state_dtype if self._state_dtype is not None else self.dtype

    # -- groups -----------------------------------------------------------------------
    def add_param_group(self, param_group):
        with self.lock:
            self._add_param_group(param_group)

    def _add_param_group(self, param_group):
        if self.arenas is not None:
            raise RuntimeError("add param groups before the first step: state arenas are laid out then")
        if not isinstance(param_group, dict) or "params" not in param_group:
            raise TypeError("a param group must be a dict with a 'params' entry")
        # a fixed key the dict carries (AdamW's own groups do) is taken, and checked below
        group = _Group(self, {**self.defaults, **self.rule.fixed, **param_group})
        arrays = group["params"]
        if isinstance(arrays, ParamBuffer):
            arrays = arrays.params
        arrays = [arrays] if _is_array(arrays) else list(arrays)
        arrays = [_dispatch.as_kernel_array(a) for a in arrays]
        if not arrays:
            raise ValueError(f"param group {len(self.param_groups)} has no parameters")
        self._check_hyper(group, f"param group {len(self.param_groups)}")
        first = len(self._params)
        ref = _dispatch.check_array(_dispatch._Array("params[0]", (self._params or arrays)[0]))
        for i, a in enumerate(arrays):
            _dispatch.check_array(_dispatch._Array(f"params[{first + i}]", a), like=ref)
        check_disjoint(self._params + arrays)
        self._buffer, self._segments = _resolve_buffer(self._params + arrays)  # raises before any change
        dict.__setitem__(group, "params", tuple(arrays))
        self._params += arrays
        list.append(self.param_groups, group)
        self._group_params.append(tuple(arrays))
        self._started.append(set())
        self._running.append({})

    def _check_hyper(self, group, where):
        """Every hyper-parameter of ``group``: its type (that of the class's default) and
        its value (the rule's checks, with torch's messages), prefixed by ``where``."""
        for key, default in self.rule.defaults.items():  # a value must have its default's type
            problem = _type_problem(key, group.get(key), default)
            if problem:
                raise TypeError(f"{where}: {problem}")
            if isinstance(group[key], list):  # a tuple: an edit in place would escape the checks and
                dict.__setitem__(group, key, tuple(group[key]))  # the group's cached constants
        for key, value in self.rule.fixed.items():
            if group.get(key) != value:
                raise ValueError(f"{where}: {key} is {value!r} in {type(self).__name__}, it cannot be "
                                 f"{group.get(key)!r}")
        lr = group["lr"]
        if _host_only(lr) and getattr(self, "capturable", False):
            raise ValueError(f"{where}: lr is a callable that only the host can evaluate; capturable=True "
                             "evaluates the lr on the device: pass a number or a fastopt.schedules schedule "
                             "(constant, step_decay, exponential_decay, inverse_time_decay, cosine_decay, "
                             "linear_warmup, join, warmup_cosine)")
        value = lr(0) if callable(lr) else lr
        try:
            self.rule.check({**group, "lr": value})
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None

    @property
    def dtype(self):
        """The params' dtype (every state arena has it too)."""
        return np.dtype(self._params[0].dtype)

    @property
    def shapes(self):
        """Each param's shape, in group order."""
        return [tuple(a.shape) for a in self._params]

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
        self._pull()
        return [p.step for p in self._plans] if self._plans else [0] * len(self.param_groups)

    # -- state ---------------------------------------------------------------------------
    def _layout(self):
        """(offsets of each param in a state arena, arena size)."""
        if self._buffer is not None:
            offs = self._buffer.offsets
            return [0 if i is None else offs[i] for i in self._segments], self._buffer.arena.size
        return layout([a.shape for a in self._params], self._params[0].dtype)

    def _allocate(self):
        """State arenas for what the groups' options need (existing ones are kept), and the
        launch plans (rebuilt, step counts kept: a loaded state dict may change options)."""
        # a state an option no longer needs keeps its arena and values: torch keeps such a buffer
        # (SGD's momentum set to 0 and back) and reads it again when the option comes back
        needed = {s for g in self.param_groups for s in self.states_needed(g)}.union(*self._started)
        offsets, size = self._layout()
        dtype = self.state_dtype
        self._offsets = offsets
        steps = self._steps()
        restarts = [p.restart for p in self._plans] if self._plans else [False] * len(self.param_groups)
        self._dev = None  # its counts are the plans' now; rebuilt for the new plans at the next device step
        self.arenas = self.arenas or {}
        for name in self.rule.states if self.state_bits != 8 else ():
            if name in needed and name not in self.arenas:
                self.arenas[name] = self._start_value(name, _zeros(self._params[0], size, dtype))
        if self.master_weights and self.masters is None:
            self.masters = _zeros(self._params[0], size, np.float32)
            for a, o in zip(self._params, offsets):
                _copy_in(self.masters, o, _to_host(a).reshape(-1).astype(np.float32))
        if self.state_bits == 8:
            self._state8 = self.state8_layout()
            self._state8.ensure(needed)
            self.arenas = self._state8.arenas
        self._plans = [self._state8.plan(g, k) if self._state8 is not None else self._plan(g, k)
                       for k, g in enumerate(self.param_groups)]
        for k, (plan, t, restart) in enumerate(zip(self._plans, steps, restarts)):
            plan.step, plan.restart = t, restart  # a restart a skipped step left pending still holds
            self._started[k].update(self.states_needed(self.param_groups[k]))
        if self._buffer is not None:
            # the params' own spans: the alignment padding between them never counts
            self._norm_plan = NormPlan([self._buffer.grad_arena[o:o + a.size]
                                        for o, a in zip(offsets, self._params) if a.size])

    def _start_value(self, name, arena):
        """Fill ``arena`` (already zero) with the state's start: Adagrad's accumulator starts
        at its group's ``initial_accumulator_value``, every other state at zero."""
        for g in self.param_groups:
            value = g.get(self.rule.initial.get(name), 0)
            if value:
                for a, o in zip(g["params"], self._offsets_of(g)):
                    arena[o:o + a.size] = value
        return arena

    def _offsets_of(self, group):
        k = next(k for k, g in enumerate(self.param_groups) if g is group)  # == would compare arrays
        first = sum(len(g["params"]) for g in self.param_groups[:k])
        return self._offsets[first:first + len(group["params"])]

    def state_views(self, i):
        """Param ``i``'s state arrays (views of the arenas, in the param's shape), and its
        float32 master copy as ``"master"`` with ``master_weights=True``."""
        if self.arenas is None:
            return {}
        a, o = self._params[i], self._offsets[i]
        if self._state8 is not None:  # 8-bit state: dequantized copies (the codes: state_dict())
            views = {n: self._state8.dequantized(i, n).reshape(a.shape) for n in self._state8.names}
            return {**views, **({MASTER: self.masters[o:o + a.size].reshape(a.shape)}
                                if self.masters is not None else {})}
        arenas = {**self.arenas, **({MASTER: self.masters} if self.masters is not None else {})}
        return {n: arena[o:o + a.size].reshape(a.shape) for n, arena in arenas.items()}

    def storage_views(self, i):
        """Live views of the memory param ``i``'s state occupies (each state arena's span, its
        8-bit codes, block scales or 32-bit small state, its master copy): what a step writes
        for it besides the param."""
        if self.arenas is None:
            return []
        n, o = self._params[i].size, self._offsets[i]
        if self._state8 is not None:
            views = [x for name in self._state8.names for x in self._state8.parts(i, name)]
        else:
            views = [arena[o:o + n] for arena in self.arenas.values()]
        return views + ([self.masters[o:o + n]] if self.masters is not None else [])

    def _plan(self, group, k):
        view = _formats.kernel_view  # a 16-bit float as its bits: converted once, here
        offsets = self._offsets_of(group)
        params = group["params"]
        held = self.held_states(k)
        slots = [self.arenas[n] if n in held else None for n in self.rule.states]
        slots.append(self.masters)  # the kernels take the master copy (or None) after the states
        plan = _Plan(self.rule.kernels, group, numel=sum(a.size for a in params))
        cpu = isinstance(params[0], np.ndarray)
        if plan.numel == 0:
            plan.flat = []
            return plan
        if self._buffer is not None:
            align = ALIGN // self._buffer.dtype.itemsize
            runs = _runs([o for o, a in zip(offsets, params) if a.size], [a.size for a in params if a.size], align)
            arena, grad_arena = self._buffer.arena, self._buffer.grad_arena
            if len(runs) == 1 or not cpu:
                plan.flat = [[x if x is None else view(x[lo:hi]) for x in (arena, grad_arena, *slots)]
                             for lo, hi in runs]
                plan.offsets = [lo for lo, _ in runs]
                return plan
            grads = [grad_arena[o:o + a.size] for o, a in zip(offsets, params)]
        else:
            grads = None  # given to each step
        views = [[x if x is None else view(x[o:o + a.size]) for x in slots] for o, a in zip(offsets, params)]
        if cpu:
            plan.set_lists([view(a.reshape(-1)) for a in params], None if grads is None else [view(g) for g in grads],
                           list(zip(*views)) if views else [], slots)
        else:
            plan.tensors = [[view(a.reshape(a.size)), *v] for a, v in zip(params, views)]
        return plan

    # -- the update --------------------------------------------------------------------
    def zero_grad(self):
        """Zero the ParamBuffer's gradient arena (separate arrays own no gradients here)."""
        if self._buffer is not None:
            self._buffer.zero_grad()

    def step(self, grads=None, *, grad_scale=1.0, loss_scale=None, found_inf=None):
        """One update of every param group: one fused launch per group with a ParamBuffer;
        with separate arrays, ``grads`` lists their gradients in the order of the params.

        ``grad_scale`` (default 1.0): a factor the kernels apply to every gradient as they read
        it, e.g. an AMP loss scaler's ``1 / scale``, so unscaling costs no pass; clipping and
        ``last_grad_norm`` see the scaled gradients.

        ``loss_scale``, ``found_inf`` (default None): an AMP scaler's loss scale and inf flag
        as one-element arrays, as ``torch.amp.GradScaler`` hands them to torch's fused
        optimizers (``fastopt.torch`` passes them): the gradients are divided by
        ``loss_scale[0]`` (times ``grad_scale``), and a nonzero ``found_inf[0]`` skips the step
        (nothing written, counted in ``skipped_steps``). On CUDA they are read on the device,
        so the host does not wait for the scaler's result; on the CPU, read here.

        On CUDA a guarded (``nonfinite="skip"``) or clipped step is decided on the device
        (``kernels/_device.py``): the norm reduction, a one-thread prologue (norm, skip flag,
        clip factor, lr and per-step scalars from the device step count) and the updates,
        with no copy to the host; ``skipped_steps``, ``last_grad_norm``, ``last_step_skipped``,
        ``steps`` and ``lr`` read the device (one sync) when asked. ``nonfinite="raise"`` reads
        the norm on the host (it must raise before anything is written), as do a rule whose
        per-step scalars cannot run on the device (NAdam), stochastic rounding, 8-bit state,
        LAMB/LARS and an lr callable that is not a ``fastopt.schedules`` schedule.
        With ``capturable=True`` every step runs so, guarded or not: it launches kernels only,
        with the same arguments each step, so it can be captured in a CUDA graph and replayed
        (``grad_scale`` is then captured by value, as every launch argument is)."""
        with self.lock:
            self._step(grads, grad_scale, None if loss_scale is None and found_inf is None else
                       (_one_element("loss_scale", loss_scale), _one_element("found_inf", found_inf)))

    def _step(self, grads, grad_scale=1.0, scaler=None):
        if grad_scale != 1.0 and not (isinstance(grad_scale, numbers.Real) and 0 < grad_scale <= MAX_GRAD_SCALE):
            raise ValueError(f"grad_scale must be a finite positive number (at most {MAX_GRAD_SCALE:.4g}), "
                             f"got {grad_scale!r}: nothing was updated")
        if self._buffer is not None and grads is not None:
            raise ValueError("grads must be None: this optimizer reads gradients from its ParamBuffer's "
                             "grad arena (write them into buffer.grads)")
        if self._plans is None:
            self._adopt_groups()
        elif self._edited[0]:
            self._pull()  # the checks read the step counts
            self._apply_edits()
        if self._buffer is None:  # after the edits (a replaced group is split by its new self) and
            grads = self._check_grads(grads)  # before a first step lays out the arenas (a refused one lays none)
        if self._plans is None:
            self._edited[0] = False
            self._allocate()
            if self._buffer is not None and _all_zero(self._buffer.grad_arena):
                warnings.warn("the first step found every gradient zero: did the backward pass write into "
                              "the ParamBuffer's grads (buf.grads / buf.grad_arena)?", RuntimeWarning, stacklevel=3)
        if self._on_cuda:  # (the CPU's steps skip both checks: a tiny model's step is a few us)
            if self._device_decides(scaler is not None):
                self._device_step(grads, grad_scale, scaler)
                return
            self._pull()  # a host step after device ones: their counts and status first
            # the host now owns the counts, status and settings: the next device step rebuilds
            # its copies from them (kept, they would replay this step's count and edits stale)
            self._dev = None
        if scaler is not None:  # read here (on CUDA: a sync), as a step decided on the host must
            loss_scale, found_inf = (default if a is None else _host_value(a) for a, default in zip(scaler, (1, 0)))
            # a loss scale that is not a finite positive number (or one that leaves the gradient
            # factor past float32's range) skips the step as an inf does: the device-side step
            # decides so too (kernels/_device.py), where nothing can be raised without a sync
            unscale = grad_scale / loss_scale if 0 < loss_scale < math.inf else math.nan
            if found_inf != 0 or not 0 < unscale <= MAX_GRAD_SCALE:
                self._last_step_skipped = True
                self._skipped_steps += 1
                return
            grad_scale = unscale
        scale = grad_scale  # the caller's factor (an AMP unscale), times the clip factor below
        if self.max_grad_norm is not None or self.nonfinite != "propagate":
            # one reduction pass: the global norm, and whether any gradient is inf or NaN
            norms = self._norm_plan if grads is None else grads.norm_plan()
            total, finite = norms.norm(2.0)
            total *= grad_scale
            self._last_grad_norm = total
            if not finite and self.nonfinite == "raise":
                raise FloatingPointError("a gradient holds inf or NaN (nonfinite='raise'): nothing was updated")
            if not finite and self.nonfinite == "skip":
                self._last_step_skipped = True
                self._skipped_steps += 1
                return
            if self.max_grad_norm is not None:
                scale = grad_scale * clip_coefficient(total, self.max_grad_norm)  # applied inside the kernel
        dtype = self._params[0].dtype
        work = []  # every group's scalars first: a bad schedule value must not leave groups half-stepped
        running = {}  # group -> the rule's running values after this step
        for i, plan in enumerate(self._plans):
            group = plan.group
            lr = _lr_at(group["lr"], plan.step)
            if not 0 <= lr < math.inf:
                raise ValueError(f"param group {i}: the learning rate is {lr} at step {plan.step}")
            step = 1 if plan.restart else plan.step + 1
            if plan.constants is None:  # packed once per group, again after an edit of the group
                plan.constants = self.rule.kernel_constants(group, dtype)
                plan.native_constants = Scalars.native(plan.constants)
            native = getattr(plan, "entry", None) is not None  # a compiled entry point takes Python floats
            hyper = group
            if self.rule.running:
                running[i] = self._advanced(i, step)
                hyper = {**group, **running[i]}
            work.append(self.rule.kernel_scalars(hyper, step, lr, dtype, scale,
                                                 plan.native_constants if native else plan.constants, native=native))
        self._last_step_skipped = False
        for k, (plan, scalars) in enumerate(zip(self._plans, work)):
            # stochastic rounding: keyed on (seed, group, update number), so a resumed run rounds alike
            rounding = (_formats.rounding_key(self.rounding_seed, k), plan.step + 1) if self.stochastic_rounding \
                else None
            self.launches += plan.run(scalars, grads, rounding)
            plan.step += 1
            plan.restart = False
            if k in running:
                self._running[k] = running[k]

    def _advanced(self, k, step):
        """Group ``k``'s running values after its update number ``step``, advanced from those
        the updates before it left."""
        group, before = self.param_groups[k], self.running_values(k, step - 1)
        return {n: r.advance(group, step, before[n]) for n, r in self.rule.running.items()}

    def running_values(self, k, steps=None):
        """Group ``k``'s running values (NAdam's ``mu_product``) after ``steps`` updates
        (default: those done), which a state dict and a checkpoint keep: the kept ones, or
        their value at constant hyper-parameters where none are kept (a fresh optimizer, a
        state dict without them)."""
        steps = self._steps()[k] if steps is None else steps
        kept = self._running[k]
        return {n: kept[n] if n in kept else r.at(self.param_groups[k], steps) for n, r in self.rule.running.items()}

    def _device_decides(self, scaler=False):
        """Whether this step runs decided on the device (CUDA): a capturable optimizer, or a
        guarded ("skip"), clipped or AMP-scaled (``scaler``) step whose rule, options and lr
        the device can evaluate.
        Otherwise the host decides (nonfinite="raise" must raise before anything is written;
        a callable lr that is not a built-in schedule, stochastic rounding and 8-bit state
        need host-side values; unguarded unclipped steps need no norm at all)."""
        if self.capturable:
            return True
        if self.nonfinite == "raise" or (self.nonfinite == "propagate" and self.max_grad_norm is None
                                         and not scaler):
            return False
        if self.stochastic_rounding or self._state8 is not None:
            return False
        if any(type(p) is not _Plan for p in self._plans) or _device.unsupported(self.rule):
            return False
        return not any(_host_only(g["lr"]) for g in self.param_groups)

    def _device_step(self, grads, grad_scale, scaler=None):
        if self._dev is None:
            self._dev = _DeviceSteps(self)
        guard = self.nonfinite == "skip"
        norms = None
        if guard or self.max_grad_norm is not None:
            norms = self._norm_plan if grads is None else grads.norm_plan()
        self.launches += self._dev.step(self, norms, guard, grads, grad_scale, scaler)

    def _apply_edits(self):
        """After ``param_groups`` were edited: re-check every group as the constructor does,
        and start the state an option turned on needs (or refuse), before any launch."""
        self._edited[0] = False  # first: an edit during the checks is caught by the next step
        try:
            self._check_edits()
        except BaseException:
            self._edited[0] = True
            raise
        for plan in self._plans:
            plan.constants = None

    def _adopt_groups(self, check=True):
        """A group replaced by a dict (an edit) must hold the params it replaces (the state is
        laid out for them) and becomes the optimizer's group, whose later edits are seen; with
        ``check`` every group is checked as the constructor checks it (a load does not: it
        writes the saved values, checked then). Whether any was replaced."""
        if len(self.param_groups) != len(self._group_params):
            raise ValueError(f"param_groups holds {len(self.param_groups)} groups, the optimizer's state "
                             f"{len(self._group_params)}: add groups with add_param_group; a group, once added, stays")
        replaced = False
        for k, group in enumerate(self.param_groups):
            where = f"param group {k}"
            if not isinstance(group, Mapping) or "params" not in group:
                raise TypeError(f"{where} must be a dict with a 'params' entry")
            params = group["params"]
            params = params.params if isinstance(params, ParamBuffer) else [params] if _is_array(params) \
                else list(params)
            kept = self._group_params[k]
            if len(params) != len(kept) or any(a is not b and _dispatch.as_kernel_array(a) is not b
                                               for a, b in zip(params, kept)):
                raise ValueError(f"{where}: its params were replaced; the state is laid out for the params "
                                 "it had: build a new optimizer, or add a group with add_param_group")
            if type(group) is not _Group or group._edited is not self._edited or (
                    self._plans is not None and group is not self._plans[k].group):
                replaced = True  # a new dict put in place of the group
                group = _Group(self, group)
                dict.__setitem__(group, "params", self._group_params[k])
                list.__setitem__(self.param_groups, k, group)
            if check:
                self._check_hyper(group, where)
        if replaced:
            self._grad_cache = (None, None)  # its gradients are split by group object
        return replaced

    def _check_edits(self):
        replaced = self._adopt_groups()
        late = []
        for k, (group, plan) in enumerate(zip(self.param_groups, self._plans)):
            if plan.restart and not set(self.rule.start_from_grad) & set(self.states_needed(group)):
                # turned off again before an update started it: torch makes a momentum buffer at
                # the first update that uses it, so this one was never made and starts afresh later
                self._started[k] -= set(self.rule.start_from_grad)
                plan.restart = False
                self._dev = None  # the device's restart flags follow at the next device step
            new = [s for s in self.states_needed(group) if s not in self._started[k]]
            if new and plan.step:
                refused = [s for s in new if s not in self.rule.start_from_grad]
                if refused:
                    raise ValueError(
                        f"param group {k}: its options now need state {', '.join(map(repr, refused))}, "
                        f"which its {plan.step} earlier steps did not keep (torch.optim raises here too): "
                        "set the option before the first step, or load a state dict that holds it")
                late.append(k)
        if replaced or any(s not in self._started[k] for k, g in enumerate(self.param_groups)
                           for s in self.states_needed(g)):
            self._allocate()
            for k in late:
                self._plans[k].restart = True

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
        written, read = [], []
        for i, (p, g) in enumerate(zip(self._params, grads)):
            a, b = _dispatch._Array(f"params[{i}]", p), _dispatch._Array(f"grads[{i}]", g)
            written.append(a)
            read.append(_dispatch.check_array(b, like=a, shape_of=a, written=False))
        if self.arenas is not None:
            written += [_dispatch._Array(f"state {n!r}", arena) for n, arena in self.arenas.items()]
        _dispatch.check_no_overlap(written, read)  # a grad may not be any param's (nor state's) memory
        # split by the groups the plans launch (a dict put in place of one meanwhile is adopted
        # at the next step's edits, before its gradients are split again)
        checked = _GradLists(grads, [p.group for p in self._plans] if self._plans else self.param_groups)
        self._grad_cache = (originals, checked)
        return checked

    # -- state dicts ---------------------------------------------------------------------
    def state_dict(self, torch=False):
        """PyTorch's layout: ``{"state": {i: {"step", <state>...}}, "param_groups": [...]}``.

        Arrays are host copies (NumPy), or ``torch`` tensors under torch.optim's state names
        with ``torch=True``, ready for ``torch_optimizer.load_state_dict``.
        """
        with self.lock:
            return self._state_dict(torch)

    def _settle(self):
        """Apply the param-group edits no step has seen yet, as the next step would: a snapshot
        then holds the states the groups' options need, and the restarts they start."""
        if self._plans is not None and self._edited[0]:
            self._pull()
            self._apply_edits()

    def _state_dict(self, torch):
        self._settle()
        state, groups, i = {}, [], 0
        restarts = [p.restart for p in self._plans] if self._plans else [False] * len(self.param_groups)
        for k, (g, t, lr, restart) in enumerate(zip(self.param_groups, self._steps(), self.lrs, restarts)):
            idx = list(range(i, i + len(g["params"])))
            running = self.running_values(k) if t else {}  # kept per param, as torch keeps NAdam's mu_product
            groups.append({**{k: v for k, v in g.items() if k != "params"}, "params": idx})
            kept = self.saved_states(k, restart)
            if t:
                for j in idx:
                    views = {n: v for n, v in self.state_views(j).items() if n in kept or n == MASTER}
                    state[j] = {"step": float(t), **{n: _to_host(v) for n, v in views.items()}}
                    if self._state8 is not None and not torch:  # the codes and scales, exactly
                        for n in self._state8.names:
                            if n in views:
                                state[j].update(self._state8.saved(j, n))
                    state[j].update(running)
                    if torch:
                        state[j] = self._to_torch_state(state[j], g)
            if torch:
                # torch has no schedules (a schedule is code): it gets the lr the next step uses
                groups[-1] = {k: list(v) if isinstance(v, tuple) else v for k, v in groups[-1].items()}
                groups[-1]["lr"] = lr
            i += len(idx)
        if torch:
            return {"state": state, "param_groups": groups}
        return {"state": state, "param_groups": groups, "skipped_steps": self.skipped_steps,
                **({"state_code": self.state_code} if self.state_bits == 8 else {})}

    def held_states(self, k):
        """The states group ``k``'s kernels are given: those its options need and those its
        updates started (an option turned off keeps its state, as torch keeps SGD's momentum
        buffer at momentum 0, and reads it again when the option comes back)."""
        return set(self.states_needed(self.param_groups[k])) | self._started[k]

    def saved_states(self, k, restart):
        """The states group ``k``'s saved state holds: :meth:`held_states`, less those the next
        update starts from the gradient (``restart``): they hold nothing yet, and torch leaves
        out a momentum buffer it has not made (loading starts it so)."""
        return self.held_states(k) - (set(self.rule.start_from_grad) if restart else set())

    def _to_torch_state(self, entry, group):
        import torch
        out = {"step": torch.tensor(entry["step"], dtype=torch.float32)}
        # torch keeps a running value (NAdam's mu_product) in its scalar dtype: float64 when
        # that is the default dtype, else float32
        scalar = torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
        for n, v in entry.items():
            if n in self.rule.running:
                out[n] = torch.tensor(v, dtype=scalar)
            elif n != "step":
                out[self.rule.torch_names.get(n, n)] = (torch.from_numpy(v.view(np.int16)).view(torch.bfloat16)
                                                        if v.dtype == _formats.BFLOAT16 else torch.from_numpy(v))
        return out

    def load_state_dict(self, state_dict):
        """Load a state dict of this rule: fastopt's own, or ``torch.optim``'s (tensors and
        torch's state names are converted). All or nothing: the whole dict is checked (the
        rule, every hyper-parameter, step count and state array) before anything is written."""
        with self.lock:
            self.restore(*self._read_state_dict(state_dict))

    # -- the state as arrays: the one way checkpoints read and write it ------------------
    def export_state(self):
        """A consistent snapshot (taken under :attr:`lock`): ``rule`` (the class name),
        ``dtype``, ``shapes`` and ``offsets`` of the params in the state arenas, ``steps``
        (per group), ``groups`` (hyper-parameters per group, a schedule as None: it is code)
        and ``arenas`` (state name -> host copy of the whole arena, in ``state_dtype``; with
        ``master_weights=True`` also ``"master"``, the float32 copy of the params). A snapshot
        before the first step holds the zero state a fresh run starts from."""
        with self.lock:
            if self.arenas is None:
                self._allocate()
            self._settle()
            arenas = {n: _to_host(a) for n, a in self.arenas.items()}
            if self.masters is not None:
                arenas[MASTER] = _to_host(self.masters)
            return {"rule": type(self).__name__, "dtype": self._params[0].dtype.name,
                    "state_dtype": self.state_dtype.name,
                    **({"state_bits": 8, "state_code": self.state_code} if self.state_bits == 8 else {}),
                    "shapes": [list(a.shape) for a in self._params], "offsets": [int(o) for o in self._offsets],
                    "steps": self._steps(), "restarts": [bool(p.restart) for p in self._plans],
                    "started": [sorted(self.held_states(k)) for k in range(len(self.param_groups))],
                    "running": [self.running_values(k) for k in range(len(self.param_groups))],
                    "skipped_steps": self.skipped_steps, "groups": [_group_meta(g) for g in self.param_groups],
                    "arenas": arenas}

    def merged_groups(self, saved_groups, where):
        """The groups with the saved hyper-parameters (``saved_groups``: one mapping per group;
        fixed values, and a schedule's place, stay as they are), each checked as the
        constructor checks them; a ValueError prefixed by ``where`` names the first problem."""
        self._adopt_groups(check=False)  # a group replaced by a dict: its params checked, adopted first
        return [self._merged_group(group, saved, f"{where}param group {k}")
                for k, (group, saved) in enumerate(zip(self.param_groups, saved_groups))]

    def _merged_group(self, group, saved, where):
        new = dict(group)
        for key, value in saved.items():
            if key not in group or key == "params" or key in self.rule.fixed:
                continue
            value = _from_torch_value(value)
            if key == "lr" and (callable(group["lr"]) or value is None) and not callable(value):
                continue  # a schedule is code: it stays, and the step count sets its value
            new[key] = tuple(value) if isinstance(value, list) else value
        _as_value_error(self._check_hyper, new, where)
        return new

    def states_needed(self, group):
        """The states ``group``'s options read and write (the others stay None)."""
        return self.rule.states_needed(group)

    def state8_layout(self):
        """The 8-bit state's layout (``state_bits=8``): a checkpoint's arenas are checked
        against it and split by it before anything is allocated or written."""
        return self._state8 if self._state8 is not None else state8bit.State8(self)

    def restore(self, groups, steps, arrays, restarts=None, skipped_steps=None, running=None, started=None):
        """Write a checked state: ``groups`` from :meth:`merged_groups`, ``steps`` per group,
        ``arrays``: ``{(param index, state name): flat values}`` (a param with no entry starts
        afresh), ``restarts``: per group, whether its next update starts the states of
        ``rule.start_from_grad`` from the gradient (default: none does), ``skipped_steps``:
        the count to go on from (default: kept), ``running``: per group, the rule's running
        values (default: taken from the step counts), ``started``: per group, the names of the
        states its updates started (default: those its options need; one an option no longer
        needs is kept, and read again when the option comes back). The caller checks the values
        (see ``fastopt.load``); this checks the layout, then writes."""
        restarts = [False] * len(groups) if restarts is None else list(restarts)
        if not len(groups) == len(steps) == len(restarts) == len(self.param_groups):
            raise ValueError(f"restore: {len(groups)} groups, {len(steps)} step counts and {len(restarts)} "
                             f"restart flags for {len(self.param_groups)} param groups")
        for t in steps:
            _step_count(t, "restore: a step count")
        names = set(self.rule.states) | ({MASTER} if self.master_weights else set())
        for (i, name), value in arrays.items():
            if name not in names or not 0 <= i < len(self._params) or value.size != self._params[i].size:
                raise ValueError(f"restore: state {name!r} of param {i} does not fit this optimizer")
        started = [set() for _ in groups] if started is None else [set(s) for s in started]
        if len(started) != len(groups) or any(not s <= set(self.rule.states) for s in started):
            raise ValueError(f"restore: started states {started!r} do not fit this optimizer")
        with self.lock:
            self._adopt_groups(check=False)
            for g, new in zip(self.param_groups, groups):
                dict.update(g, {k: v for k, v in new.items() if k != "params"})
            self._edited[0] = False
            self._started = started  # and below, what the options need
            self.masters = None  # a param with no saved master copy starts from its value
            self._allocate()
            for name, arena in self.arenas.items():
                self._start_value(name, _zero(arena))
            for (i, name), value in arrays.items():
                if name == MASTER:
                    _copy_in(self.masters, self._offsets[i], value.astype(np.float32, copy=False))
                elif self._state8 is not None:
                    self._state8.write(i, name, value)
                elif name in self.arenas:
                    _copy_in(self.arenas[name], self._offsets[i], value.astype(self.state_dtype, copy=False))
            for k, (plan, t, restart) in enumerate(zip(self._plans, steps, restarts)):
                plan.step, plan.restart = t, bool(restart and t)
                if not t:
                    self._started[k] = set()
            if skipped_steps is not None:
                self._skipped_steps = int(skipped_steps)
            self._running = [{n: float(v) for n, v in (r or {}).items() if n in self.rule.running}
                             for r in (running or [None] * len(groups))]

    def _read_state_dict(self, state_dict):
        """``(merged groups, step per group, {(param, state): array in the params' dtype},
        restart per group, skipped steps or None, running values per group, started states per
        group)``: :meth:`restore`'s arguments, or a ValueError / TypeError naming the first
        problem; writes nothing."""
        name = type(self).__name__
        self._adopt_groups(check=False)  # a group replaced by a dict: its params checked, adopted first
        if not isinstance(state_dict, Mapping) or not {"param_groups", "state"} <= set(state_dict):
            raise ValueError("a state dict is a mapping with 'state' and 'param_groups', "
                             f"got {type(state_dict).__name__}")
        groups, state = state_dict["param_groups"], state_dict["state"]
        if not isinstance(groups, (list, tuple)) or not isinstance(state, Mapping):
            raise ValueError("the state dict's 'param_groups' must be a list and its 'state' a mapping")
        if len(groups) != len(self.param_groups):
            raise ValueError(f"the state dict has {len(groups)} param groups, this optimizer {len(self.param_groups)}")
        rule = self.rule
        renamed = {t: f for f, t in rule.torch_names.items()}
        known = set(rule.states) | set(rule.torch_names.values()) | set(rule.running) | {"step"}
        known |= {MASTER} if self.master_weights else set()
        known |= {s + state8bit.ABSMAX for s in rule.states} if self.state_bits == 8 else set()
        # every state dict of the rule carries torch's positional arguments (the rules torch has)
        identity = [n for n, h in rule.hyper.items() if not h.keyword]
        new_groups, steps, arrays, listed, restarts, running, started = [], [], {}, set(), [], [], []
        code = state_dict.get("state_code")
        skipped = state_dict.get("skipped_steps")
        if skipped is not None:
            skipped = _step_count(_from_torch_value(skipped), "the state dict's skipped_steps")
        for k, (saved, mine) in enumerate(zip(groups, self.param_groups)):
            where = f"param group {k} of the state dict"
            if not isinstance(saved, Mapping) or not isinstance(saved.get("params"), (list, tuple)):
                raise ValueError(f"{where} must be a mapping with a 'params' list")
            missing = [key for key in identity if key not in saved]
            if missing:
                raise ValueError(f"{where} has no {', '.join(map(repr, missing))}: it is not a state dict of {name}")
            for key, value in rule.fixed.items():
                if key in saved and _from_torch_value(saved[key]) != value:
                    raise ValueError(f"{where} has {key}={saved[key]!r}: it is not a state dict of {name}, "
                                     f"which has {key}={value!r}")
            if len(saved["params"]) != len(mine["params"]):
                raise ValueError(f"param group {k} has {len(saved['params'])} params in the state dict, "
                                 f"{len(mine['params'])} here")
            g = self._merged_group(mine, saved, where)
            new_groups.append(g)
            needed = self.states_needed(g)
            first = sum(len(x["params"]) for x in self.param_groups[:k])
            group_steps, late, carried, held = set(), set(), {n: set() for n in rule.running}, set()
            for j, saved_index in enumerate(saved["params"]):
                i, p = first + j, self._params[first + j]
                listed.add(str(saved_index))
                entry = state.get(saved_index, state.get(str(saved_index)))
                entry = {} if entry is None else entry
                if not isinstance(entry, Mapping):
                    raise ValueError(f"the state of param {i} must be a mapping, got {type(entry).__name__}")
                entry = {n: v for n, v in entry.items() if v is not None or n == "step"}  # old torch: None buffers
                unknown = sorted(set(entry) - known)
                if any(n.endswith(state8bit.ABSMAX) for n in unknown):
                    raise ValueError(f"the state of param {i} holds 8-bit state ({', '.join(map(repr, unknown))}): "
                                     f"load it into {name} with state_bits=8")
                if unknown:
                    raise ValueError(f"the state of param {i} holds {', '.join(map(repr, unknown))}, which "
                                     f"{name} does not keep (it keeps {', '.join(map(repr, rule.states))}): "
                                     "the state dict is of another rule")
                if not entry:
                    group_steps.add(0)
                    continue
                # torch's SGD keeps no step count: a momentum buffer means at least one step
                t = _step_count(entry["step"], f"the step of param {i}") if "step" in entry else 1
                group_steps.add(t)
                have = {renamed.get(n, n) for n in entry}
                held |= have & set(rule.states)  # an option turned off keeps its state: so does the load
                lacking = [s for s in needed if s not in have]
                kept = [s for s in lacking if s not in rule.start_from_grad]
                if t and kept:
                    raise ValueError(f"the state of param {i} has no {', '.join(map(repr, kept))}, which "
                                     f"{name} with these options keeps: the state dict is incomplete")
                if t:  # one the next update starts from the gradient (as torch, a momentum buffer not made yet)
                    late.add(tuple(lacking))
                for n in rule.running:
                    carried[n].add(_running_value(entry.get(n), f"the {n} of param {i}"))
                for n, value in entry.items():
                    n = renamed.get(n, n)
                    if self.state_bits == 8 and n in rule.states and n + state8bit.ABSMAX in entry:
                        if code != self.state_code:
                            raise ValueError(f"the state of param {i} holds 8-bit codes of state_code={code!r}, "
                                             f"this optimizer's are {self.state_code!r}: the same codes would "
                                             "mean other values")
                        arrays[(i, n)] = state8bit.read_saved(value, entry[n + state8bit.ABSMAX], p,
                                                              f"state {n!r} of param {i}")
                    elif self.state_bits == 8 and n.endswith(state8bit.ABSMAX):
                        continue
                    elif n in rule.states or (n == MASTER and self.master_weights):
                        arrays[(i, n)] = _state_array(value, p, f"state {n!r} of param {i}",
                                                      np.float32 if n == MASTER else self.state_dtype)
            if len(group_steps) > 1:
                raise ValueError(f"param group {k}: params at different steps {sorted(group_steps)}; "
                                 "fastopt steps a group as one")
            if len(late) > 1:
                raise ValueError(f"param group {k}: some params' state has {', '.join(map(repr, max(late)))} "
                                 "and some not yet; fastopt starts a group's state as one")
            steps.append(group_steps.pop())
            restarts.append(bool(late and late.pop()))
            started.append(sorted(held))
            if any(len(v) > 1 for v in carried.values()):
                raise ValueError(f"param group {k}: its params' {', '.join(carried)} differ; fastopt steps a group "
                                 "as one")
            # a running value not in the state dict (an old one) is taken from the step count
            running.append({n: v.pop() for n, v in carried.items() if v and None not in v})
        stray = sorted(str(key) for key in state if str(key) not in listed)
        if stray:
            raise ValueError(f"the state dict has state for params {', '.join(stray)}, which no param group lists")
        return new_groups, steps, arrays, restarts, skipped, running, started

    def __repr__(self):
        where = f"ParamBuffer of {len(self._params)} tensors" if self._buffer is not None else \
            f"{len(self._params)} arrays"
        return f"{type(self).__name__}({where}, {len(self.param_groups)} group(s), lr={self.lr})"


class _Plan:
    """How one group is launched; ``step`` counts its updates."""

    def __init__(self, kernels, group, numel):
        self.kernels, self.group, self.numel = kernels, group, numel
        self.step = 0
        self.constants = None  # the constant tail of the kernel's scalars (Rule.kernel_constants)
        self.native_constants = None  # the same as Python floats (Scalars.native)
        self.restart = False  # the next update starts a state from the gradient (scalars see step 1)
        self.flat = self.lists = self.tensors = self.entry = None
        self.offsets = None  # of the flat runs in the arena (stochastic rounding keys each run on it)
        self.parallel = numel >= _dispatch.PARALLEL_THRESHOLD

    def set_lists(self, params, grads, state_views, slots):
        """Typed lists of the tensors (``state_views``: per state and then the master copy,
        its views, one per tensor)."""
        from numba.typed import List
        self.lists = [List(params), None if grads is None else List(grads)]
        self.lists += [None if s is None else List(v) for s, v in zip(slots, state_views or [()] * len(slots))]
        self.chunks = chunk_table([a.size for a in params], CHUNK)
        self.kernel = self.kernels.cpu_multi(self.parallel)

    def run(self, scalars, grads, rounding=None):
        """Launch the group's update; ``rounding``: None, or ``(key, step)`` of stochastic rounding."""
        if rounding is not None:
            key, step = rounding
        if self.flat is not None:
            for k, arrays in enumerate(self.flat):
                if rounding is not None:
                    scalars = (*scalars[:-1], _formats.rounding_key(key, step, self.offsets[k]))
                if self.entry is not None:
                    self.entry(*arrays, scalars)
                elif isinstance(arrays[0], np.ndarray):
                    kernel = self.kernels.cpu(parallel=self.parallel)
                    kernel(*arrays, scalars)
                    if len(self.flat) == 1:
                        self.entry = entry_point(kernel, (*arrays, scalars))
                else:
                    _dispatch._launch_cuda(self.kernels, arrays, scalars)
            return len(self.flat)
        if self.lists is not None:
            params, own_grads, *states = self.lists
            g = own_grads if own_grads is not None else grads.typed(self.group)
            if rounding is not None:
                scalars = (*scalars[:-1], _formats.rounding_key(key, step))
            self.kernel(params, g, *states, self.chunks, scalars)
            return 1
        g = grads.arrays(self.group)
        for t, ((p, *states), grad) in enumerate(zip(self.tensors, g)):
            if rounding is not None:
                scalars = (*scalars[:-1], _formats.rounding_key(key, step, t))
            _dispatch._launch_cuda(self.kernels, [p, _formats.kernel_view(grad.reshape(grad.size)), *states], scalars)
        return len(self.tensors)


class _DeviceSteps:
    """The device side of an optimizer's CUDA steps decided on the device (see
    ``kernels/_device.py``): per group its step count, restart flag, hyper-parameter slots,
    lr rows and the prologue's output row; the status slots (last norm, last skipped, skips).
    A step launches the norm reduction, the prologue and the updates, and copies nothing to
    the host; the host uploads only what it changed (an edited group, a new lr) and reads
    the counts and status back (one sync) when asked (:meth:`pull`)."""

    def __init__(self, opt):
        from numba import config, cuda
        self.rule, self.spec = opt.rule, _device.step_scalars(opt.rule)
        self.stream = 0 if config.ENABLE_CUDASIM else _dispatch._stream_of(opt._params[0], cuda)
        plans, n = opt._plans, len(opt._plans)
        up = self._upload
        self.steps = up(np.array([p.step for p in plans], np.int64))
        self.restarts = up(np.array([int(p.restart) for p in plans], np.int64))
        self.status = up(np.zeros(_device.STATUS))
        self.push_status(opt)
        dtype = _formats.compute_dtype(opt.dtype)
        self.out = up(np.zeros((n, _device.HEAD + len(self.spec.names)), dtype))
        self.rows_of = [self.out[k] for k in range(n)]  # each group's row, sliced once
        self.hyper = up(np.zeros((n, max(1, self.spec.slots))))
        self.no_partials = up(np.zeros(1, dtype))  # the reduction's place in a step with no norm
        self.no_scaler = (up(np.ones(1, np.float32)), up(np.zeros(1, np.float32)))  # loss scale 1, no inf
        self.lr_keys, self.table, self.lr_rows = None, None, None
        self.c = [None] * n
        self.stale = False  # the device's counts and status are newer than the host's
        self.norm_ran = False

    def _upload(self, host):
        from numba import cuda
        return cuda.to_device(host, stream=self.stream)

    def push_status(self, opt):
        # no norm yet (None) as -1: a norm is never negative, and NaN is one (NaN gradients)
        status = np.array([-1.0 if opt._last_grad_norm is None else opt._last_grad_norm,
                           float(opt._last_step_skipped), float(opt._skipped_steps)])
        self.status.copy_to_device(status, stream=self.stream)

    def pull(self, opt):
        """The device's step counts and status into the plans and ``opt`` (one sync)."""
        steps = self.steps.copy_to_host(stream=self.stream)
        restarts = self.restarts.copy_to_host(stream=self.stream)
        status = self.status.copy_to_host(stream=self.stream)
        if hasattr(self.stream, "synchronize"):  # not the simulator's 0
            self.stream.synchronize()
        for plan, t, r in zip(opt._plans, steps, restarts):
            plan.step, plan.restart = int(t), bool(r)
        if self.norm_ran:
            norm = float(status[_device.NORM])
            opt._last_grad_norm = None if norm < 0 else norm  # (NaN < 0 is False: a NaN norm stays)
        opt._last_step_skipped = bool(status[_device.SKIPPED])
        opt._skipped_steps = int(status[_device.SKIPS])
        self.stale = False

    def refresh(self, opt):
        """Upload what the host changed: a group's constants and hyper slots after an edit,
        the lr rows after a new lr (a number is one constant row)."""
        dtype = opt._params[0].dtype
        if any(c is None or p.constants is None for c, p in zip(self.c, opt._plans)):
            for k, plan in enumerate(opt._plans):
                if plan.constants is None:
                    plan.constants = opt.rule.kernel_constants(plan.group, dtype)
                # the update reads only the constant tail: the per-step head comes from its row
                self.c[k] = opt.rule.kernel_scalars(plan.group, 1, 0.0, dtype, 1.0, plan.constants)
            hyper = np.zeros((len(opt._plans), max(1, self.spec.slots)))
            for k, plan in enumerate(opt._plans):
                hyper[k, :self.spec.slots] = self.spec.hyper_row(plan.group)
            self.hyper.copy_to_device(hyper, stream=self.stream)
        keys = [g["lr"] for g in opt.param_groups]
        if self.lr_keys is None or any(a is not b and a != b for a, b in zip(keys, self.lr_keys)):
            table, spans = [], []
            for k, lr in enumerate(keys):
                if not callable(lr) and not 0 <= lr < math.inf:
                    raise ValueError(f"param group {k}: the learning rate is {lr}")
                if _host_only(lr):  # set after construction (capturable)
                    raise ValueError(f"param group {k}: lr is a callable that only the host can evaluate; "
                                     "capturable=True needs a number or a fastopt.schedules schedule")
                rows = lr.rows if callable(lr) else [(0, 0, schedules.CONSTANT, lr, 0.0, 0.0)]
                spans.append((len(table), len(rows)))
                table += rows
            self.table = self._upload(np.array(table, np.float64).reshape(-1, 6))
            self.lr_rows = self._upload(np.array(spans, np.int64))
            self.lr_keys = keys

    def step(self, opt, norms, guard, grads, grad_scale, scaler=None):
        """Launch one step: the reduction (``norms``, or None), the prologue, the updates;
        ``scaler``: an AMP scaler's ``(loss_scale, found_inf)`` CUDA arrays, or None.
        Returns the number of update launches."""
        self.refresh(opt)
        # the scaler's arrays, or the constants (scale 1, no inf) for those not given; a host
        # array is copied to the device (a CUDA one is read where it is)
        loss_scale, found_inf = (
            default if a is None else _dispatch.device_views([_to_device(a)])[0]
            for a, default in zip(scaler or (None, None), self.no_scaler))
        partials = norms.device_partials(2.0) if norms is not None else None
        if partials is None:  # no norm, or the norm of no elements: 0
            totals = checks = self.no_partials
            mode, p = SQUARES, 2.0
        else:
            totals, checks, mode, p = partials
        clip = opt.max_grad_norm is not None
        _device.launch_prologue(self.rule, self.stream, totals, checks, mode, p,
                                norms is not None, guard, guard, clip, float(opt.max_grad_norm or 0.0),
                                float(grad_scale), loss_scale, found_inf, self.status, self.steps, self.restarts,
                                self.hyper, self.table, self.lr_rows, self.out)
        launches = 0
        for k, plan in enumerate(opt._plans):
            d, c = self.rows_of[k], self.c[k]
            if plan.flat is not None:
                arrays = plan.flat
            else:
                arrays = [[p, _formats.kernel_view(g.reshape(g.size)), *states]
                          for (p, *states), g in zip(plan.tensors, grads.arrays(plan.group))]
            for a in arrays:
                _device.launch_update(self.rule, a, c, d, self.stream)
            launches += len(arrays)
        self.stale, self.norm_ran = True, self.norm_ran or norms is not None
        return launches


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
            self._typed[id(group)] = List([_formats.kernel_view(g.reshape(-1)) for g in self._by_group[id(group)]])
        return self._typed[id(group)]


def _one_element(name, a):
    """An AMP scaler's value: a one-element array (kept as it is: CUDA ones are read on the
    device), or None; refused otherwise, naming ``name``."""
    if a is None:
        return None
    size = a.numel() if callable(getattr(a, "numel", None)) else getattr(a, "size", None)
    if size != 1 or not hasattr(a, "dtype"):
        raise ValueError(f"{name} must be a one-element array (as GradScaler's), got {type(a).__name__} "
                         f"of size {size}")
    return a


def _to_device(a):
    if isinstance(a, np.ndarray):
        from numba import cuda
        return cuda.to_device(np.ascontiguousarray(a.reshape(1)))
    return a


def _host_value(a):
    """The one value of a one-element array (NumPy, CUDA, torch), as a float."""
    if isinstance(a, np.ndarray):
        return float(a.reshape(-1)[0])
    if hasattr(a, "item"):  # torch (a sync for a CUDA tensor), CuPy
        return float(a.item())
    return float(a.copy_to_host().reshape(-1)[0])  # a Numba device array


def check_disjoint(params):
    """No param may appear twice or share memory with another (n log n: a model may hold
    thousands)."""
    seen = {}
    for i, a in enumerate(params):
        if id(a) in seen:
            raise ValueError(f"params[{i}] appears more than once among the params (it is params[{seen[id(a)]}])")
        seen[id(a)] = i
    _dispatch.check_no_overlap([_dispatch._Array(f"params[{i}]", a) for i, a in enumerate(params)])


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


def _host_only(lr):
    """Whether ``lr`` is a callable only the host can evaluate (not a schedule with device rows)."""
    return callable(lr) and getattr(lr, "rows", None) is None


def _lr_at(lr, t):
    return float(lr(t)) if callable(lr) else lr


def _is_array(x):
    if isinstance(x, np.ndarray) or _dispatch.is_torch(x):  # a torch tensor that requires grad raises on
        return hasattr(x, "shape")                           # __cuda_array_interface__: do not ask it
    return hasattr(x, "__cuda_array_interface__") or hasattr(x, "copy_to_host")


def _constructor(rule):
    """``__init__(self, params, <torch's positional hyper-parameters>, *, <keyword ones>,
    max_grad_norm=None, nonfinite="skip")`` for ``rule``, from its declaration."""
    P = inspect.Parameter
    params = [P("self", P.POSITIONAL_OR_KEYWORD), P("params", P.POSITIONAL_OR_KEYWORD)]
    params += [P(n, P.KEYWORD_ONLY if h.keyword else P.POSITIONAL_OR_KEYWORD, default=h.default)
               for n, h in rule.hyper.items()]
    params += [P(n, P.KEYWORD_ONLY, default=d) for n, d in OPTIONS.items()]
    params.sort(key=lambda p: p.kind)  # keyword-only after the positional ones, in declared order
    signature = inspect.Signature(params)

    def __init__(self, *args, **kwargs):
        bound = signature.bind(self, *args, **kwargs)
        bound.apply_defaults()
        a = bound.arguments
        hyper = {n: tuple(a[n]) if isinstance(h.default, tuple) and isinstance(a[n], list) else a[n]
                 for n, h in rule.hyper.items()}
        Optimizer.__init__(self, a["params"], hyper, **{n: a[n] for n in OPTIONS})

    __init__.__signature__ = signature
    __init__.__qualname__ = f"{rule.name}.__init__"
    return __init__


class _Group(dict):
    """A param group: a dict, as torch's. Editing any hyper-parameter but ``lr`` (which each
    step reads and checks anyway) flags the optimizer to re-check every group, and to start
    or refuse the state a new option needs, before its next step. Edits take the optimizer's
    lock, so none lands in the middle of a step; a group's params cannot be replaced."""

    def __init__(self, optimizer, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._edited, self._lock = optimizer._edited, optimizer.lock

    def _flag(self):
        edited = getattr(self, "_edited", None)  # unpickling sets items before attributes
        if edited is not None:
            edited[0] = True

    def __setitem__(self, key, value):
        if key == "params" and getattr(self, "_lock", None) is not None:
            raise ValueError("a param group's params cannot be replaced: the state is laid out for them "
                             "(build a new optimizer, or add a group with add_param_group)")
        lock = getattr(self, "_lock", None)
        with lock if lock is not None else contextlib.nullcontext():
            super().__setitem__(key, value)
            if key != "lr":
                self._flag()

    def _flagging(name):
        def method(self, *args, **kwargs):
            with self._lock:
                out = getattr(dict, name)(self, *args, **kwargs)
                self._flag()
                return out
        method.__name__ = name
        return method

    __delitem__, __ior__, update, setdefault, pop, popitem, clear = map(
        _flagging, ("__delitem__", "__ior__", "update", "setdefault", "pop", "popitem", "clear"))
    del _flagging


class _GroupList(list):
    """``optimizer.param_groups``: a group may be replaced by a dict holding the same params
    (re-checked before the next step, as an edit); groups are added with ``add_param_group``."""

    def __init__(self, edited, lock):
        super().__init__()
        self._edited, self._lock = edited, lock

    def __setitem__(self, k, group):
        if isinstance(k, slice):  # it could drop or add groups
            raise TypeError("param_groups[i:j] = ...: replace one group at a time; add groups with "
                            "add_param_group; a group, once added, stays (the state is laid out for its params)")
        with self._lock:  # not in the middle of a step, as a group's own edits
            super().__setitem__(k, group)
            self._edited[0] = True

    def _refused(name):
        def method(self, *args, **kwargs):
            raise TypeError(f"param_groups.{name}: add groups with add_param_group; a group, once "
                            "added, stays (the state is laid out for its params)")
        method.__name__ = name
        return method

    append, extend, insert, remove, pop, clear, sort, reverse, __delitem__, __iadd__ = map(
        _refused, ("append", "extend", "insert", "remove", "pop", "clear", "sort", "reverse", "__delitem__",
                   "__iadd__"))
    del _refused


def _group_meta(group):
    out = {}
    for k, v in group.items():
        if k == "params":
            out[k] = len(v)
        elif callable(v):
            out[k] = None  # a schedule is code: the step count restores its value
        elif isinstance(v, tuple):
            out[k] = [x.item() if isinstance(x, np.generic) else x for x in v]
        else:
            out[k] = v.item() if isinstance(v, np.generic) else v  # JSON takes Python numbers
    return out


def _as_value_error(check, *args):
    """Run ``check``; a load reports a wrongly typed value as every other mismatch: ValueError."""
    try:
        check(*args)
    except TypeError as e:
        raise ValueError(str(e)) from None


_is_real = _args.is_real  # a real number, not a bool


def _type_problem(key, value, default):
    """Why ``value`` cannot stand where the class defaults to ``default`` (None if it can):
    the functional rules' check, and an lr may be a callable (a schedule)."""
    return None if key == "lr" and callable(value) else _args.type_problem(key, value, default)


def _running_value(value, where):
    """A state dict's running value (a float, a one-element tensor), or None when absent."""
    if value is None:
        return None
    value = _from_torch_value(value)
    if not isinstance(value, numbers.Real) or isinstance(value, bool) or not math.isfinite(value):
        raise ValueError(f"{where} must be a finite number, got {value!r}")
    return float(value)


def _step_count(value, where):
    """A state dict's step count as an int: a non-negative integral number (a float or a
    0-d tensor, as torch keeps it), or a ValueError naming ``where``."""
    value = _from_torch_value(value)
    if isinstance(value, np.ndarray) and value.ndim == 0:
        value = value.item()
    if not _is_real(value) or not math.isfinite(value) or value < 0 or value != int(value) or value > MAX_STEPS:
        raise ValueError(f"{where} is {value!r}: a step count is a whole number from 0 to 2**53")
    return int(value)


def _state_array(value, param, where, dtype):
    """A state array from a state dict, checked and converted to ``dtype`` (flat)."""
    value = np.asarray(_from_torch_value(value))
    if value.dtype.kind not in "fiu" and value.dtype not in _formats.FLOATS:
        raise ValueError(f"{where} has dtype {value.dtype}: a state array holds real numbers")
    if value.shape != tuple(param.shape):
        raise ValueError(f"{where} has shape {value.shape}, the param {tuple(param.shape)}")
    return value.reshape(-1).astype(dtype)
