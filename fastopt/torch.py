"""Every fastopt rule as a drop-in ``torch.optim`` optimizer (needs torch; ``import fastopt``
alone never imports it)::

    from fastopt.torch import AdamW                  # was: from torch.optim import AdamW
    opt = AdamW(model.parameters(), lr=1e-3)         # torch's arguments and defaults
    loss.backward(); opt.step(); opt.zero_grad()     # the loop does not change

Each class (``SGD, Adagrad, RMSprop, Adam, AdamW, Adadelta, Adamax, NAdam, RAdam, Lion, LAMB,
LARS``) is a ``torch.optim.Optimizer`` built from its rule's declaration (``kernels/<rule>.py``):
torch's argument names and defaults, fastopt's options (``max_grad_norm``, ``nonfinite``,
``l1``, ...) and torch's ``foreach`` / ``fused`` (accepted, no effect: the step is always
fused; ``capturable`` and ``differentiable`` must stay False). ``nonfinite`` defaults to
``"propagate"`` here, torch's behaviour (and no check pass); ``nonfinite="skip"`` skips a
step whose gradients hold inf or NaN (``last_step_skipped``, ``skipped_steps``).

The arena. At construction the parameters of each (device, dtype) move into one flat arena
(``param.data`` becomes a view of it), with a twin arena for the gradients. A step is one
fused launch per param group (fastopt's :class:`~fastopt.Optimizer` over a ParamBuffer,
reading the grad arena). How gradients get there, and what the arena changes:

* ``zero_grad()`` (``set_to_none=True``, torch's default) sets every ``.grad`` to None; a
  post-accumulate-grad hook per param copies each new gradient into the grad arena as
  autograd makes it and makes ``.grad`` the arena's view, so later micro-batches accumulate
  into it in place. ``zero_grad(set_to_none=False)`` zeroes the grad arena in one pass (a
  ``.grad`` that is None stays None, as in torch). ``.grad`` is the arena's view at every
  step: a reference kept to it sees the next step's gradient (``.clone()`` one to keep it).
  A ``.grad`` that is not the arena's view at the step (a user's own tensor, a
  ``create_graph`` gradient) is copied in then. A param whose ``.grad`` is None at the step
  is skipped, as torch skips it (see the README's "From PyTorch" section); when every
  ``.grad`` is None the step does nothing, as torch.
* ``model.to(...)``, ``model.half()``, ``param.data = ...``: the param no longer lives in the
  arena; the next step raises :class:`ArenaError` instead of updating memory nobody reads.
* Params with ``requires_grad=False`` stay out of the arena and are never updated (a grad
  appearing on one later raises :class:`ArenaError`); a tied parameter is one param, updated
  once; two parameters sharing memory are refused.
* A sparse gradient (``nn.Embedding(sparse=True)``) raises :class:`SparseGradientError`.

Works with ``torch.optim.lr_scheduler`` (``lr`` and every other hyper-parameter are read from
``param_groups`` at each step), ``step(closure)``, ``state_dict()`` / ``load_state_dict()``
in torch.optim's layout (interchangeable with the same torch rule both ways, ``torch.save`` /
``torch.load(weights_only=True)``), ``add_param_group`` (also after steps: the arenas are
rebuilt and the state kept), step pre/post hooks and ``torch.amp.GradScaler``: the optimizer
takes the scaler's ``grad_scale`` and ``found_inf`` like torch's fused kernels, the unscale
folded into the kernel's gradient factor and an inf step skipped with no write (on CUDA both
read on the device: no sync per step).
"""
import functools
import inspect
import itertools
import math
import operator
import sys
import warnings
import weakref
from collections.abc import Mapping

import numpy as np
import torch

from .buffer import _BUFFERS, ParamBuffer, _copy_in, _to_host, layout
from .kernels._dispatch import SUPPORTED_DTYPES, as_kernel_array
from .optimizers import OPTIMIZERS as _OPTIMIZERS

__all__ = ["LAMB", "LARS", "SGD", "Adadelta", "Adagrad", "Adam", "AdamW", "Adamax", "ArenaError", "Lion", "NAdam",
           "RAdam", "RMSprop", "SparseGradientError"]

# torch's constructor arguments that select an implementation: accepted for a drop-in, and
# the values that ask for something fastopt does not do are refused
TORCH_NONFINITE = "propagate"  # the default of ``nonfinite`` here (fastopt's own classes: "skip")
_IMPLEMENTATION = {"foreach": None, "fused": None, "capturable": False, "differentiable": False}
_REFUSED = {"capturable": "CUDA-graph capture (step and lr on the device)",
            "differentiable": "autograd through the step"}


