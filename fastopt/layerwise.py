"""LAMB and LARS: optimizers whose step scales each tensor ("layer") by a trust ratio made
of per-tensor norms (the math: ``kernels/lamb.py``, ``kernels/lars.py``).

A param group is laid out once as :class:`Layers`: contiguous *bases* (the runs of a
ParamBuffer's arena, or each separate array) and the chunk table of
``kernels._reduce.chunk_table``, whose rows ``(base, start, stop, tensor)`` cut every tensor
into pieces (``CHUNK`` elements on the CPU, ``CUDA_CHUNK`` on CUDA). A piece is the unit of
work of a CPU thread or a CUDA block, and of a partial sum: the per-tensor norms are the
sums of a tensor's pieces, added in table order, so they are the same bits on every run. A
step is two passes per group: LAMB updates its moments and sums ``p**2`` and ``u**2`` in
pass 1, then applies ``p -= lr * phi * u``; LARS takes the norms of p and g (``NormPlan``)
then applies its update. The rules' passes are the engine's layer passes of their
declarations (:meth:`Layers.run`: no kernel here is LAMB's or LARS's own). On the CPU each
pass is one call; on CUDA one launch per base (one per ParamBuffer run, one per tensor for
separate arrays).

The base class does the rest as for every rule: param groups, lr schedules, the
``max_grad_norm`` / ``nonfinite`` guard (its clip factor scales the gradient inside the
kernels, and the norms LARS uses are those of the clipped gradient), state arenas, ``state_dict`` and
checkpoints.
"""
import numpy as np

from .buffer import ALIGN
from .clip import NormPlan
from .kernels import _args, _dispatch, _formats, _reduce, lamb, lars
from .optimizer import Optimizer, _is_array, _runs

CHUNK = 1 << 15       # elements per piece on the CPU: enough work per thread, few partial sums
CUDA_CHUNK = 1 << 12  # per block on CUDA: 32 per thread; a 1e7-param model gives ~2.5k blocks


def _flat(a):
    n = a.size if isinstance(a.size, int) else a.numel()  # torch's size is a method
    return a.reshape(n)


