"""LAMB (You et al., 2020, "Large Batch Optimization for Deep Learning: Training BERT in
76 Minutes", Algorithm 2), each tensor of a model being one layer:

    m    = beta1 * m + (1 - beta1) * g
    v    = beta2 * v + (1 - beta2) * g**2
    r    = (m / bc1) / (sqrt(v / bc2) + eps)          bc = 1 - beta**t, or 1 (bias_correction=False)
    u    = r + weight_decay * p                    (r alone when weight_decay == 0)
    phi  = min(||p||, clamp_value) / ||u||            per tensor; 1 where either norm is 0
    p   -= lr * phi * u

The paper's scaling function of ||p|| is phi(z) = min(max(z, gamma_l), gamma_u); here
gamma_l = 0 and gamma_u = ``clamp_value`` (None: no clamp, as NVIDIA apex's FusedLAMB).
``torch_optimizer.Lamb`` is ``bias_correction=False, clamp_value=10``. Unlike apex (whose
ratio is 1 when weight_decay == 0 unless use_nvlamb), the ratio is always applied, as in
the paper; a param group with ``layer_adaptation=False`` (biases, norms) takes phi = 1.

Two passes over a table of chunks ``(base, start, stop, tensor)`` that cuts each tensor
into pieces: pass 1 updates m and v and returns, per chunk, ``sum p**2`` and ``sum u**2``
(the norms cost no pass of their own); the host adds each tensor's chunks in chunk order
(the same bits on every run) and forms phi; pass 2 recomputes u from the new m, v (the
same function, so the same values) and applies ``p -= lr * phi * u``. Float32 traffic per
parameter: pass 1 reads p, g, m, v and writes m, v (24 B); pass 2 reads p, m, v and writes
p (16 B): 40 B, the least any exact two-pass scheme moves (pass 2 must get u: reading m, v
or a stored u costs the same 8 B); a one-pass Adam step moves 28 B.
"""
import hashlib
import inspect
import math
import numbers

import numpy as np
from numba import njit, prange

from . import _args, _engine
from ._rule import Hyper, OwnKernelsRule, State
from ._engine import _CPU_OPTIONS, _enable_cache

STATES = ("exp_avg", "exp_avg_sq")
cuda = None    # numba.cuda, bound on first GPU use (optional); a module global so the simulator can swap it

# The kernels' scalar tuple c: (grad_scale, lr, beta1, 1 - beta1, beta2, 1 - beta2,
# 1 / bc1, 1 / sqrt(bc2), eps, weight_decay), all in the arrays' dtype, then the flag
# weight_decay != 0.


def lamb_moments(g, m, v, c):
    """The new (m, v) from the gradient ``g`` (already scaled by c[0])."""
    return c[2] * m + c[3] * g, c[4] * v + c[5] * g * g


def lamb_direction(p, m, v, c):
    """u = m_hat / (sqrt(v_hat) + eps) + weight_decay * p, from the new m, v."""
    r = m * c[6] / (math.sqrt(v) * c[7] + c[8])
    # no term for a zero decay (torch_optimizer.Lamb skips it): 0 * p is NaN for an inf p
    return r + c[9] * p if c[10] else r


# -- CPU --------------------------------------------------------------------------------

BLOCK = 1024  # elements whose u wait in a scratch row (L1-resident) to be summed
_SALT = hashlib.sha256((inspect.getsource(inspect.getmodule(lamb_moments))
                        + inspect.getsource(_engine)).encode()).hexdigest()
_CPU = {}


# Only this sum may be reordered (SIMD lanes): a function of its own, so that the fast-math
# flag never reaches the update math (a reassociated 1 - beta2 times g times g would differ
# from Adam's in the last bit).
@njit(**dict(_CPU_OPTIONS, fastmath={"reassoc"}))
def _sum_squares(x, y):
    """(sum x**2, sum y**2) in float64."""
    sum_x, sum_y = 0.0, 0.0
    for i in range(x.size):
        a, b = np.float64(x[i]), np.float64(y[i])
        sum_x += a * a
        sum_y += b * b
    return sum_x, sum_y


