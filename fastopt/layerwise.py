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
from .kernels import _args, _dispatch, _formats, _layers, lamb, lars
from .optimizer import Optimizer, _is_array, _runs

CHUNK = 1 << 15       # elements per piece on the CPU: enough work per thread, few partial sums
CUDA_CHUNK = 1 << 12  # per block on CUDA: 32 per thread; a 1e7-param model gives ~2.5k blocks


class Layers(_layers.Layers):
    """A param group's tensors as the engine's layer passes take them (``kernels._layers``),
    cut into ``CHUNK`` / ``CUDA_CHUNK`` pieces; the gradients of a step come from the
    optimizer's checked lists unless fixed at construction."""

    def __init__(self, bases, states, spans=None, grads=None, like=None):
        super().__init__(bases, states, spans, grads, like, chunk=(CHUNK, CUDA_CHUNK))

    def step_grads(self, grads, group):
        """A step's gradients (a ``_GradLists``, or None when fixed) as the kernels take them."""
        if grads is None:
            return self.fixed_grads()
        return grads.typed(group) if self.cpu else [_layers.flat(g) for g in grads.arrays(group)]


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
    hyper = {**lamb.LAMB.defaults, "lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay,
             "bias_correction": bias_correction, "clamp_value": clamp_value}
    lamb.LAMB.check_types(hyper)
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
    lars.LARS.check_types(hyper)
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

    def _plan(self, group, k):
        params, offsets = group["params"], self._offsets_of(group)
        sizes = [int(a.size) for a in params]
        needed = self.held_states(k)
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
        g = layers.grads if grads is None else [_layers.flat(a) for a in grads.arrays(plan.group)]
        norms = NormPlan(layers.views(layers.bases) + layers.views(g))
        plan.norms = (grads, norms)  # holds `grads`, so its id cannot be reused while cached
        return norms
