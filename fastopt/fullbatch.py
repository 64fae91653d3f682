"""Full-batch L2-regularized softmax regression: the objective with its gradient and exact
Hessian, and a closure over a ParamBuffer for the optimizers that take one (LBFGS, Newton).
The application's runs on it (``fastopt compare --model logreg``) are :mod:`fastopt.app.fullbatch`;
``benchmarks/test_second_order.py`` times the methods on it.

The objective, for features x_i (the flattened image and a trailing 1, whose weight row is
the bias) and W of shape (D+1, K):

    f(W)    = 1/N sum_i [logsumexp(z_i) - z_i[y_i]] + l2/2 |W|^2,     z_i = x_i W
    grad f  = X^T (P - Y) / N + l2 W,                                  P = softmax(X W), Y one-hot
    Hess f  = 1/N sum_i (x_i x_i^T) (x) (diag p_i - p_i p_i^T) + l2 I,  entry (d K + k, e K + l)

The bias is penalized too: f is then strictly convex (an unpenalized bias has a flat
direction, the same constant added to every class), so f* and its minimizer are unique.
The model is linear in W, so the Hessian is also the Gauss-Newton matrix.

A closure call at weights already evaluated in this iteration or at its start (the next
L-BFGS step starts where the line search ended; Newton restores x after a rejection) is
answered from memory and not counted: "calls" are real evaluations of f and grad f, the
same count as one long ``LBFGS(max_iter=N)`` run.
"""
import contextlib

from .newton import softmax_hessian
from .nn import softmax_cross_entropy
from .nn._array import array_module


class SoftmaxRegression:
    """f, grad f and the Hessian above, for features ``x`` (N, ...) (flattened here, a column
    of ones appended), integer labels ``y`` and ``n_classes``. ``loss_grad`` and ``hessian``
    take W as (D+1, K) or flat (n,), the row-major flattening (index d K + k); NumPy or CuPy."""

    def __init__(self, x, y, n_classes, l2):
        xp = array_module(x)
        x = x.reshape(len(x), -1)
        self.x = xp.concatenate([x, xp.ones((len(x), 1), x.dtype)], axis=1)
        self.y, self.l2 = y, float(l2)
        self.shape = (self.x.shape[1], int(n_classes))
        self.n = self.shape[0] * self.shape[1]

    def logits(self, w, x=None):
        """z = x W for the features of this objective, or for ``x`` (N, ...) given without the 1."""
        W = w.reshape(self.shape)
        if x is None:
            return self.x @ W
        x = x.reshape(len(x), -1)
        return x @ W[:-1] + W[-1]

    def loss_grad(self, w):
        """(f(W) as a float, grad f in the shape of ``w``)."""
        W = w.reshape(self.shape)
        loss, dz = softmax_cross_entropy(self.x @ W, self.y)  # dz = (P - Y) / N
        f = float(loss) + 0.5 * self.l2 * float((W * W).sum())
        return f, (self.x.T @ dz + self.l2 * W).reshape(w.shape)

    def hessian(self, w):
        """The (n, n) Hessian: one (D+1, D+1) block X^T diag(s_kl) X per class pair (k, l), with
        s_kl the (k, l) entries of the per-sample softmax Hessians (fastopt.newton.softmax_hessian)."""
        xp = array_module(self.x)
        z = self.logits(w)
        e = xp.exp(z - z.max(axis=1, keepdims=True))
        S = softmax_hessian(e / e.sum(axis=1, keepdims=True)) / len(self.x)
        (d, K), x = self.shape, self.x
        H = xp.empty((d, K, d, K), x.dtype)
        for k in range(K):
            for m in range(k, K):  # symmetric in (k, m): half the products
                H[:, k, :, m] = block = x.T @ (x * S[:, k, m, None])
                H[:, m, :, k] = block
        H = H.reshape(self.n, self.n)
        H[xp.arange(self.n), xp.arange(self.n)] += self.l2
        return H


class Closure:
    """The full-batch closure over a ParamBuffer holding W: returns f and writes grad f into
    ``buffer.grads``; ``calls`` counts real evaluations (see the module docstring)."""

    def __init__(self, objective, buffer):
        self.objective, self.buffer = objective, buffer
        self.w, self.grad = buffer.params[0], buffer.grads[0]
        self.xp = array_module(self.w)
        self.calls, self._seen = 0, []  # [(W, f, grad f)] since the start of the iteration

    def __call__(self):
        for w, f, g in self._seen:
            if bool(self.xp.array_equal(w, self.w)):
                self.grad[...] = g
                return f
        f, g = self.objective.loss_grad(self.w)
        self.calls += 1
        self._seen.append((self.w.copy(), f, g))
        self.grad[...] = g
        return f

    def new_iteration(self):
        """Forget every evaluation but the one at the current weights."""
        self._seen = [s for s in self._seen if bool(self.xp.array_equal(s[0], self.w))]


def one_blas_thread():
    """BLAS on one thread: NumPy's and SciPy's OpenBLAS pools spin against each other on a
    small machine (SciPy's L-BFGS-B ran many times slower with both at 2 threads)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(1)