def _make_cpu(parallel):
    moments = njit(**_CPU_OPTIONS)(lamb_moments)
    direction = njit(**_CPU_OPTIONS)(lamb_direction)

    @njit(**_CPU_OPTIONS)
    def block_moments(p, g, m, v, c, u):
        for i in range(p.size):  # a loop from 0 over slices: the form LLVM vectorizes
            m_i, v_i = moments(g[i] * c[0], m[i], v[i], c)
            m[i] = m_i
            v[i] = v_i
            u[i] = direction(p[i], m_i, v_i, c)

    @njit(**_CPU_OPTIONS)
    def chunk_moments(p, g, m, v, c):
        u = np.empty(min(BLOCK, p.size), p.dtype)
        sum_p, sum_u = 0.0, 0.0
        for lo in range(0, p.size, BLOCK):
            hi = min(lo + BLOCK, p.size)
            block_moments(p[lo:hi], g[lo:hi], m[lo:hi], v[lo:hi], c, u)
            block_p, block_u = _sum_squares(p[lo:hi], u[:hi - lo])  # still in L1: no memory traffic
            sum_p += block_p
            sum_u += block_u
        return sum_p, sum_u

    @njit(**_CPU_OPTIONS)
    def chunk_apply(p, m, v, scale, c):
        for i in range(p.size):
            p[i] = p[i] - scale * direction(p[i], m[i], v[i], c)

    def moments_pass(params, grads, ms, vs, chunks, c, sum_p, sum_u):
        for k in prange(chunks.shape[0]):
            b, lo, hi = chunks[k, 0], chunks[k, 1], chunks[k, 2]
            sum_p[k], sum_u[k] = chunk_moments(params[b][lo:hi], grads[b][lo:hi], ms[b][lo:hi], vs[b][lo:hi], c)

    def apply_pass(params, ms, vs, chunks, scales, c):
        for k in prange(chunks.shape[0]):
            b, lo, hi, t = chunks[k, 0], chunks[k, 1], chunks[k, 2], chunks[k, 3]
            chunk_apply(params[b][lo:hi], ms[b][lo:hi], vs[b][lo:hi], scales[t], c)

    kind = "parallel" if parallel else "serial"
    return tuple(_enable_cache(njit(parallel=parallel, **_CPU_OPTIONS)(f), f"lamb_{f.__name__}_{kind}", _SALT)
                 for f in (moments_pass, apply_pass))


def cpu(parallel):
    """``(moments_pass, apply_pass)`` over typed lists of 1-D bases and an int64 chunk table:

    ``moments_pass(params, grads, ms, vs, chunks, c, sum_p, sum_u)`` writes each chunk's
    float64 sums of p**2 and u**2; ``apply_pass(params, ms, vs, chunks, scales, c)`` does
    ``p -= scales[tensor] * u``."""
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


def cuda_functions(dtype):
    """The CUDA kernels as Python functions (for ``cuda.jit`` or ``compile_ptx``).

    Each block takes chunks ``rows[k] = (slot, start, stop, tensor)`` of one base;
    ``moments_kernel`` sums in the arrays' dtype (``zero`` comes from the host: no float64
    in a float32 kernel) with a fixed tree, so the partials are the same on every run."""
    from numba import types
    from ._cuda import THREADS, tree_reduce
    bind_cuda()
    acc = getattr(types, np.dtype(dtype).name)
    moments = cuda.jit(device=True)(lamb_moments)
    direction = cuda.jit(device=True)(lamb_direction)

    def moments_kernel(p, g, m, v, rows, c, zero, sum_p, sum_u):
        sh = cuda.shared.array((2, THREADS), acc)
        tid = cuda.threadIdx.x
        for k in range(cuda.blockIdx.x, rows.shape[0], cuda.gridDim.x):
            total_p, total_u = zero, zero
            for i in range(rows[k, 1] + tid, rows[k, 2], THREADS):
                m_i, v_i = moments(g[i] * c[0], m[i], v[i], c)
                m[i] = m_i
                v[i] = v_i
                u = direction(p[i], m_i, v_i, c)
                total_p += p[i] * p[i]
                total_u += u * u
            sh[0, tid] = total_p
            sh[1, tid] = total_u
            tree_reduce(sh, tid, False)
            if tid == 0:
                sum_p[rows[k, 0]] = sh[0, 0]
                sum_u[rows[k, 0]] = sh[1, 0]
            cuda.syncthreads()

    def apply_kernel(p, m, v, rows, scales, c):
        tid = cuda.threadIdx.x
        for k in range(cuda.blockIdx.x, rows.shape[0], cuda.gridDim.x):
            scale = scales[rows[k, 3]]
            for i in range(rows[k, 1] + tid, rows[k, 2], THREADS):
                p[i] = p[i] - scale * direction(p[i], m[i], v[i], c)

    return moments_kernel, apply_kernel


def cuda_kernels(dtype):
    key = np.dtype(dtype)
    if key not in _CUDA:
        _CUDA[key] = tuple(bind_cuda().jit(f) for f in cuda_functions(key))
    return _CUDA[key]