class ArenaError(RuntimeError):
    """A parameter no longer lives where its optimizer put it (``model.to(...)``, ``.data``
    reassigned, params sharing memory, a frozen param that got a gradient): the optimizer
    refuses to update memory the model does not read. Build the optimizer again after
    moving or converting the model."""


class SparseGradientError(RuntimeError):
    """A sparse gradient: fastopt's arenas are dense (use ``sparse=False`` embeddings, or a
    torch optimizer made for sparse gradients such as ``torch.optim.SparseAdam``)."""


def _numpy_dtype(dtype):
    """NumPy's twin of a torch dtype (the arenas are NumPy on the CPU): bfloat16 is
    ml_dtypes' (fastopt's), None where fastopt has none."""
    if dtype == torch.bfloat16:
        return next((d for d in SUPPORTED_DTYPES if d.name == "bfloat16"), None)
    try:
        return torch.empty((), dtype=dtype).numpy().dtype
    except TypeError:
        return None


def _as_torch(array, device):
    """A NumPy (CPU) or CUDA array as a torch tensor over the same memory; torch reads no
    ml_dtypes bfloat16, so such an array goes through its 16-bit pattern."""
    if device.type != "cpu":
        return torch.as_tensor(array, device=device)
    if array.dtype.name == "bfloat16":
        return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(array)


_UNSEEN = object()


def _plain(value):
    """A hyper-parameter as fastopt's checks take it: a 0-d tensor as a number, a list as a tuple."""
    if isinstance(value, torch.Tensor):
        return value.item()
    if isinstance(value, (list, tuple)):
        return tuple(_plain(v) for v in value)
    return value


def _changes_in_place(value):
    """Whether ``value`` can change while staying the same object: a tensor (a scheduler's
    ``fill_``), a list (``group["betas"][0] = 0.3``), or a tuple holding one."""
    return isinstance(value, (torch.Tensor, list)) or (isinstance(value, tuple) and any(map(_changes_in_place, value)))


def _span(p):
    """[first, last) byte addresses of a tensor's elements (empty for no elements)."""
    start = p.data_ptr()
    if p.numel() == 0:
        return start, start
    extent = 1 + sum((d - 1) * s for d, s in zip(p.shape, p.stride()))
    return start, start + extent * p.element_size()


class _CudaBuffer(ParamBuffer):
    """A ParamBuffer whose arenas are torch CUDA memory (seen by the kernels through
    ``__cuda_array_interface__``), so that no CuPy is needed and torch owns the memory."""

    def __init__(self, shapes, dtype, device):  # not super().__init__: it would allocate with CuPy
        self.dtype, self.device, self.shapes, self.names = _numpy_dtype(dtype), "cuda", list(shapes), None
        self.offsets, end = layout(self.shapes, self.dtype)
        self._index = {o: i for i, o in enumerate(self.offsets) if math.prod(self.shapes[i])}
        pad = 64 // self.dtype.itemsize
        self.torch_arenas = []
        for _ in range(2):
            raw = torch.zeros(end + pad, dtype=dtype, device=device)
            skip = (-raw.data_ptr() % 64) // self.dtype.itemsize
            self.torch_arenas.append(raw[skip:skip + end])
        self.arena, self.grad_arena = (as_kernel_array(t) for t in self.torch_arenas)
        self.params, self.grads = self._views(self.arena), self._views(self.grad_arena)
        _BUFFERS.add(self)

    def zero_grad(self):
        self.torch_arenas[1].zero_()