class Layers:
    """Tensors as the layer-wise kernels take them.

    ``bases``: contiguous arrays (flattened here); ``states``: name -> list of bases laid out
    like ``bases`` (None for a state not used); ``spans[t] = (base, start, size)`` places
    tensor t (default: tensor t is base t, whole); ``grads``: the gradients' bases when they
    are fixed (a ParamBuffer's grad arena), else None and each step gives them.
    """

    def __init__(self, bases, states, spans=None, grads=None, like=None):
        like = bases[0] if bases else like
        self.dtype = np.dtype(_dispatch._Array("params[0]", like).dtype)
        self.cpu = isinstance(like, np.ndarray)
        self.bases = [_flat(a) for a in bases]
        self.states = {k: None if v is None else [_flat(a) for a in v] for k, v in states.items()}
        self.grads = None if grads is None else [_flat(a) for a in grads]
        self.spans = spans if spans is not None else [(b, 0, int(a.size)) for b, a in enumerate(self.bases)]
        self.n_tensors = len(self.spans)
        self.chunks = _reduce.chunk_table([n for _, _, n in self.spans], CHUNK if self.cpu else CUDA_CHUNK,
                                          [(b, s) for b, s, _ in self.spans])
        n = self.chunks.shape[0]
        if not n:
            return
        if self.cpu:
            from numba.typed import List
            self.parallel = sum(s[2] for s in self.spans) >= _dispatch.PARALLEL_THRESHOLD
            self.typed = {k: None if v is None else List(v) for k, v in
                          dict(params=self.bases, grads=self.grads, **self.states).items()}
        else:
            from numba import cuda
            # per base, its rows, with column 0 naming the slot its partial sums go to
            self.rows = []
            for b in range(len(self.bases)):
                slots = np.nonzero(self.chunks[:, 0] == b)[0]
                if slots.size:
                    table = self.chunks[slots].copy()
                    table[:, 0] = slots
                    self.rows.append((b, cuda.to_device(table)))
        self.sums = None  # (k, n_chunks): the per-chunk sums of the last pass that returned k of them

    def views(self, bases):
        """Each tensor's flat view of ``bases`` (laid out like the params' bases)."""
        return [bases[b][s:s + n] for b, s, n in self.spans]

    def fixed_grads(self):
        """The gradients as the kernels take them, when fixed at construction."""
        return self.typed["grads"] if self.cpu and self.chunks.shape[0] else self.grads

    def step_grads(self, grads, group):
        """A step's gradients (a ``_GradLists``, or None when fixed) as the kernels take them."""
        if grads is None:
            return self.fixed_grads()
        return grads.typed(group) if self.cpu else [_flat(g) for g in grads.arrays(group)]

    def per_tensor(self, sums):
        """Each tensor's total of the per-chunk ``sums`` (added in chunk order); a row of
        totals per row of a 2-D ``sums``."""
        if not isinstance(sums, np.ndarray):
            sums = sums.copy_to_host()
        sums = sums.astype(np.float64)
        if sums.ndim == 2:
            return np.stack([self.per_tensor(row) for row in sums]) if len(sums) else np.zeros((0, self.n_tensors))
        return np.bincount(self.chunks[:, 3], weights=sums, minlength=self.n_tensors)

    def run(self, kernels, grads, c, per_tensor=None):
        """One layer pass of the engine's ``kernels`` (a rule's) over the group: ``grads`` as
        :meth:`step_grads` gives them (None: the pass reads none), ``per_tensor`` the host
        values of its per-tensor scalars, one row per scalar (or one value per tensor for
        one). A pass that sums leaves its per-chunk sums in ``self.sums``. Returns the launches."""
        n = self.chunks.shape[0]
        if per_tensor is not None:
            per_tensor = np.ascontiguousarray(per_tensor, self.dtype).reshape(len(kernels.per_tensor), -1)
        if kernels.sums and (self.sums is None or self.sums.shape[0] != kernels.sums):
            if self.cpu:
                self.sums = np.zeros((kernels.sums, n))
            else:
                from numba import cuda
                self.sums = cuda.device_array((kernels.sums, n), self.dtype)
        sums = self.sums if kernels.sums else None
        grads = grads if kernels.reads_grad else None
        if self.cpu:
            t = self.typed
            kernels.layers_cpu(self.parallel)(t["params"], grads, *(t[s] for s in kernels.states), self.chunks,
                                              per_tensor, c, sums)
            return 1
        if per_tensor is not None:
            per_tensor = _to_device(per_tensor)
        arrays = [self.bases, grads, *(self.states[s] for s in kernels.states)]
        return self.launch(kernels.layers_cuda(self.dtype), arrays, per_tensor, c, sums)

    def launch(self, kernel, arrays, *rest):
        """``kernel(*arrays of base b, rows of base b, *rest)`` for every base (CUDA);
        ``arrays`` are per-base lists (or None). Returns the launches."""
        from numba import config, cuda

        from .kernels import _cuda
        for b, rows in self.rows:
            args = [None if a is None else a[b] for a in arrays]
            if not config.ENABLE_CUDASIM:
                args = [None if a is None else cuda.as_cuda_array(a, sync=False) for a in args]
            _cuda.launch(kernel, rows.shape[0], 0, *args, rows, *rest)
        return len(self.rows)


def _to_device(host):
    from numba import cuda
    return cuda.to_device(host)


def lamb_passes(layers, grads, c, *, clamp_value=None, layer_adaptation=True):
    """Both LAMB passes over ``layers`` (``grads`` as :meth:`Layers.step_grads` gives them,
    ``c`` the kernels' scalars). Returns (phi per tensor, launches)."""
    if not layers.chunks.shape[0]:
        return np.ones(layers.n_tensors), 0
    launches = layers.run(lamb.LAMB.first_kernels, grads, c)
    phi = np.ones(layers.n_tensors)
    if layer_adaptation:
        param_norms, update_norms = np.sqrt(layers.per_tensor(layers.sums))
        phi = lamb.trust_ratios(param_norms, update_norms, clamp_value)
    return phi, launches + layers.run(lamb.LAMB.kernels, grads, c, per_tensor=phi)


def lars_pass(layers, grads, c, ratios):
    """The LARS update over ``layers`` with each tensor's ratio; returns the launches."""
    if not layers.chunks.shape[0]:
        return 0
    return layers.run(lars.LARS.kernels, grads, c, per_tensor=ratios)


