"""Damped Newton / Gauss-Newton steps with Levenberg-Marquardt control of the damping.

Each step minimizes the local quadratic model with the curvature C damped by lambda
(the trust-region view: a larger lambda is a smaller trust region, and the step turns from
Newton's toward a short gradient step):

    (C + lambda I) d = -g,      solved by Cholesky: C + lambda I = L L^T

C is the Hessian (``curvature="hessian"``, from a user callable) or the Gauss-Newton
matrix G = J^T H_out J (``curvature="gauss_newton"``), J the Jacobian of the model's
outputs z w.r.t. the parameters and H_out the Hessian of the loss w.r.t. z: always positive
semi-definite, and equal to the Hessian when the model is linear in the parameters (least
squares, softmax regression).

Levenberg-Marquardt (``adapt=True``): the step x + d is tried; a loss no higher accepts it and
multiplies lambda by ``decrease``; otherwise x is restored, lambda is multiplied by
``increase`` (and raised to at least 1e-6 max|diag C|, which also moves it off 0) and the
solve repeated, at most ``max_tries`` solves per step and lambda at most ``max_damping``.
A damped matrix that is not positive definite counts as a rejection (without a closure
call). O(n^2) memory and O(n^3) time per step: for small problems.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from types import ModuleType

import numpy as np

from .lbfgs import Closure, FlatParams, Params, _nonneg, _positive_int
from .nn._array import array_module

#: the loss Hessian w.r.t. the outputs: a number s (s I), an (m, m) array or (N, K, K) blocks
LossHessian = float | np.ndarray

CURVATURES = ("hessian", "gauss_newton")


def softmax_hessian(probs: np.ndarray) -> np.ndarray:
    """Per-sample Hessian of the cross-entropy w.r.t. the logits: diag(p_i) - p_i p_i^T.

    probs: (N, K) softmax outputs -> (N, K, K) blocks (the loss Hessian of the whole batch
    is block diagonal; divide by N for a mean over the batch)."""
    eye = array_module(probs).eye(probs.shape[1], dtype=probs.dtype)
    return probs[:, :, None] * eye - probs[:, :, None] * probs[:, None, :]


def gauss_newton_matrix(J: np.ndarray, loss_hessian: LossHessian = 1.0) -> np.ndarray:
    """G = J^T H_out J for a Jacobian J and a loss Hessian H_out w.r.t. the outputs.

    J: (m, n) (m outputs, n parameters) or (N, K, n) (N samples of K outputs each).
    loss_hessian (default 1.0), one of:
      a number s        H_out = s I: least squares ``0.5 |r|^2`` -> 1, ``|r|^2`` -> 2,
                        ``mean(r^2)`` -> 2 / m;
      an (m, m) array   the full H_out (m = N K for a 3-D J);
      an (N, K, K) array, with a 3-D J: the per-sample blocks of a block-diagonal H_out,
                        e.g. ``softmax_hessian(p) / N`` for a mean cross-entropy.
    """
    if J.ndim not in (2, 3):
        raise ValueError(f"jacobian must be 2-D (m, n) or 3-D (N, K, n), got shape {J.shape}")
    n = J.shape[-1]
    flat = J.reshape(-1, n)
    if np.ndim(loss_hessian) == 0:
        return float(loss_hessian) * (flat.T @ flat)
    H = loss_hessian
    if H.ndim == 3:
        if J.ndim != 3 or H.shape != (J.shape[0], J.shape[1], J.shape[1]):
            raise ValueError(f"loss_hessian blocks have shape {H.shape}; a jacobian of shape {J.shape} "
                             f"needs ({J.shape[0] if J.ndim == 3 else 'N'}, K, K) blocks with a 3-D jacobian")
        return flat.T @ (H @ J).reshape(-1, n)
    if H.shape != (flat.shape[0],) * 2:
        raise ValueError(f"loss_hessian has shape {H.shape}; the jacobian has {flat.shape[0]} outputs")
    return flat.T @ (H @ flat)


def _triangular_solver(xp: ModuleType) -> Callable[..., np.ndarray]:
    if xp is np:
        from scipy.linalg import solve_triangular
    else:
        from cupyx.scipy.linalg import solve_triangular
    return solve_triangular


def cholesky_solve(A: np.ndarray, b: np.ndarray) -> np.ndarray | None:
    """x with A x = b for a symmetric positive definite A, or None if A is not (numerically)
    positive definite."""
    xp = array_module(A)
    try:
        L = xp.linalg.cholesky(A)
    except np.linalg.LinAlgError:
        return None
    if not bool(xp.isfinite(L).all()):  # CuPy reports a failed factorization as NaNs
        return None
    solve = _triangular_solver(xp)
    return solve(L, solve(L, b, lower=True), lower=True, trans=1)


class Newton:
    """``Newton(params, damping=1e-3, curvature="hessian", hessian=None, jacobian=None,
    loss_hessian=1.0, adapt=True, increase=10, decrease=0.1, max_damping=1e10, max_tries=10,
    tolerance_grad=1e-10)``

    ``step(closure)``: the closure is LBFGS's (:class:`fastopt.lbfgs.FlatParams`: with a
    ParamBuffer it returns the loss and writes ``buf.grads``; with arrays it returns
    ``(loss, grads)``). x below is the flat parameter vector (the arrays' concatenation,
    without a ParamBuffer's padding), n its length; the callables get a copy of x.

    curvature="hessian":      ``hessian(x) -> (n, n)`` array.
    curvature="gauss_newton": ``jacobian(x) -> (m, n) or (N, K, n)`` array of the outputs'
                              derivatives, and ``loss_hessian``: a number, an array, or a
                              callable ``loss_hessian(x)`` returning one
                              (see :func:`gauss_newton_matrix`).

    After a step: ``damping`` (lambda for the next step), ``last_step_accepted``,
    ``n_iter`` (steps taken), ``func_evals`` (closure calls). A step returns the loss at the
    starting point; at a point with max|g| <= tolerance_grad it does nothing else (no solve,
    and ``n_iter`` is not counted). The closure must be deterministic (full batch): the loss
    and gradient of an accepted trial point are reused by the next step when the parameters
    have not changed in between, so a run of accepted steps costs one closure call each.
    With ``adapt=False`` every step is taken with the fixed damping and needs no trial
    evaluation. After a rejected trial, a ParamBuffer's grads hold the gradient there.
    """

    def __init__(self, params: Params, damping: float = 1e-3, curvature: str = "hessian",
                 hessian: Callable[[np.ndarray], np.ndarray] | None = None,
                 jacobian: Callable[[np.ndarray], np.ndarray] | None = None,
                 loss_hessian: LossHessian | Callable[[np.ndarray], LossHessian] = 1.0, adapt: bool = True,
                 increase: float = 10.0, decrease: float = 0.1, max_damping: float = 1e10, max_tries: int = 10,
                 tolerance_grad: float = 1e-10) -> None:
        if not (isinstance(damping, (int, float, np.floating, np.integer)) and 0 <= damping < math.inf):
            raise ValueError(f"damping must be a finite number >= 0, got {damping!r}")
        if curvature not in CURVATURES:
            raise ValueError(f"curvature must be 'hessian' or 'gauss_newton', got {curvature!r}")
        if curvature == "hessian" and not callable(hessian):
            raise ValueError("hessian must be a callable hessian(x) -> (n, n) array when curvature='hessian'")
        if curvature == "gauss_newton" and not callable(jacobian):
            raise ValueError("jacobian must be a callable jacobian(x) -> (m, n) array when curvature='gauss_newton'")
        if not (increase > 1):
            raise ValueError(f"increase must be > 1, got {increase!r}")
        if not (0 < decrease < 1):
            raise ValueError(f"decrease must be in (0, 1), got {decrease!r}")
        if not (max_damping > damping):
            raise ValueError(f"max_damping must be > damping ({damping}), got {max_damping!r}")
        self.max_tries = _positive_int("max_tries", max_tries)
        self.tolerance_grad = _nonneg("tolerance_grad", tolerance_grad)
        self.params = FlatParams(params, packed=True)
        self.curvature, self.hessian, self.jacobian, self.loss_hessian = curvature, hessian, jacobian, loss_hessian
        self.damping, self.adapt = float(damping), bool(adapt)
        self.increase, self.decrease, self.max_damping = float(increase), float(decrease), float(max_damping)
        self.n_iter, self.func_evals, self.last_step_accepted = 0, 0, None
        self._cache = None  # (x, loss, grad) at the current point, when known

    def curvature_matrix(self, x: np.ndarray) -> np.ndarray:
        """C(x): the Hessian, or the Gauss-Newton matrix J^T H_out J."""
        if self.curvature == "hessian":
            C = self.hessian(x)
        else:
            H = self.loss_hessian(x) if callable(self.loss_hessian) else self.loss_hessian
            C = gauss_newton_matrix(self.jacobian(x), H)
        if C.shape != (self.params.n, self.params.n):
            raise ValueError(f"the {self.curvature} matrix has shape {C.shape}; params have n={self.params.n}")
        return C

    def _evaluate(self, closure: Closure) -> tuple[float, np.ndarray]:
        self.func_evals += 1
        return self.params.evaluate(closure)

    def _raised(self, C: np.ndarray) -> float:
        # at least 1e-6 of C's scale: from 0, or from a lambda that many accepted steps made
        # negligible, one raise must already change the step
        scale = float(self.params.xp.abs(self.params.xp.diagonal(C)).max())
        return max(self.damping * self.increase, 1e-6 * scale if scale > 0 else 1e-6)

    def step(self, closure: Closure) -> float:
        """One damped Newton step (with up to max_tries solves); returns the starting loss."""
        xp, params = self.params.xp, self.params
        x = params.clone()
        if self._cache is not None and bool(xp.array_equal(self._cache[0], x)):
            _, loss, g = self._cache
        else:
            loss, g = self._evaluate(closure)
        self._cache = (x, loss, g)  # kept if every trial is rejected: x is restored
        if float(xp.abs(g).max()) <= self.tolerance_grad:
            return loss
        C = self.curvature_matrix(x.copy())
        diagonal = xp.arange(params.n)
        self.n_iter += 1
        self.last_step_accepted = False
        for _ in range(self.max_tries):
            A = C.copy()
            A[diagonal, diagonal] += self.damping
            d = cholesky_solve(A, -g)
            if d is None:  # not positive definite: more damping, if allowed
                if not self.adapt:
                    raise np.linalg.LinAlgError(
                        f"C + {self.damping:g} I is not positive definite; raise damping or use adapt=True")
            elif not self.adapt:
                params.add_(1.0, d)
                self.last_step_accepted = True
                break
            else:
                params.add_(1.0, d)
                new_loss, new_g = self._evaluate(closure)
                # a step that leaves the loss equal to the last bit still moves toward the
                # minimum near it (the loss is flat to float64 there): accept it; NaN rejects
                if new_loss <= loss:
                    self.last_step_accepted = True
                    self.damping *= self.decrease
                    self._cache = (params.clone(), new_loss, new_g)
                    break
                params.assign(x)
            self.damping = self._raised(C)
            if self.damping > self.max_damping:
                self.damping = self.max_damping
                break
        return loss