class _Arena:
    """The params of one (device, dtype): their ParamBuffer, the torch views the params and
    grads became, and the fastopt optimizer stepping them (one param group per torch group
    that has params here)."""

    def __init__(self, owner, device, dtype, members):
        self.members = members  # [(torch group index, param, name, torch index)]
        shapes = [tuple(p.shape) for _, p, _, _ in members]
        if device.type == "cpu":
            self.buffer = ParamBuffer(shapes=shapes, dtype=_numpy_dtype(dtype), device="cpu")
            arena, grad_arena = _as_torch(self.buffer.arena, device), _as_torch(self.buffer.grad_arena, device)
        elif device.type == "cuda":
            self.buffer = _CudaBuffer(shapes, dtype, device)
            arena, grad_arena = self.buffer.torch_arenas
        else:
            raise TypeError(f"params on {device} are not supported: fastopt runs on CPU and CUDA tensors")
        self.grad_arena = grad_arena
        self.params, self.grads, self.ptrs = [], [], []
        with torch.no_grad():
            for (_, p, _, _), o, shape in zip(members, self.buffer.offsets, shapes):
                n = math.prod(shape)
                view, grad = arena[o:o + n].view(shape), grad_arena[o:o + n].view(shape)
                view.copy_(p)
                had_grad = p.grad is not None
                if had_grad:
                    if p.grad.is_sparse:
                        grad.copy_(p.grad.to_dense())
                    else:
                        grad.copy_(p.grad)
                p.data = view  # the model's parameter now lives in the arena
                if had_grad:  # autograd accumulates into the grad arena from now on
                    p.grad = grad
                # else .grad stays None, as torch's (a param no backward reaches is not stepped):
                # its first gradient is copied into the arena by the hook below
                self.params.append(p)
                self.grads.append(grad)
                self.ptrs.append(p.data_ptr())
        groups, self.group_of = [], {}  # torch group index -> index of its group here
        for k in sorted({k for k, *_ in members}):
            views = [v for (j, *_), v in zip(members, self.buffer.params) if j == k]
            self.group_of[k] = len(groups)
            groups.append({"params": views, **{n: _plain(owner.param_groups[k][n]) for n in owner._rule.hyper}})
        self.inner = owner._fastopt_class(groups, **owner._extras)
        self.owner = weakref.ref(owner)
        self.device = device
        self.seen = [{} for _ in groups]  # per fastopt group: the torch group's values it last took
        self.seen_values = [None] * len(groups)  # the same values as one tuple, in the rule's order
        self.tensor_valued = [False] * len(groups)  # whether any of them is (or holds) a tensor
        self.index = [t for *_, t in members]  # fastopt's param index -> torch's state-dict index
        self.absent = []  # the params whose .grad was None at this step (skipped)

    def step_with_absent(self, **scaler):
        """The fastopt step of this arena, the params with no gradient (``absent``) and their
        state left as they were (a copy of each, written back)."""
        if self.inner.arenas is None:  # the first step: its state starts (at zero) before the snapshot
            with self.inner.lock:
                self.inner._allocate()
        saved = [(x, _to_host(x)) for i in self.absent for x in self.inner.storage_views(i)]
        saved += [(self.params[i], self.params[i].detach().clone()) for i in self.absent]
        try:
            self.inner.step(**scaler)
        finally:
            self.absent = []
            with torch.no_grad():
                for x, before in saved:
                    if isinstance(x, torch.Tensor):
                        x.copy_(before)
                    else:  # a NumPy, CuPy or Numba CUDA view of a state arena
                        _copy_in(x, 0, before)

    def _position(self, p):
        return next(i for i, q in enumerate(self.params) if q is p)  # list.index would compare tensors

    def gather(self, names):
        """Check that every param still lives in the arena and bring in the gradients that
        are not the arena's views. Returns how many params have a gradient."""
        params = self.params
        if list(map(_data_ptr, params)) == self.ptrs and all(map(operator.is_, map(_grad_of, params), self.grads)):
            return len(params)  # the hot path: every param in place, every gradient the arena's view
        live, absent = 0, []  # set only when every param passed: a refused step leaves no stale list
        for i, (p, ptr, view) in enumerate(zip(self.params, self.ptrs, self.grads)):
            if p.data_ptr() != ptr:
                other = _owner(p)
                if other is not None and other is not self.owner():
                    raise ArenaError(f"param {names(self, i)} was moved into the arena of a fastopt.torch "
                                     f"{type(other).__name__} built after this optimizer: a param lives in one "
                                     "optimizer's arena (param groups give params their own hyper-parameters)")
                raise ArenaError(
                    f"param {names(self, self._position(p))} no longer lives in the optimizer's arena "
                    "(model.to(...), .half(), .data reassigned, or another fastopt.torch optimizer built over it): "
                    "build the optimizer again after moving or converting the model; give a param to one optimizer")
            g = p.grad
            if g is view:
                live += 1
            elif g is None:  # skipped, as torch skips it: the step restores what it would change
                view.zero_()
                absent.append(i)
            elif g.is_sparse:
                raise SparseGradientError(f"param {names(self, self._position(p))} has a sparse gradient: "
                                          f"{SparseGradientError.__doc__}")
            else:  # a gradient the user (or set_to_none) replaced: copied in, one more pass
                with torch.no_grad():  # a create_graph gradient must not make the arena part of a graph
                    view.copy_(g)
                live += 1
        self.absent = absent
        return live


_data_ptr, _grad_of = torch.Tensor.data_ptr, operator.attrgetter("grad")
# id(param) -> (the param, the optimizer whose arena holds it (weak references), its address there);
# keyed by id: a tensor's == is element-wise, so a tensor cannot be a dictionary key
_OWNERS = {}


def _owner(p):
    """The fastopt.torch optimizer whose arena ``p`` lives in (None: none alive)."""
    param, owner, ptr = _OWNERS.get(id(p), (None, None, None))
    owner = owner() if param is not None and param() is p else None
    return owner if owner is not None and p.data_ptr() == ptr else None


def _disown(key, _ref):
    _OWNERS.pop(key, None)