def lamb_(params, grads, exp_avgs, exp_avg_sqs, *, step, lr=1e-3, betas=(0.9, 0.999), eps=1e-6,
          weight_decay=1e-2, bias_correction=True, clamp_value=None):
    """One LAMB step, in place, over lists of tensors (one trust ratio per tensor); returns
    the ratios phi (float64, one per tensor). Everything is checked before anything is written."""
    hyper = {**lamb.LAMB.defaults, "lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay,
             "bias_correction": bias_correction, "clamp_value": clamp_value}
    lamb.LAMB.check(hyper)
    _args.step(step)
    params, grads, states = check_lists(params, grads, dict(exp_avgs=exp_avgs, exp_avg_sqs=exp_avg_sqs))
    layers = Layers(params, dict(zip(lamb.LAMB.states, states.values())), grads=grads)
    c = lamb.LAMB.kernel_scalars(hyper, step, lr, layers.dtype)
    return lamb_passes(layers, layers.fixed_grads(), c, clamp_value=clamp_value)[0]


def lars_(params, grads, momentum_buffers=None, *, step, lr=1.0, momentum=0.0, dampening=0.0, weight_decay=0.0,
          nesterov=False, trust_coeff=1e-3, eps=1e-8, trust_clip=False, always_adapt=False):
    """One LARS step, in place, over lists of tensors; returns the ratios (float64, one per
    tensor). At ``step == 1`` the buffers are set (their content is ignored), as timm does
    when a buffer does not exist yet. Everything is checked before anything is written."""
    hyper = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov,
                 trust_coeff=trust_coeff, eps=eps, trust_clip=trust_clip, always_adapt=always_adapt)
    lars.LARS.check(hyper)
    _args.step(step)
    if momentum != 0:
        _args.required("momentum_buffers", momentum_buffers, "when momentum != 0")
    else:
        momentum_buffers = None
    params, grads, states = check_lists(params, grads, dict(momentum_buffers=momentum_buffers))
    layers = Layers(params, {"momentum_buffer": states["momentum_buffers"]}, grads=grads)
    if lars.adapts(weight_decay, always_adapt):
        norms = NormPlan(layers.views(layers.bases) + layers.views(layers.grads)).segment_norms()[0]
        n = layers.n_tensors
        ratios = lars.trust_ratios(norms[:n], norms[n:], weight_decay=weight_decay, trust_coeff=trust_coeff,
                                   eps=eps, trust_clip=trust_clip, lr=lr)
    else:
        ratios = np.ones(layers.n_tensors)
    lars_pass(layers, layers.fixed_grads(), lars.LARS.kernel_scalars(hyper, step, lr, layers.dtype), ratios)
    return ratios


def check_lists(params, grads, states):
    """Check lists of tensors of one update: ``params[i]``, ``grads[i]`` and each
    ``states[name][i]`` (None: unused) share device, dtype and shape, are contiguous,
    writeable (except grads) and do not overlap. Errors name the argument."""
    def as_list(x):
        return [_dispatch.as_kernel_array(a) for a in ([x] if _is_array(x) else list(x))]
    lists = {"params": as_list(params), "grads": as_list(grads)}
    lists.update({k: None if v is None else as_list(v) for k, v in states.items()})
    n = len(lists["params"])
    if not n:
        raise ValueError("params is empty")
    for name, arrays in lists.items():
        if arrays is not None and len(arrays) != n:
            raise ValueError(f"{name} has {len(arrays)} arrays for {n} params")
    ref = _dispatch.check_array(_dispatch._Array("params[0]", lists["params"][0]))
    written, read = [], []
    for i in range(n):
        param = _dispatch._Array(f"params[{i}]", lists["params"][i])
        for name, arrays in lists.items():
            if arrays is None:
                continue
            a = _dispatch.check_array(_dispatch._Array(f"{name}[{i}]", arrays[i]), like=ref, shape_of=param,
                                      written=name != "grads")
            (read if name == "grads" else written).append(a)
    _dispatch.check_no_overlap(written, read)
    return lists["params"], lists["grads"], {k: lists[k] for k in states}


class _GroupPlan:
    """One param group's layout and update count, run by the base class's ``step``."""

    def __init__(self, optimizer, group, layers):
        self.optimizer, self.group, self.layers = optimizer, group, layers
        self.step = 0
        self.constants = None  # see fastopt.optimizer._Plan
        self.restart = False
        self.ratios = None  # the trust ratios of the last step, one per tensor
        self.norms = None   # LARS: (the gradients it was built for, their NormPlan)

    def run(self, scalars, grads, rounding=None):
        return self.optimizer._run_group(self, scalars, grads)  # float32/float64 only: nothing to round


