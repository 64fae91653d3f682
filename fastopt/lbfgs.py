"""L-BFGS with PyTorch's algorithm (``torch.optim.LBFGS``) over NumPy or CuPy arrays.

Given the gradient g_k and the last m pairs s_i = x_{i+1} - x_i, y_i = g_{i+1} - g_i
(rho_i = 1 / y_i.s_i, pairs with y.s <= 1e-10 skipped), the two-loop recursion computes
d = -H_k g_k without forming the inverse-Hessian estimate H_k:

    q = -g;  for i newest..oldest:  a_i = rho_i s_i.q;  q -= a_i y_i
    r = gamma q,  gamma = s.y / y.y of the newest pair   (H_0 = gamma I)
    for i oldest..newest:  b_i = rho_i y_i.r;  r += (a_i - b_i) s_i;   d = r

Step length: t = lr, except on the very first iteration t = lr * min(1, 1/|g|_1); with
``line_search="strong_wolfe"`` t comes from the strong-Wolfe search (c1 = 1e-4, c2 = 0.9,
cubic interpolation), ported from torch/optim/lbfgs.py statement by statement so that the
iterates, the iteration count and the function evaluations are PyTorch's.

The vectors live on the params' device; the history is a preallocated (m, n) ring, and
each dot product (BLAS) and each ``y += a x`` (a Numba loop on the CPU, one CuPy kernel
on the GPU) is one pass, with no temporary of length n. The scalars (a_i, rho_i, t, ...)
are host floats: in float32 they are more precise than PyTorch's (float32 tensors).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
from numba import njit, prange

from .buffer import ParamBuffer
from .kernels._dispatch import PARALLEL_THRESHOLD
from .nn._array import array_module, cupy  # cupy: None on a CPU-only install

_CUPY_AXPY = None

#: what an optimizer's ``params`` may be: see :class:`FlatParams`
Params = ParamBuffer | np.ndarray | Sequence[np.ndarray]
#: ``closure() -> loss`` (with a ParamBuffer) or ``closure() -> (loss, grads)`` (with arrays)
Closure = Callable[[], Any]


@njit(cache=True, nogil=True)
def _axpy_serial(a, x, y):
    for i in range(y.size):
        y[i] += a * x[i]


@njit(cache=True, nogil=True, parallel=True)
def _axpy_parallel(a, x, y):
    for i in prange(y.size):
        y[i] += a * x[i]


def axpy(a: float, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """``y += a * x`` in place, one pass over x and y and no temporary (a: a host scalar,
    applied in the arrays' dtype, as ``torch.Tensor.add_(x, alpha=a)`` does). Returns y."""
    global _CUPY_AXPY
    a = y.dtype.type(a)
    if isinstance(y, np.ndarray):
        (_axpy_parallel if y.size >= PARALLEL_THRESHOLD else _axpy_serial)(a, x, y)
    else:
        if _CUPY_AXPY is None:
            _CUPY_AXPY = cupy.ElementwiseKernel("T x, T a", "T y", "y += a * x", "fastopt_axpy")
        _CUPY_AXPY(x, a, y)
    return y


def _is_array(obj: Any) -> bool:
    return isinstance(obj, np.ndarray) or (cupy is not None and isinstance(obj, cupy.ndarray))


class FlatParams:
    """The parameters as one vector x (what an optimizer updates) and the closure's gradient.

    ``params`` is one of:

    * a :class:`fastopt.ParamBuffer`: x is ``buf.arena`` itself (updated in place, no copy);
      the closure returns the loss and has written the gradient into ``buf.grads`` /
      ``buf.grad_arena`` (as a ``fastopt.nn`` backward pass does). The alignment padding of
      the arena is part of x, and stays zero (its gradient is zero). With ``packed=True``
      (Newton, whose user callables see x) x is the parameters without the padding.
    * a list of arrays (NumPy or CuPy, one dtype and device): x is their concatenation; the
      optimizer writes each change back into the arrays (one copy per array per change);
      the closure returns ``(loss, grads)``, grads a list of arrays matching params.
    * one array: as a one-element list, but a C-contiguous array IS x (no copy); the closure
      returns ``(loss, grad)``.

    The gradient handed to the optimizer is always a fresh copy: the closure may reuse its
    buffers on the next call. ``packed`` defaults to False.
    """

    def __init__(self, params: Params, packed: bool = False) -> None:
        self.buffer = params if isinstance(params, ParamBuffer) else None
        if self.buffer is not None:
            arrays = list(self.buffer.params)
        elif _is_array(params):
            arrays = [params]
        else:
            try:
                arrays = list(params)
            except TypeError:
                raise TypeError(f"params must be a ParamBuffer, an array or a list of arrays, "
                                f"got {type(params).__name__}") from None
            if not arrays:
                raise ValueError("params is empty")
        for i, a in enumerate(arrays):
            if not _is_array(a):
                raise TypeError(f"params[{i}] must be a NumPy or CuPy array, got {type(a).__name__}")
            if a.dtype.kind != "f":
                raise TypeError(f"params[{i}] has dtype {a.dtype}; parameters must be floating point")
            if type(a) is not type(arrays[0]):
                raise ValueError(f"params[{i}] is on another device than params[0]")
            if a.dtype != arrays[0].dtype:
                raise TypeError(f"params[{i}] has dtype {a.dtype} but params[0] has dtype {arrays[0].dtype}")
            if isinstance(a, np.ndarray) and not a.flags.writeable:
                raise ValueError(f"params[{i}] is read-only; it is updated in place")
        self.arrays, self.single = arrays, _is_array(params)
        self.xp, self.dtype = array_module(arrays[0]), arrays[0].dtype
        self.sizes = [int(a.size) for a in arrays]
        # x as one writeable view, where the storage allows it
        self.x = None
        if self.buffer is not None and not (packed and self.buffer.arena.size != self.buffer.numel):
            self.x = self.buffer.arena
        elif self.single and arrays[0].flags.c_contiguous:
            self.x = arrays[0].reshape(-1)
        self.n = self.x.size if self.x is not None else sum(self.sizes)

    def _chunks(self, v: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        o = 0
        for a, size in zip(self.arrays, self.sizes):
            yield a, v[o:o + size].reshape(a.shape)
            o += size

    def clone(self, out: np.ndarray | None = None) -> np.ndarray:
        """A copy of x (into ``out`` when given)."""
        out = self.xp.empty(self.n, self.dtype) if out is None else out
        if self.x is not None:
            out[...] = self.x
        else:
            for a, chunk in self._chunks(out):
                chunk[...] = a
        return out

    def assign(self, v: np.ndarray) -> None:
        """x = v."""
        if self.x is not None:
            self.x[...] = v
        else:
            for a, chunk in self._chunks(v):
                a[...] = chunk

    def add_(self, t: float, d: np.ndarray) -> None:
        """x += t * d."""
        if self.x is not None:
            axpy(t, d, self.x)
        else:
            for a, chunk in self._chunks(d):
                a += t * chunk

    def evaluate(self, closure: Closure) -> tuple[float, np.ndarray]:
        """Call the closure; return (loss as a float, a copy of the flat gradient)."""
        result = closure()
        if self.buffer is not None:
            if isinstance(result, tuple):
                raise TypeError("with a ParamBuffer the closure returns the loss only and writes "
                                "the gradient into buf.grads / buf.grad_arena")
            if self.x is not None:
                return float(result), self.buffer.grad_arena.copy()
            return float(result), self.xp.concatenate([g.reshape(-1) for g in self.buffer.grads])
        if not (isinstance(result, tuple) and len(result) == 2):
            raise TypeError("with arrays as params the closure returns (loss, grads), "
                            f"got {type(result).__name__}")
        loss, grads = result
        if self.single and _is_array(grads):
            grads = [grads]
        grads = list(grads)
        if len(grads) != len(self.arrays):
            raise ValueError(f"the closure returned {len(grads)} gradients for {len(self.arrays)} params")
        for i, (g, size) in enumerate(zip(grads, self.sizes)):
            if int(g.size) != size:
                raise ValueError(f"gradient {i} has {g.size} elements but params[{i}] has {size}")
        flat = self.xp.concatenate([self.xp.asarray(g, self.dtype).reshape(-1) for g in grads])
        return float(loss), flat


def cubic_interpolate(x1: float, f1: float, g1: float, x2: float, f2: float, g2: float,
                      bounds: tuple[float, float] | None = None) -> float:
    """Minimizer of the cubic through (x1, f1, f'=g1) and (x2, f2, f'=g2), clipped to
    ``bounds`` (default [min(x1,x2), max(x1,x2)]); the midpoint when the cubic has none."""
    xmin_bound, xmax_bound = bounds if bounds is not None else ((x1, x2) if x1 <= x2 else (x2, x1))
    d1 = g1 + g2 - 3 * (f1 - f2) / (x1 - x2)
    d2_square = d1 ** 2 - g1 * g2
    if d2_square >= 0:
        d2 = math.sqrt(d2_square)
        if x1 <= x2:
            min_pos = x2 - (x2 - x1) * ((g2 + d2 - d1) / (g2 - g1 + 2 * d2))
        else:
            min_pos = x1 - (x1 - x2) * ((g1 + d2 - d1) / (g1 - g2 + 2 * d2))
        return min(max(min_pos, xmin_bound), xmax_bound)
    return (xmin_bound + xmax_bound) / 2.0


def strong_wolfe(obj_func: Callable[[np.ndarray, float, np.ndarray], tuple[float, np.ndarray]], x: np.ndarray,
                 t: float, d: np.ndarray, f: float, g: np.ndarray, gtd: float, c1: float = 1e-4, c2: float = 0.9,
                 tolerance_change: float = 1e-9, max_ls: int = 25) -> tuple[float, np.ndarray, float, int]:
    """Step t along d with f(x + t d) <= f + c1 t g.d and |g(x + t d).d| <= c2 |g.d|.

    ``obj_func(x, t, d) -> (loss, grad)`` evaluates at x + t d; ``t`` is the first trial step,
    ``f``, ``g``, ``gtd`` the loss, gradient and g.d at x. Defaults: c1 = 1e-4, c2 = 0.9,
    ``tolerance_change=1e-9`` (the smallest bracket, times max|d|), ``max_ls=25`` evaluations.
    Bracketing phase then zoom phase, as torch's ``_strong_wolfe`` (itself from torch7's
    lswolfe.lua). Returns (f_new, g_new, t, function evaluations)."""
    xp = array_module(d)
    dot = lambda a, b: float(xp.dot(a, b))  # noqa: E731
    d_norm = float(xp.abs(d).max())
    f_new, g_new = obj_func(x, t, d)
    ls_func_evals = 1
    gtd_new = dot(g_new, d)

    # bracket an interval containing a point satisfying the Wolfe criteria
    t_prev, f_prev, g_prev, gtd_prev = 0, f, g, gtd
    done = False
    ls_iter = 0
    while ls_iter < max_ls:
        if f_new > (f + c1 * t * gtd) or (ls_iter > 1 and f_new >= f_prev):
            bracket, bracket_f = [t_prev, t], [f_prev, f_new]
            bracket_g, bracket_gtd = [g_prev, g_new], [gtd_prev, gtd_new]
            break
        if abs(gtd_new) <= -c2 * gtd:
            bracket, bracket_f, bracket_g = [t], [f_new], [g_new]
            done = True
            break
        if gtd_new >= 0:
            bracket, bracket_f = [t_prev, t], [f_prev, f_new]
            bracket_g, bracket_gtd = [g_prev, g_new], [gtd_prev, gtd_new]
            break
        # extrapolate: the cubic's minimizer within [t + 0.01 (t - t_prev), 10 t]
        min_step = t + 0.01 * (t - t_prev)
        max_step = t * 10
        tmp = t
        t = cubic_interpolate(t_prev, f_prev, gtd_prev, t, f_new, gtd_new, bounds=(min_step, max_step))
        t_prev, f_prev, g_prev, gtd_prev = tmp, f_new, g_new, gtd_new
        f_new, g_new = obj_func(x, t, d)
        ls_func_evals += 1
        gtd_new = dot(g_new, d)
        ls_iter += 1

    if ls_iter == max_ls:  # out of evaluations: keep the better of 0 and t
        bracket, bracket_f, bracket_g = [0, t], [f, f_new], [g, g_new]

    # zoom: shrink the bracket until a point satisfies the criteria
    insuf_progress = False
    low_pos, high_pos = (0, 1) if bracket_f[0] <= bracket_f[-1] else (1, 0)
    while not done and ls_iter < max_ls:
        if abs(bracket[1] - bracket[0]) * d_norm < tolerance_change:
            break
        t = cubic_interpolate(bracket[0], bracket_f[0], bracket_gtd[0],
                              bracket[1], bracket_f[1], bracket_gtd[1])
        # a trial point too close to an end of the bracket twice in a row (or outside it)
        # is moved 10% of the bracket inside, so the bracket keeps shrinking
        eps = 0.1 * (max(bracket) - min(bracket))
        if min(max(bracket) - t, t - min(bracket)) < eps:
            if insuf_progress or t >= max(bracket) or t <= min(bracket):
                if abs(t - max(bracket)) < abs(t - min(bracket)):
                    t = max(bracket) - eps
                else:
                    t = min(bracket) + eps
                insuf_progress = False
            else:
                insuf_progress = True
        else:
            insuf_progress = False

        f_new, g_new = obj_func(x, t, d)
        ls_func_evals += 1
        gtd_new = dot(g_new, d)
        ls_iter += 1

        if f_new > (f + c1 * t * gtd) or f_new >= bracket_f[low_pos]:
            # not sufficiently lower: t becomes the high end
            bracket[high_pos], bracket_f[high_pos] = t, f_new
            bracket_g[high_pos], bracket_gtd[high_pos] = g_new, gtd_new
            low_pos, high_pos = (0, 1) if bracket_f[0] <= bracket_f[1] else (1, 0)
        else:
            if abs(gtd_new) <= -c2 * gtd:
                done = True
            elif gtd_new * (bracket[high_pos] - bracket[low_pos]) >= 0:
                # old low becomes the high end
                bracket[high_pos], bracket_f[high_pos] = bracket[low_pos], bracket_f[low_pos]
                bracket_g[high_pos], bracket_gtd[high_pos] = bracket_g[low_pos], bracket_gtd[low_pos]
            bracket[low_pos], bracket_f[low_pos] = t, f_new
            bracket_g[low_pos], bracket_gtd[low_pos] = g_new, gtd_new

    return bracket_f[low_pos], bracket_g[low_pos], bracket[low_pos], ls_func_evals


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _nonneg(name: str, value: Any) -> float:
    if not (isinstance(value, (int, float, np.floating, np.integer)) and 0 <= value < math.inf):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


class LBFGS:
    """``LBFGS(params, lr=1, max_iter=20, max_eval=None, tolerance_grad=1e-7,
    tolerance_change=1e-9, history_size=10, line_search="strong_wolfe")``

    ``torch.optim.LBFGS`` semantics: ``step(closure)`` runs up to ``max_iter`` iterations
    and ``max_eval`` (default ``max_iter * 5 // 4``) closure calls, stops early when
    max|g| <= tolerance_grad, when g.d > -tolerance_change, when max|t d| <= tolerance_change
    or when the loss changes by less than tolerance_change, and returns the loss of its
    first closure call. The history carries over from one ``step`` to the next.
    ``line_search``: "strong_wolfe" or None (fixed step ``lr``; PyTorch's default is None
    and ``history_size=100``, given explicitly for a like-for-like run).

    ``params`` and the closure's contract: see :class:`FlatParams` (a ParamBuffer: the
    closure returns the loss and writes ``buf.grads``; arrays: it returns ``(loss, grads)``).
    """

    def __init__(self, params: Params, lr: float = 1.0, max_iter: int = 20, max_eval: int | None = None,
                 tolerance_grad: float = 1e-7, tolerance_change: float = 1e-9, history_size: int = 10,
                 line_search: str | None = "strong_wolfe") -> None:
        self.hyper = self._check(dict(lr=lr, max_iter=max_iter, max_eval=max_eval, tolerance_grad=tolerance_grad,
                                      tolerance_change=tolerance_change, history_size=history_size,
                                      line_search=line_search))
        self.params = FlatParams(params)
        self.func_evals, self.n_iter = 0, 0
        self.t, self.H_diag, self.prev_loss = None, 1.0, None
        self._allocated = False

    @staticmethod
    def _check(h: dict[str, Any]) -> dict[str, Any]:
        if not (isinstance(h["lr"], (int, float, np.floating, np.integer)) and 0 < h["lr"] < math.inf):
            raise ValueError(f"lr must be > 0, got {h['lr']!r}")
        h["lr"] = float(h["lr"])
        h["max_iter"] = _positive_int("max_iter", h["max_iter"])
        h["max_eval"] = h["max_iter"] * 5 // 4 if h["max_eval"] is None else _positive_int("max_eval", h["max_eval"])
        h["history_size"] = _positive_int("history_size", h["history_size"])
        for name in ("tolerance_grad", "tolerance_change"):
            h[name] = _nonneg(name, h[name])
        if h["line_search"] not in (None, "strong_wolfe"):
            raise ValueError(f"line_search must be 'strong_wolfe' or None, got {h['line_search']!r}")
        return h

    def _allocate(self):
        xp, n, m, dt = self.params.xp, self.params.n, self.hyper["history_size"], self.params.dtype
        self._old_dirs, self._old_stps = xp.empty((m, n), dt), xp.empty((m, n), dt)  # y_i, s_i rows
        self._ro, self._al = np.empty(m), np.empty(m)
        self._start, self._count = 0, 0  # the ring: rows start, start+1, ... (mod m), oldest first
        self._d, self._prev_flat_grad = xp.empty(n, dt), xp.empty(n, dt)
        self._y, self._s, self._x0 = xp.empty(n, dt), xp.empty(n, dt), xp.empty(n, dt)
        self._allocated = True

    def _order(self):
        m = self.hyper["history_size"]
        return [(self._start + k) % m for k in range(self._count)]

    def _push(self, y, s, ro):
        m = self.hyper["history_size"]
        if self._count == m:  # full: overwrite the oldest
            row, self._start = self._start, (self._start + 1) % m
        else:
            row = (self._start + self._count) % m
            self._count += 1
        self._old_dirs[row], self._old_stps[row], self._ro[row] = y, s, ro

    def _direction(self, flat_grad):
        """d = -H g by the two-loop recursion, in the buffer self._d."""
        xp, q, al, ro = self.params.xp, self._d, self._al, self._ro
        xp.negative(flat_grad, out=q)
        order = self._order()
        for i in reversed(order):
            al[i] = float(xp.dot(self._old_stps[i], q)) * ro[i]
            axpy(-al[i], self._old_dirs[i], q)
        q *= self.H_diag
        r = q
        for i in order:
            be_i = float(xp.dot(self._old_dirs[i], r)) * ro[i]
            axpy(al[i] - be_i, self._old_stps[i], r)

    def _directional_evaluate(self, closure, x, t, d):
        self.params.add_(t, d)
        loss, flat_grad = self.params.evaluate(closure)
        self.params.assign(x)
        return loss, flat_grad

    def step(self, closure: Closure) -> float:
        """Up to max_iter L-BFGS iterations; returns the loss at the starting point."""
        h = self.hyper
        lr, max_iter, max_eval = h["lr"], h["max_iter"], h["max_eval"]
        tolerance_grad, tolerance_change = h["tolerance_grad"], h["tolerance_change"]
        xp, params = self.params.xp, self.params
        if not self._allocated:
            self._allocate()
        max_abs = lambda v: float(xp.abs(v).max())  # noqa: E731

        loss, flat_grad = params.evaluate(closure)
        orig_loss, current_evals = loss, 1
        self.func_evals += 1
        if max_abs(flat_grad) <= tolerance_grad:
            return orig_loss

        d, t = self._d, self.t
        n_iter = 0
        while n_iter < max_iter:
            n_iter += 1
            self.n_iter += 1
            if self.n_iter == 1:
                xp.negative(flat_grad, out=d)
                self._start, self._count, self.H_diag = 0, 0, 1.0
            else:
                y = xp.subtract(flat_grad, self._prev_flat_grad, out=self._y)
                s = xp.multiply(d, t, out=self._s)
                ys = float(xp.dot(y, s))
                if ys > 1e-10:  # else the pair would break positive definiteness: skip it
                    self._push(y, s, 1.0 / ys)
                    self.H_diag = ys / float(xp.dot(y, y))
                self._direction(flat_grad)
            self._prev_flat_grad[...] = flat_grad
            prev_loss = self.prev_loss = loss

            t = min(1.0, 1.0 / float(xp.abs(flat_grad).sum())) * lr if self.n_iter == 1 else lr
            gtd = float(xp.dot(flat_grad, d))
            if gtd > -tolerance_change:  # not a descent direction (to tolerance)
                break

            ls_func_evals = 0
            if h["line_search"] == "strong_wolfe":
                x_init = params.clone(out=self._x0)
                loss, flat_grad, t, ls_func_evals = strong_wolfe(
                    lambda x, t_, d_: self._directional_evaluate(closure, x, t_, d_),
                    x_init, t, d, loss, flat_grad, gtd, max_ls=max_eval - current_evals)
                params.add_(t, d)
                opt_cond = max_abs(flat_grad) <= tolerance_grad
            else:
                params.add_(t, d)
                if n_iter != max_iter:  # the last iteration's loss is the next step's first call
                    loss, flat_grad = params.evaluate(closure)
                    opt_cond = max_abs(flat_grad) <= tolerance_grad
                    ls_func_evals = 1
            current_evals += ls_func_evals
            self.func_evals += ls_func_evals

            if n_iter == max_iter or current_evals >= max_eval or opt_cond:
                break
            if abs(t) * max_abs(d) <= tolerance_change:  # = max|t d|: the step no longer moves x
                break
            if abs(loss - prev_loss) < tolerance_change:
                break
        self.t = t
        return orig_loss

    def state_dict(self) -> dict[str, Any]:
        """Hyper-parameters and state under PyTorch's names (arrays are copies; the history
        as lists, oldest pair first)."""
        state = dict(func_evals=self.func_evals, n_iter=self.n_iter, t=self.t, H_diag=self.H_diag,
                     prev_loss=self.prev_loss, d=None, prev_flat_grad=None, old_dirs=[], old_stps=[], ro=[])
        if self._allocated and self.n_iter > 0:
            order = self._order()
            state.update(d=self._d.copy(), prev_flat_grad=self._prev_flat_grad.copy(),
                         old_dirs=[self._old_dirs[i].copy() for i in order],
                         old_stps=[self._old_stps[i].copy() for i in order],
                         ro=[float(self._ro[i]) for i in order])
        return {"state": state, "hyper": dict(self.hyper)}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict` (hyper-parameters, checked, and the history) taken
        from an LBFGS over the same number of parameters; the arrays are copied in."""
        hyper = self._check(dict(state_dict["hyper"]))
        s = state_dict["state"]
        if len(s["old_dirs"]) > hyper["history_size"]:
            raise ValueError(f"state_dict holds {len(s['old_dirs'])} pairs, more than history_size "
                             f"{hyper['history_size']}")
        for name in ("d", "prev_flat_grad"):
            if s[name] is not None and s[name].shape != (self.params.n,):
                raise ValueError(f"state_dict[{name!r}] has shape {s[name].shape}, params have {self.params.n}")
        self.hyper = hyper
        self._allocate()
        self.func_evals, self.n_iter, self.t = s["func_evals"], s["n_iter"], s["t"]
        self.H_diag, self.prev_loss = s["H_diag"], s["prev_loss"]
        if s["d"] is not None:
            self._d[...], self._prev_flat_grad[...] = s["d"], s["prev_flat_grad"]
        for y, st, ro in zip(s["old_dirs"], s["old_stps"], s["ro"]):
            self._push(y, st, ro)
