"""LARS (You, Gitman & Ginsburg, 2017, "Large Batch Training of Convolutional Networks"),
in the PyTorch form of ``timm.optim.Lars`` (SGD + NVIDIA apex's LARC), per tensor:

    adapt  = weight_decay != 0 or always_adapt
    ratio  = trust_coeff * ||p|| / (||g|| + weight_decay * ||p|| + eps)    if adapt, else 1
             (1 where ||p|| or ||g|| is 0; trust_clip: ratio = min(ratio / lr, 1), LARC)
    d      = ratio * (g + weight_decay * p)
    b      = d                                     (first step)
    b      = momentum * b + (1 - dampening) * d    (later steps; no buffer when momentum == 0)
    d      = d + momentum * b if nesterov else b
    p     -= lr * d

The paper puts the global lr inside the momentum (``b = m b + lr * ratio * d``); timm, as
here, scales after it: the same for a constant lr. The defaults are timm's (lr=1, no
momentum, no weight decay: without ``always_adapt`` that is plain SGD); biases and norms are
kept out of the adaptation by a param group with ``weight_decay=0``.

Two passes: the norms of every p and g of a group in one segmented reduction
(``fastopt.clip.NormPlan``), then one update pass whose chunks ``(base, start, stop,
tensor)`` read their tensor's ratio. Float32 traffic per parameter: 8 B for the norms, then
p, g read and p written (12 B), plus the buffer read and written with momentum (8 B): 28 B
with momentum, 20 B without; a group that does not adapt skips the norms.
"""
import hashlib
import inspect
import math
import numbers

import numpy as np
from numba import njit, prange

from . import _args, _engine
from ._rule import Hyper, OwnKernelsRule, State
from ._engine import _CPU_OPTIONS, _enable_cache, _piece

STATES = ("momentum_buffer",)
cuda = None  # numba.cuda, bound on first GPU use (optional); a module global so the simulator can swap it

# The kernels' scalar tuple c: (grad_scale, lr, weight_decay, momentum, 1 - dampening,
# use_momentum, first_step, nesterov, weight_decay != 0), the floats in the arrays' dtype.


def lars_math(p, g, buf, ratio, c):
    """The new (p, buf); ``g`` is already scaled by c[0], ``ratio`` is the tensor's."""
    # no term for a zero decay (timm skips it): 0 * p is NaN for an inf or NaN p
    d = (g + c[2] * p if c[8] else g) * ratio
    if c[5]:
        if c[6]:
            buf = d
        else:
            buf = c[3] * buf + c[4] * d
        if c[7]:
            d = d + c[3] * buf
        else:
            d = buf
    return p - c[1] * d, buf


# -- CPU --------------------------------------------------------------------------------

_SALT = hashlib.sha256((inspect.getsource(inspect.getmodule(lars_math))
                        + inspect.getsource(_engine)).encode()).hexdigest()
_CPU = {}


def _make_cpu(parallel):
    update = njit(**_CPU_OPTIONS)(lars_math)

    @njit(**_CPU_OPTIONS)
    def chunk_update(p, g, buf, ratio, c):
        for i in range(p.size):
            # without momentum the buffer is None: its branch is pruned at compile time
            b = buf[i] if buf is not None else p[i]
            p_i, b = update(p[i], g[i] * c[0], b, ratio, c)
            p[i] = p_i
            if buf is not None:
                buf[i] = b

    def update_pass(params, grads, bufs, chunks, ratios, c):
        for k in prange(chunks.shape[0]):
            b, lo, hi, t = chunks[k, 0], chunks[k, 1], chunks[k, 2], chunks[k, 3]
            chunk_update(params[b][lo:hi], grads[b][lo:hi], _piece(bufs, b, lo, hi), ratios[t], c)

    kind = "parallel" if parallel else "serial"
    return _enable_cache(njit(parallel=parallel, **_CPU_OPTIONS)(update_pass), f"lars_update_{kind}", _SALT)


def cpu(parallel):
    """``update_pass(params, grads, bufs, chunks, ratios, c)`` over typed lists of 1-D bases
    (``bufs`` None without momentum) and an int64 chunk table."""
    if parallel not in _CPU:
        _CPU[parallel] = _make_cpu(parallel)
    return _CPU[parallel]


# -- CUDA -------------------------------------------------------------------------------

_CUDA = {}


def bind_cuda():
    global cuda
    if cuda is None:
        from numba import cuda as module
        cuda = module
    return cuda


def cuda_function():
    """The CUDA update kernel as a Python function: each block takes chunks
    ``rows[k] = (slot, start, stop, tensor)`` of one base."""
    from ._cuda import THREADS
    bind_cuda()
    update = cuda.jit(device=True)(lars_math)

    def update_kernel(p, g, buf, rows, ratios, c):
        tid = cuda.threadIdx.x
        for k in range(cuda.blockIdx.x, rows.shape[0], cuda.gridDim.x):
            ratio = ratios[rows[k, 3]]
            for i in range(rows[k, 1] + tid, rows[k, 2], THREADS):
                b = buf[i] if buf is not None else p[i]
                p_i, b = update(p[i], g[i] * c[0], b, ratio, c)
                p[i] = p_i
                if buf is not None:
                    buf[i] = b

    return update_kernel