class _Layerwise(Optimizer):
    """What LAMB and LARS share: the layout of a group, and the ratios of the last step."""

    def _check_precision(self):
        if self.dtype in _formats.BITS or self.state_dtype in _formats.BITS:
            raise TypeError(f"{type(self).__name__} takes float32 or float64 params and state (16-bit formats are "
                            f"not supported by the layer-wise kernels yet), got params {self.dtype}, state "
                            f"{self.state_dtype}")
        super()._check_precision()

    def _plan(self, group):
        params, offsets = group["params"], self._offsets_of(group)
        sizes = [int(a.size) for a in params]
        needed = self.states_needed(group)
        if self._buffer is not None:
            align = ALIGN // self._buffer.dtype.itemsize
            runs = _runs([o for o, n in zip(offsets, sizes) if n], [n for n in sizes if n], align)
            spans = [next(((b, o - lo, n) for b, (lo, hi) in enumerate(runs) if lo <= o < hi), (0, 0, 0))
                     for o, n in zip(offsets, sizes)]

            def cut(arena):
                return [arena[lo:hi] for lo, hi in runs]
            bases, grads = cut(self._buffer.arena), cut(self._buffer.grad_arena)
            states = {s: cut(self.arenas[s]) if s in needed else None for s in self.rule.states}
        else:
            spans, bases, grads = None, params, None
            states = {s: [self.arenas[s][o:o + n] for o, n in zip(offsets, sizes)] if s in needed else None
                      for s in self.rule.states}
        return _GroupPlan(self, group, Layers(bases, states, spans, grads, like=params[0]))

    @property
    def trust_ratios(self):
        """The ratio each param got at the last step (float64, in param order), or None."""
        if not self._plans or any(p.ratios is None for p in self._plans):
            return None
        return np.concatenate([p.ratios for p in self._plans])


class LAMB(_Layerwise):
    """LAMB (You et al., 2020), as NVIDIA apex's FusedLAMB; see ``kernels/lamb.py``.

    ``clamp_value`` bounds ||p|| in the trust ratio (the paper's phi; torch_optimizer.Lamb
    uses 10 and ``bias_correction=False``). A param group with ``layer_adaptation=False``
    takes a ratio of 1 (an AdamW-like step), e.g. for biases and norm weights. apex clips the
    global gradient norm at 1 by default: pass ``max_grad_norm=1.0`` for the same.
    ``trust_ratios`` holds each param's phi of the last step. A step is two launches per
    group on the CPU (see ``fastopt.layerwise``).
    """
    rule = lamb.LAMB

    def _run_group(self, plan, c, grads):
        layers, group = plan.layers, plan.group
        plan.ratios, launches = lamb_passes(layers, layers.step_grads(grads, group), c,
                                            clamp_value=group["clamp_value"],
                                            layer_adaptation=group["layer_adaptation"])
        return launches


class LARS(_Layerwise):
    """LARS (You et al., 2017) in the form of ``timm.optim.Lars``, with its defaults; see
    ``kernels/lars.py``. A group adapts when its ``weight_decay != 0`` or ``always_adapt``:
    give biases and norm weights a group with ``weight_decay=0`` to keep them out.
    ``trust_ratios`` holds each param's ratio of the last step."""
    rule = lars.LARS

    def _run_group(self, plan, c, grads):
        layers, group = plan.layers, plan.group
        launches = 0
        plan.ratios = np.ones(layers.n_tensors)
        if lars.adapts(group["weight_decay"], group["always_adapt"]) and layers.chunks.shape[0]:
            norms = self._norms(plan, grads)
            w, g = np.split(norms.segment_norms()[0], 2)
            plan.ratios = lars.trust_ratios(w, g * float(c[0]), weight_decay=group["weight_decay"],
                                            trust_coeff=group["trust_coeff"], eps=group["eps"],
                                            trust_clip=group["trust_clip"],
                                            lr=float(self.rule.kernels.scalar(c, "lr")))
            launches += 1 if layers.cpu else sum(1 for a in norms.arrays if a.size)
        return launches + lars_pass(layers, layers.step_grads(grads, group), c, plan.ratios)

    def _norms(self, plan, grads):
        """The NormPlan over the group's params then grads (one per gradient list)."""
        if plan.norms is not None and plan.norms[0] is grads:
            return plan.norms[1]
        layers = plan.layers
        g = layers.grads if grads is None else [_flat(a) for a in grads.arrays(plan.group)]
        norms = NormPlan(layers.views(layers.bases) + layers.views(g))
        plan.norms = (grads, norms)  # holds `grads`, so its id cannot be reused while cached
        return norms