def ptx(dtype, cc):
    """The PTX of both CUDA kernels for ``dtype`` and compute capability ``cc`` (no GPU needed)."""
    import numba
    from numba import types
    from ._cuda_cc import _target_cc
    from ._dispatch import cast_scalars
    elem = numba.from_dtype(np.dtype(dtype))
    arr, rows = types.Array(elem, 1, "C"), types.Array(types.int64, 2, "C")
    c = numba.typeof(cast_scalars(scalars(step=1, lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01),
                                  np.dtype(dtype)))
    moments_kernel, apply_kernel = cuda_functions(dtype)
    with _target_cc(cc):
        return [cuda.compile_ptx(moments_kernel, (arr, arr, arr, arr, rows, c, elem, arr, arr), cc=cc)[0],
                cuda.compile_ptx(apply_kernel, (arr, arr, arr, rows, arr, c), cc=cc)[0]]


# -- host side --------------------------------------------------------------------------

def _is_number(x):
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def check(*, lr, betas, eps, weight_decay, clamp_value=None, **_):
    _args.lr(lr)
    _args.eps(eps)
    _args.betas(betas)
    _args.nonneg("weight_decay", weight_decay)
    if clamp_value is not None and not (_is_number(clamp_value) and clamp_value > 0):
        raise ValueError(f"Invalid clamp_value value: {clamp_value!r} (a positive number, or None)")


def scalars(*, step, lr, betas, eps, weight_decay, bias_correction=True):
    beta1, beta2 = betas
    bc1 = 1 - beta1 ** step if bias_correction else 1.0
    bc2 = 1 - beta2 ** step if bias_correction else 1.0
    return (lr, beta1, 1 - beta1, beta2, 1 - beta2, 1 / bc1, 1 / math.sqrt(bc2), eps, weight_decay), \
        (weight_decay != 0,)


LAMB = OwnKernelsRule(
    "lamb", lambda h, step, lr: scalars(step=step, lr=lr, betas=h["betas"], eps=h["eps"],
                                        weight_decay=h["weight_decay"], bias_correction=h["bias_correction"]),
    states=[State("exp_avg"), State("exp_avg_sq")],
    hyper=[Hyper("lr", 1e-3, _args.lr), Hyper("betas", (0.9, 0.999), _args.betas), Hyper("eps", 1e-6, _args.eps),
           Hyper("weight_decay", 1e-2, _args.nonneg_of("weight_decay")),
           Hyper("bias_correction", True, keyword=True), Hyper("clamp_value", None, keyword=True),
           Hyper("layer_adaptation", True, keyword=True)],
    check=lambda h: check(**h))


def trust_ratios(param_norms, update_norms, clamp_value=None):
    """phi per tensor: ``min(||p||, clamp_value) / ||u||`` where both norms are > 0, else 1
    (a zero tensor, a zero update; a NaN norm also gives 1, and its NaN update still spreads)."""
    w = np.asarray(param_norms, np.float64)
    u = np.asarray(update_norms, np.float64)
    if clamp_value is not None:
        w = np.minimum(w, clamp_value)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where((w > 0) & (u > 0), w / u, 1.0)


def lamb_reference(params, grads, exp_avgs, exp_avg_sqs, *, step, lr=1e-3, betas=(0.9, 0.999), eps=1e-6,
                   weight_decay=1e-2, bias_correction=True, clamp_value=None, layer_adaptation=True):
    """Textbook LAMB in NumPy (float64), tensor by tensor: the check for :func:`lamb_`.
    Returns the ratios phi."""
    beta1, beta2 = betas
    ratios = []
    for p, g, m, v in zip(params, grads, exp_avgs, exp_avg_sqs):
        m[...] = beta1 * m + (1 - beta1) * g
        v[...] = beta2 * v + (1 - beta2) * g ** 2
        m_hat = m / (1 - beta1 ** step) if bias_correction else m
        v_hat = v / (1 - beta2 ** step) if bias_correction else v
        u = m_hat / (np.sqrt(v_hat) + eps)
        if weight_decay != 0:
            u = u + weight_decay * p
        w_norm, u_norm = np.linalg.norm(p), np.linalg.norm(u)
        if clamp_value is not None:
            w_norm = min(w_norm, clamp_value)
        phi = w_norm / u_norm if w_norm > 0 and u_norm > 0 and layer_adaptation else 1.0
        p -= lr * phi * u
        ratios.append(phi)
    return np.array(ratios)