def _remove_all(handles):
    for h in handles:
        h.remove()
    handles.clear()


def _no_sparse(name):
    """A gradient hook: a sparse gradient would be summed into the dense grad arena unseen."""
    def hook(grad):
        if grad.is_sparse:
            raise SparseGradientError(f"param {name} got a sparse gradient: {SparseGradientError.__doc__}")
    return hook


def _into_arena(view, name):
    """A post-accumulate-grad hook: a gradient autograd just made (``.grad`` was None) is
    copied into the param's arena view while it is still in cache, and ``.grad`` becomes the
    view; one already accumulated into the view is left. A sparse gradient is refused; a
    ``create_graph`` gradient (it has a graph) stays as it is and the step copies it in."""
    def hook(p):
        g = p.grad
        if g is view or g is None:  # None: a hook before this one took it (an optimizer step in backward)
            return
        if g.is_sparse:
            raise SparseGradientError(f"param {name} got a sparse gradient: {SparseGradientError.__doc__}")
        if not g.requires_grad:
            view.copy_(g)
            p.grad = view
    return hook


def _on(tensor, device):
    """``tensor`` (or None) on ``device``: GradScaler's values live on the scaler's device."""
    return tensor if tensor is None or tensor.device == device else tensor.to(device, non_blocking=True)