def cuda_kernel():
    if "update" not in _CUDA:
        _CUDA["update"] = bind_cuda().jit(cuda_function())
    return _CUDA["update"]


def ptx(dtype, cc, momentum=True):
    """The PTX of the update kernel for ``dtype`` and compute capability ``cc`` (no GPU needed)."""
    import numba
    from numba import types
    from ._cuda_cc import _target_cc
    from ._dispatch import cast_scalars
    elem = numba.from_dtype(np.dtype(dtype))
    arr, rows = types.Array(elem, 1, "C"), types.Array(types.int64, 2, "C")
    c = numba.typeof(cast_scalars(scalars(step=2, lr=0.1, momentum=0.9 if momentum else 0.0, dampening=0.0,
                                          weight_decay=1e-4, nesterov=False), np.dtype(dtype)))
    kernel = cuda_function()
    with _target_cc(cc):
        return cuda.compile_ptx(kernel, (arr, arr, arr if momentum else types.none, rows, arr, c), cc=cc)[0]


# -- host side --------------------------------------------------------------------------

def _is_number(x):
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def check(*, lr, momentum, dampening, weight_decay, nesterov, trust_coeff, eps, **_):
    _args.lr(lr)
    _args.nonneg("momentum", momentum)
    _args.nonneg("weight_decay", weight_decay)
    _args.eps(eps)
    if not -math.inf < dampening < math.inf:
        raise ValueError(f"Invalid dampening value: {dampening}")
    if not (_is_number(trust_coeff) and 0 < trust_coeff < math.inf):
        raise ValueError(f"Invalid trust_coeff value: {trust_coeff!r} (a positive number)")
    if nesterov and (momentum <= 0 or dampening != 0):
        raise ValueError("Nesterov momentum requires a momentum and zero dampening")


def scalars(*, step, lr, momentum, dampening, weight_decay, nesterov):
    return ((lr, weight_decay, momentum, 1 - dampening),
            (momentum != 0, step == 1, bool(nesterov), weight_decay != 0))


LARS = OwnKernelsRule(
    "lars", lambda h, step, lr: scalars(step=step, lr=lr, momentum=h["momentum"], dampening=h["dampening"],
                                        weight_decay=h["weight_decay"], nesterov=h["nesterov"]),
    states=[State("momentum_buffer", lambda h: h["momentum"] != 0, "when momentum != 0")],
    hyper=[Hyper("lr", 1.0, _args.lr), Hyper("momentum", 0.0), Hyper("dampening", 0.0), Hyper("weight_decay", 0.0),
           Hyper("nesterov", False), Hyper("trust_coeff", 1e-3), Hyper("eps", 1e-8), Hyper("trust_clip", False),
           Hyper("always_adapt", False)],
    check=lambda h: check(**h),
    start_from_grad=("momentum_buffer",))  # as timm's: momentum turned on mid-run starts from d


def adapts(weight_decay, always_adapt):
    """Whether a group's tensors get a trust ratio (timm: only with weight decay, unless always_adapt)."""
    return weight_decay != 0 or bool(always_adapt)


def trust_ratios(param_norms, grad_norms, *, weight_decay, trust_coeff, eps, trust_clip=False, lr=None):
    """The ratio of each tensor (see the module docstring), float64."""
    w = np.asarray(param_norms, np.float64)
    g = np.asarray(grad_norms, np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where((w > 0) & (g > 0), trust_coeff * w / (g + w * weight_decay + eps), 1.0)
        if trust_clip:
            ratio = np.minimum(ratio / lr, 1.0)
    return ratio


def lars_reference(params, grads, momentum_buffers=None, *, step, lr=1.0, momentum=0.0, dampening=0.0,
                   weight_decay=0.0, nesterov=False, trust_coeff=1e-3, eps=1e-8, trust_clip=False,
                   always_adapt=False):
    """Textbook LARS in NumPy (float64), tensor by tensor: the check for :func:`lars_`.
    Returns the ratios."""
    ratios = []
    for i, (p, g) in enumerate(zip(params, grads)):
        ratio = 1.0
        if weight_decay != 0 or always_adapt:
            w_norm, g_norm = np.linalg.norm(p), np.linalg.norm(g)
            if w_norm > 0 and g_norm > 0:
                ratio = trust_coeff * w_norm / (g_norm + weight_decay * w_norm + eps)
            if trust_clip:
                ratio = min(ratio / lr, 1.0)
        d = ratio * (g + weight_decay * p if weight_decay != 0 else g)
        if momentum != 0:
            buf = momentum_buffers[i]
            buf[...] = d if step == 1 else momentum * buf + (1 - dampening) * d
            d = d + momentum * buf if nesterov else buf
        p -= lr * d
        ratios.append(ratio)
    return np.array(ratios)