class _TorchOptimizer(torch.optim.Optimizer):
    """The base of every class here; a subclass names its ``_fastopt_class`` (see the module docstring)."""

    _fastopt_class = None
    _torch_class = None
    # GradScaler sets ``grad_scale`` and ``found_inf`` on the optimizer instead of unscaling
    _step_supports_amp_scaling = True

    def __init__(self, params, defaults, extras, implementation):
        for key, value in implementation.items():
            if value and key in _REFUSED:
                raise ValueError(f"{key}=True is not supported by fastopt.torch ({_REFUSED[key]}): pass False")
        self._rule = self._fastopt_class.rule
        names = tuple(self._rule.hyper)  # a group's hyper-parameter values as one tuple, read in C
        self._hyper_values = operator.itemgetter(*names) if len(names) > 1 else lambda g: (g[names[0]],)
        self._extras = extras
        self._arenas = None
        self._hooks = []  # the sparse-gradient hooks on the params: removed with the optimizer
        weakref.finalize(self, _remove_all, self._hooks)
        # skipped steps (GradScaler's inf steps and the guard's): those counted here (read per
        # step when there are several arenas; earlier arenas' counts), plus, with one arena, its
        # own count read only when asked (on CUDA a device value: no sync per step)
        self._skips_counted, self._lazy_skips = 0, None  # the latter: (the arena, its count at the start)
        self._last_skipped = False  # the last step's, or None: ask the one arena
        self._warned_none = False
        self._state_version, self._state_view = 0, None  # ``state``, rebuilt when a step or a load changed it
        # the groups hold torch's implementation keys too, as torch's do (fixed values: AdamW's decoupling)
        super().__init__(params, {**defaults, **implementation})
        self._build()

    # -- the arenas -----------------------------------------------------------------------
    def _build(self):
        """Lay every trainable param out in the arenas (again after add_param_group)."""
        _remove_all(self._hooks)
        self._frozen, members = [], {}
        index, seen, start = {}, set(), 0
        for k, group in enumerate(self.param_groups):
            names = group.get("param_names")
            for j, p in enumerate(group["params"]):
                index.setdefault(id(p), start + j)  # torch's state-dict numbering
                if id(p) in seen:
                    continue
                seen.add(id(p))
                name = repr(names[j]) if names else f"{index[id(p)]} (group {k}, shape {tuple(p.shape)})"
                if not p.requires_grad:
                    self._frozen.append((p, name))
                    continue
                if p.is_sparse or p.layout != torch.strided:
                    raise TypeError(f"param {name} has layout {p.layout}: fastopt updates dense (strided) tensors")
                if _numpy_dtype(p.dtype) is None or _numpy_dtype(p.dtype) not in SUPPORTED_DTYPES:  # None == float64
                    raise TypeError(f"param {name} has dtype {p.dtype}; fastopt.torch supports "
                                    f"{', '.join(str(d) for d in SUPPORTED_DTYPES)}")
                members.setdefault((p.device, p.dtype), []).append((k, p, name, index[id(p)]))
            start += len(group["params"])
        spans = sorted((*_span(p), name) for ms in members.values() for _, p, name, _ in ms if p.numel())
        for (_, end, a), (start_b, _, b) in itertools.pairwise(spans):
            if start_b < end:
                raise ArenaError(f"params {a} and {b} share memory: moved into an arena they would be untied "
                                 "(tie them as one Parameter, or give the optimizer one of them)")
        if self._extras.get("max_grad_norm") is not None and len(members) > 1:
            raise ValueError("max_grad_norm clips the global norm over one arena: the params span "
                             f"{len(members)} (device, dtype) pairs; clip with torch.nn.utils.clip_grad_norm_")
        self._group_params = [g["params"] for g in self.param_groups]
        if self._lazy_skips is not None:  # the arenas are rebuilt: their counts so far are kept here
            self._skips_counted, self._last_skipped = self.skipped_steps, self.last_step_skipped
        self._arenas = [_Arena(self, device, dtype, ms) for (device, dtype), ms in members.items()]
        one = self._arenas[0] if len(self._arenas) == 1 else None
        self._lazy_skips = (one, one.inner.skipped_steps) if one is not None else None
        for arena in self._arenas:
            for p, view, (*_, name, _) in zip(arena.params, arena.grads, arena.members):
                self._hooks.append(p.register_post_accumulate_grad_hook(_into_arena(view, name)))
                self._hooks.append(p.register_hook(_no_sparse(name)))
        me = weakref.ref(self)
        for arena in self._arenas:
            for p, ptr in zip(arena.params, arena.ptrs):
                _OWNERS[id(p)] = (weakref.ref(p, functools.partial(_disown, id(p))), me, ptr)
        self._state_version += 1
        self._names = {id(a): [name for _, _, name, _ in a.members] for a in self._arenas}
        self._trainable = sum(len(a.params) for a in self._arenas)

    def _name(self, arena, i):
        return self._names[id(arena)][i]

    def _check_structure(self):
        groups, kept = self.param_groups, self._group_params
        if len(groups) != len(kept) or not all(map(operator.is_, [g["params"] for g in groups], kept)):
            raise ArenaError("param_groups were changed by hand (a group or its params replaced): the arenas "
                             "are laid out for the params given; add params with add_param_group")
        for p, name in self._frozen:
            if p.grad is not None:
                raise ArenaError(f"param {name} had requires_grad=False when the optimizer was built and has a "
                                 "gradient now: build the optimizer again to train it")

    def _sync(self):
        """Bring each torch group's hyper-parameters (an LR scheduler's edits, any user edit)
        into the fastopt groups; fastopt re-checks an edited group before it steps. A value
        still the same object as at the last step is skipped unread (the hot path)."""
        keys, values_of = self._rule.hyper, self._hyper_values
        for arena in self._arenas:
            inner_groups = arena.inner.param_groups
            for k, j in arena.group_of.items():
                group = self.param_groups[k]
                values, last = values_of(group), arena.seen_values[j]
                if last is not None and not arena.tensor_valued[j] and all(map(operator.is_, values, last)):
                    continue  # every value the same object as at the last step: nothing to read
                arena.seen_values[j] = values
                # a tensor (lr=torch.tensor(...)) or a list changes in place: read every step
                arena.tensor_valued[j] = any(map(_changes_in_place, values))
                mine, seen = inner_groups[j], arena.seen[j]
                for key in keys:
                    value = group[key]
                    if value is seen.get(key, _UNSEEN) and not arena.tensor_valued[j]:
                        continue
                    seen[key] = value
                    value = _plain(value)
                    if mine[key] != value:
                        mine[key] = value  # an lr edit is read as it is; any other edit flags a re-check

    # -- the step -------------------------------------------------------------------------
    def step(self, closure=None):
        """One update: one fused launch per param group and arena. ``closure``: re-evaluates
        the model and returns the loss (run with grad enabled), as in torch."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._check_structure()
        live = 0
        for arena in self._arenas:
            live += arena.gather(self._name)
        if not live and self._arenas:
            for arena in self._arenas:
                arena.absent = []  # nothing stepped: nothing to write back at a later step
            return loss  # no param has a gradient: torch changes nothing either
        if live < self._trainable and not self._warned_none:
            self._warned_none = True
            warnings.warn("some params have .grad None: skipped, as torch.optim skips them, but the step count of "
                          "their param group still advances (torch counts per param: Adam's bias correction of a "
                          "param skipped at some steps differs)", RuntimeWarning, stacklevel=3)
        # set by GradScaler.step for this call: the loss scale (None: the grads were unscaled
        # already) and the inf flag, one-element tensors that the kernels read (on CUDA, the
        # device does: the host never waits for them)
        found_inf = getattr(self, "found_inf", None)
        loss_scale = getattr(self, "grad_scale", None) if found_inf is not None else None
        self._sync()
        self._state_version += 1
        for arena in self._arenas:
            step = arena.step_with_absent if arena.absent else arena.inner.step
            if found_inf is None:
                step()
            else:
                step(loss_scale=_on(loss_scale, arena.device), found_inf=_on(found_inf, arena.device))
        if self._lazy_skips is not None:
            self._last_skipped = None  # the one arena's guard says, when asked
        else:  # a step is skipped when the guard (nonfinite="skip") of any arena skipped it
            self._last_skipped = any(arena.inner.last_step_skipped for arena in self._arenas)
            self._skips_counted += self._last_skipped
        return loss

    @property
    def skipped_steps(self):
        """Steps skipped for an inf or NaN: found by GradScaler, or by the guard
        (``nonfinite="skip"``). With all params in one arena, a CUDA one's guard decided on
        the device, this reads the device's count (a sync) only here, never in ``step``."""
        if self._lazy_skips is None:
            return self._skips_counted
        arena, start = self._lazy_skips
        return self._skips_counted + arena.inner.skipped_steps - start

    @property
    def last_step_skipped(self):
        """Whether the last step was skipped (see :attr:`skipped_steps`)."""
        if self._last_skipped is None:
            return self._lazy_skips[0].inner.last_step_skipped
        return self._last_skipped

    def zero_grad(self, set_to_none=True):
        """As torch's. ``set_to_none=True`` (the default): every ``.grad`` becomes None, no
        pass over memory; the next backward's gradients are copied into the grad arena as
        autograd makes them (a post-accumulate-grad hook per param). ``set_to_none=False``:
        one pass zeroing each grad arena, every ``.grad`` the arena's view, which autograd
        then accumulates into in place."""
        if set_to_none:
            for group in self.param_groups:
                for p in group["params"]:
                    p.grad = None
            return
        for arena in self._arenas:
            arena.grad_arena.zero_()
            for p, view in zip(arena.params, arena.grads):
                if p.grad is not view and p.grad is not None:  # None stays None, as in torch
                    p.grad = view
        for p, _ in self._frozen:
            if p.grad is not None:
                p.grad = None

    # -- groups ---------------------------------------------------------------------------
    def add_param_group(self, param_group):
        """As torch's; after the constructor the arenas are rebuilt around the new params and
        the state of the others is kept."""
        if getattr(self, "_arenas", None) is None:  # torch's constructor adding the first groups
            return super().add_param_group(param_group)
        saved = self.state_dict()
        super().add_param_group(param_group)
        new = self.param_groups[-1]
        first = sum(len(g["params"]) for g in self.param_groups[:-1])
        saved["param_groups"].append({**{k: v for k, v in new.items() if k != "params"},
                                      "params": list(range(first, first + len(new["params"])))})
        self._build()
        self.load_state_dict(saved)

    # -- state ----------------------------------------------------------------------------
    @property
    def state(self):
        """Per param, its state as torch names it: live views of the state arenas and the
        step count (read-only here: load a state dict to change it, or assign an empty dict
        to start the state afresh, as ``opt.state = defaultdict(dict)`` does in torch)."""
        view = self._state_view
        if view is None or view.version != self._state_version:
            view = self._state_view = _StateView(self)
        return view

    @state.setter
    def state(self, value):
        if getattr(self, "_arenas", None) is None:
            return  # torch's constructor assigns an empty dict; the arenas hold the state
        if not isinstance(value, Mapping) or len(value):
            raise TypeError("optimizer.state is the arenas' state: assign an empty dict to start it afresh, or "
                            "load a state dict (load_state_dict) to set it")
        for arena in self._arenas:  # every param back at step 0 with zero state, as a new optimizer
            inner = arena.inner
            with inner.lock:
                inner.restore([dict(g) for g in inner.param_groups], [0] * len(inner.param_groups), {})
        self._state_version += 1

    def state_dict(self):
        """torch.optim's layout (``state`` keyed by torch's param numbering, ``param_groups``
        with this object's hyper-parameters): loads into the same ``torch.optim`` rule and back.
        The arrays are copies, as of now."""
        for hook in self._optimizer_state_dict_pre_hooks.values():
            hook(self)
        state = {}
        for arena in self._arenas:
            for i, entry in arena.inner.state_dict(torch=True)["state"].items():
                state[arena.index[i]] = {k: v.to(arena.params[i].device) if k != "step" else v
                                         for k, v in entry.items()}
        groups, numbering, start = [], {}, 0
        for group in self.param_groups:
            packed = {k: v for k, v in group.items() if k != "params"}
            for j, p in enumerate(group["params"], start):
                numbering.setdefault(id(p), j)
            packed["params"] = [numbering[id(p)] for p in group["params"]]
            start += len(group["params"])
            groups.append(packed)
        out = {"state": state, "param_groups": groups}
        for hook in self._optimizer_state_dict_post_hooks.values():
            result = hook(self, out)
            if result is not None:
                out = result
        return out

    def load_state_dict(self, state_dict):
        """Load a state dict of this rule (this class's or ``torch.optim``'s): everything is
        checked, in every arena, before anything is written."""
        for hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = hook(self, state_dict)
            if result is not None:
                state_dict = result
        if not isinstance(state_dict, Mapping) or not {"state", "param_groups"} <= set(state_dict):
            raise ValueError("a state dict is a mapping with 'state' and 'param_groups'")
        saved_groups, state = list(state_dict["param_groups"]), state_dict["state"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(f"the state dict has {len(saved_groups)} param groups, this optimizer "
                             f"{len(self.param_groups)}")
        to_saved = {}  # torch index of our param -> its index in the state dict
        for k, (saved, group) in enumerate(zip(saved_groups, self.param_groups)):
            if len(saved["params"]) != len(group["params"]):
                raise ValueError(f"param group {k} has {len(saved['params'])} params in the state dict, "
                                 f"{len(group['params'])} here")
        numbering, start = {}, 0
        for saved, group in zip(saved_groups, self.param_groups):
            for j, (p, s) in enumerate(zip(group["params"], saved["params"]), start):
                numbering.setdefault(id(p), j)
                to_saved.setdefault(numbering[id(p)], s)
            start += len(group["params"])
        checked = []
        for arena in self._arenas:
            groups = [{**saved_groups[k], "params": [None] * sum(1 for j, *_ in arena.members if j == k)}
                      for k in arena.group_of]
            inner_state = {}
            for i, t in enumerate(arena.index):
                s = to_saved[t]
                entry = state.get(s, state.get(str(s)))
                if entry is not None:
                    inner_state[i] = entry
            order = iter(range(len(arena.index)))
            for g in groups:
                g["params"] = [next(order) for _ in g["params"]]
            checked.append(arena.inner._read_state_dict({"state": inner_state, "param_groups": groups}))
        for arena, values in zip(self._arenas, checked):
            arena.inner.restore(*values)
        self._state_version += 1
        for saved, group in zip(saved_groups, self.param_groups):
            params, names = group["params"], group.get("param_names")
            kept = {k: v for k, v in group.items() if k in self._rule.hyper}  # torch's dicts lack fastopt's
            group.clear()
            group.update(kept)
            # the rule's pairs as torch keeps them (tuples); a user's own keys as saved
            group.update({k: tuple(v) if isinstance(v, list) and k in self._rule.hyper else v
                          for k, v in saved.items() if k != "params"})
            group["params"] = params
            if names is not None and "param_names" not in saved:
                group["param_names"] = names
        for hook in self._optimizer_load_state_dict_post_hooks.values():
            hook(self)

    def __getstate__(self):
        raise TypeError(f"{type(self).__name__} is not picklable (its params live in arenas): "
                        "save optimizer.state_dict() instead")


class _StateView(Mapping):
    """``optimizer.state``: param -> {torch state name: live view, "step": tensor}."""

    def __init__(self, opt):
        self._entries, self.version = {}, opt._state_version
        for arena in opt._arenas or ():
            inner, names = arena.inner, arena.inner.rule.torch_names
            if inner.arenas is None:
                continue
            steps = [t for plan, t in zip(inner._plans, inner._steps()) for _ in plan.group["params"]]
            # what torch's state would hold: a state kept while its option is off too
            saved = [inner.saved_states(k, plan.restart) for k, plan in enumerate(inner._plans)
                     for _ in plan.group["params"]]
            for i, p in enumerate(arena.params):
                if steps[i]:
                    views = inner.state_views(i)
                    entry = {"step": torch.tensor(float(steps[i]))}
                    entry.update({names.get(n, n): _as_torch(v, p.device)
                                  for n, v in views.items() if n in saved[i]})
                    self._entries[p] = entry

    def __getitem__(self, p):
        return self._entries.get(p, {})  # as torch's defaultdict: a param not stepped yet has no state

    def __contains__(self, p):
        return p in self._entries

    def __iter__(self):
        return iter(self._entries)

    def __len__(self):
        return len(self._entries)


def _torch_signature(torch_class):
    """torch's implementation-choice arguments of ``torch_class`` (None: no torch counterpart)."""
    if torch_class is None:
        return {}
    params = inspect.signature(torch_class.__init__).parameters
    return {k: params[k].default for k in _IMPLEMENTATION if k in params}


def _make(fastopt_class, torch_class):
    """The torch class of ``fastopt_class``: its constructor is fastopt's (the rule's
    arguments and defaults, then ``max_grad_norm`` / ``nonfinite``) plus torch's
    implementation arguments of ``torch_class``, keyword-only."""
    rule = fastopt_class.rule
    base = inspect.signature(fastopt_class.__init__)
    P = inspect.Parameter
    implementation = _torch_signature(torch_class)
    # torch's implementation arguments come from torch's signature, even where fastopt's class
    # has one of the same name (capturable): the drop-in decides what it accepts of them
    extras = [n for n, q in base.parameters.items()
              if q.kind == P.KEYWORD_ONLY and n not in rule.hyper and n not in _IMPLEMENTATION]
    params = [q for q in base.parameters.values() if not (q.kind == P.KEYWORD_ONLY and q.name not in rule.hyper)]
    params += [P(n, P.KEYWORD_ONLY, default=d) for n, d in implementation.items()]
    # a drop-in keeps torch's semantics by default: an inf or NaN gradient propagates (GradScaler
    # already checks for infs under AMP); nonfinite="skip" is one more read of the gradients
    params += [base.parameters[n].replace(default=TORCH_NONFINITE) if n == "nonfinite" else base.parameters[n]
               for n in extras]
    signature = inspect.Signature(params)

    def __init__(self, *args, **kwargs):
        a = signature.bind(self, *args, **kwargs)
        a.apply_defaults()
        a = a.arguments
        # a list default (betas=[0.9, 0.999]) would be one object shared by every group, so an
        # edit of one group's in place would change all: a tuple, as torch's Adam makes it
        _TorchOptimizer.__init__(self, a["params"], {**{n: tuple(a[n]) if isinstance(a[n], list) else a[n]
                                                        for n in rule.hyper}, **rule.fixed},
                                 {n: a[n] for n in extras}, {n: a[n] for n in implementation})

    __init__.__signature__ = signature
    name = fastopt_class.__name__
    __init__.__qualname__ = f"{name}.__init__"
    twin = f"``torch.optim.{torch_class.__name__}``" if torch_class else "no torch.optim counterpart"
    doc = (f"{name} as a ``torch.optim.Optimizer`` ({twin}): fastopt's fused kernel over arenas of the "
           f"params (see ``fastopt.torch``).\n\n{fastopt_class.__doc__}")
    return type(name, (_TorchOptimizer,), {"__init__": __init__, "__doc__": doc, "__module__": __name__,
                                           "_fastopt_class": fastopt_class, "_torch_class": torch_class})


@torch._disable_dynamo  # imports torch._dynamo (a second) only when first called, under torch.compile
def _eager(fn, self, args, kwargs):
    return fn(self, *args, **kwargs)


def _wrap_step(cls):
    """torch wraps ``step`` for its hooks and profiler; this wrapper runs the same hooks and
    enters the profiler's range only while a profiler runs (its cost is a tiny model's step)."""
    step = cls.step
    from torch.optim.optimizer import _global_optimizer_post_hooks, _global_optimizer_pre_hooks

    profiler_enabled, compiling, modules = torch.autograd._profiler_enabled, torch.compiler.is_compiling, sys.modules

    @functools.wraps(step)
    def wrapper(self, *args, **kwargs):
        # traced by torch.compile (which imports dynamo: until then no check): run eagerly, a graph
        # break, as dynamo cannot trace Numba's kernels
        if "torch._dynamo" in modules and compiling():
            return _eager(wrapper, self, args, kwargs)
        if profiler_enabled():
            with torch.autograd.profiler.record_function(f"Optimizer.step#{type(self).__name__}.step"):
                return _hooked(self, step, args, kwargs)
        if self._optimizer_step_pre_hooks or self._optimizer_step_post_hooks or _global_optimizer_pre_hooks \
                or _global_optimizer_post_hooks:
            return _hooked(self, step, args, kwargs)
        return step(self, *args, **kwargs)  # no hook: one call less (a tiny model's step is a few us)

    def _hooked(self, step, args, kwargs):  # reached with a hook set or a profiler running
        for hook in (*_global_optimizer_pre_hooks.values(), *self._optimizer_step_pre_hooks.values()):
            result = hook(self, args, kwargs)
            if result is not None:
                args, kwargs = result
        out = step(self, *args, **kwargs)
        for hook in (*self._optimizer_step_post_hooks.values(), *_global_optimizer_post_hooks.values()):
            hook(self, args, kwargs)
        return out

    wrapper.hooked = True  # torch's constructor leaves a step marked hooked as it is
    cls.step = wrapper


_wrap_step(_TorchOptimizer)

#: rule name -> class, one per ``fastopt.OPTIMIZERS`` entry, its torch twin found by name
OPTIMIZERS = {name: _make(cls, getattr(torch.optim, cls.__name__, None)) for name, cls in _OPTIMIZERS.items()}
SGD, Adagrad, RMSprop, Adam, AdamW, Adadelta, Adamax, NAdam, RAdam, Lion, LAMB, LARS = (
    OPTIMIZERS[n] for n in ("sgd", "adagrad", "rmsprop", "adam", "adamw", "adadelta", "adamax", "nadam", "radam",
                            "lion", "lamb", "lars"))
