"""fastopt.Newton: one exact step on ill-conditioned quadratics, Levenberg-Marquardt control
of the damping, Gauss-Newton fits, the Gauss-Newton matrix against finite differences,
softmax regression, bad input."""
import numpy as np
import pytest

from fastopt.buffer import ParamBuffer
from fastopt.newton import Newton, cholesky_solve, gauss_newton_matrix, softmax_hessian


def quadratic(n, cond, seed=0):
    """f = x'Ax/2 - b'x with A's eigenvalues log-spaced in [1, cond]; (A, b, x* = A^-1 b)."""
    rng = np.random.default_rng(seed)
    Q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    A = (Q * np.logspace(0, np.log10(cond), n)) @ Q.T
    A = (A + A.T) / 2
    b = rng.standard_normal(n)
    return A, b, np.linalg.solve(A, b)


def split_as(form, x0, fun):
    """params holding x0 as `form` (one array / two arrays / a padded ParamBuffer), the
    closure for fun(x) -> (f, g) on the flat x, and a reader of the current flat x."""
    k = len(x0) // 2
    if form == "array":
        x = x0.copy()
        return x, lambda: fun(x), lambda: x
    parts = [x0[:k].reshape(k, 1), x0[k:]]
    if form == "list":
        flat = lambda: np.concatenate([p.ravel() for p in parts])  # noqa: E731

        def closure():
            f, g = fun(flat())
            return f, [g[:k].reshape(k, 1), g[k:]]
        return parts, closure, flat
    buf = ParamBuffer(parts)
    assert buf.arena.size > buf.numel  # padding between the segments: Newton's x skips it
    flat = lambda: np.concatenate([p.ravel() for p in buf.params])  # noqa: E731

    def closure():
        f, g = fun(flat())
        buf.grads[0][...], buf.grads[1][...] = g[:k].reshape(k, 1), g[k:]
        return f
    return buf, closure, flat


@pytest.mark.parametrize("n,cond,form", [(6, 1e4, "array"), (20, 1e4, "list"), (21, 1e4, "buffer"),
                                         (40, 1e6, "array")])
def test_undamped_newton_solves_a_quadratic_in_one_step(n, cond, form):
    A, b, x_star = quadratic(n, cond)
    params, closure, read = split_as(form, np.zeros(n), lambda x: (0.5 * x @ A @ x - b @ x, A @ x - b))
    opt = Newton(params, damping=0.0, hessian=lambda x: A)
    opt.step(closure)
    assert opt.last_step_accepted and opt.damping == 0.0 and opt.n_iter == 1
    assert np.max(np.abs(read() - x_star)) <= 1e-10 * max(1.0, np.max(np.abs(x_star)))


def soft_abs(x):
    """f = sum sqrt(1 + x^2): convex, but a Newton step from |x| > 1 overshoots past -x."""
    r = np.sqrt(1 + x * x)
    return r.sum(), x / r


def soft_abs_hessian(x):
    return np.diag((1 + x * x) ** -1.5)


def double_well(x):
    """f = sum x^4/4 - x^2/2: Hessian 3x^2 - 1, negative near 0."""
    return np.sum(x ** 4 / 4 - x ** 2 / 2), x ** 3 - x


def double_well_hessian(x):
    return np.diag(3 * x * x - 1)


def quad2(x):
    return 0.5 * x @ x * 3, 3 * x


@pytest.mark.parametrize("fun,hess,x0,kw,check", [
    # a step that raises the loss is undone and lambda goes up by `increase`
    (soft_abs, soft_abs_hessian, [2.0], dict(damping=1e-3, max_tries=1),
     lambda o, x0, f0, f1: not o.last_step_accepted and o.damping == pytest.approx(1e-2) and f1 == f0),
    # an accepted step lowers lambda by `decrease`
    (quad2, lambda x: 3 * np.eye(len(x)), [1.0, -2.0], dict(damping=1e-3),
     lambda o, x0, f0, f1: o.last_step_accepted and o.damping == pytest.approx(1e-4) and f1 < f0),
    # rejections, then an accepted step: one solve and one closure call per try
    (soft_abs, soft_abs_hessian, [2.0], dict(damping=1e-3, increase=3.0),
     lambda o, x0, f0, f1: o.last_step_accepted and f1 < f0 and o.func_evals >= 3
     and o.damping == pytest.approx(1e-3 * 3.0 ** (o.func_evals - 2) * 0.1)),
    # from lambda = 0 a rejection sets lambda to 1e-6 max|diag C|
    (soft_abs, soft_abs_hessian, [2.0, 0.5], dict(damping=0.0, max_tries=1),
     lambda o, x0, f0, f1: not o.last_step_accepted and o.damping == pytest.approx(1e-6 * (1 + 0.25) ** -1.5)),
    # an indefinite Hessian: the Cholesky factorization fails (no closure call) until lambda > 1
    (double_well, double_well_hessian, [0.1], dict(damping=1e-3),
     lambda o, x0, f0, f1: o.last_step_accepted and f1 < f0 and o.damping > 0.1),
])
def test_levenberg_marquardt_adapts_the_damping(fun, hess, x0, kw, check):
    x = np.array(x0)
    opt = Newton(x, hessian=hess, **kw)
    f0 = fun(x)[0]
    opt.step(lambda: fun(x))
    assert check(opt, x0, f0, fun(x)[0])
    if not opt.last_step_accepted:
        np.testing.assert_array_equal(x, x0)  # a rejected step leaves the parameters as they were


T = np.linspace(0, 2, 25)
TRUE = np.array([2.0, -1.5])


def exponential_model(x):
    """z = a exp(b t): outputs and Jacobian (25, 2)."""
    e = np.exp(x[1] * T)
    return x[0] * e, np.stack([e, x[0] * T * e], axis=1)


@pytest.mark.parametrize("noise", [0.0, 0.05])
@pytest.mark.parametrize("loss,scale,loss_hessian", [
    ("0.5 sum r^2", 0.5, 1.0),
    ("sum r^2", 1.0, 2.0),
    ("mean r^2", 1.0 / len(T), 2.0 / len(T)),
    ("0.5 sum r^2, H as a matrix callable", 0.5, lambda x: np.eye(len(T))),
])
def test_gauss_newton_fits_an_exponential(noise, loss, scale, loss_hessian):
    y = exponential_model(TRUE)[0] + noise * np.random.default_rng(1).standard_normal(len(T))

    def fun(x):
        z, J = exponential_model(x)
        r = z - y
        return scale * r @ r, 2 * scale * J.T @ r
    x = np.array([1.0, 0.0])
    opt = Newton(x, curvature="gauss_newton", jacobian=lambda x: exponential_model(x)[1], loss_hessian=loss_hessian)
    for _ in range(30):
        opt.step(lambda: fun(x))
    if noise == 0:
        np.testing.assert_allclose(x, TRUE, atol=1e-8)
    else:
        from scipy import optimize
        ref = optimize.least_squares(lambda x: exponential_model(x)[0] - y, [1.0, 0.0],
                                     jac=lambda x: exponential_model(x)[1], xtol=1e-15, ftol=1e-15, gtol=1e-15)
        np.testing.assert_allclose(x, ref.x, atol=1e-8)


def softmax_regression(X, Y, l2=0.0):
    """w = W.ravel(), W (D, K): f = mean cross-entropy of softmax(X W) + l2/2 |w|^2.
    Returns fun(w) -> (f, g), probs(w), and the Jacobian of the logits, (N, K, D K)."""
    N, D = X.shape
    K = Y.shape[1]

    def probs(w):
        Z = X @ w.reshape(D, K)
        P = np.exp(Z - Z.max(1, keepdims=True))
        return P / P.sum(1, keepdims=True)

    def fun(w):
        P = probs(w)
        return -np.sum(Y * np.log(P)) / N + 0.5 * l2 * w @ w, (X.T @ (P - Y)).ravel() / N + l2 * w

    jacobian = np.einsum("nd,kl->nkdl", X, np.eye(K)).reshape(N, K, D * K)  # dz_nk / dW_dl
    return fun, probs, jacobian


def small_softmax_problem(N=30, D=4, K=3, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((N, D)), np.eye(K)[rng.integers(0, K, N)]


@pytest.mark.parametrize("form", ["(N, K, K) blocks", "(m, m) matrix"])
def test_gauss_newton_matrix_is_the_hessian_of_softmax_regression(form):
    X, Y = small_softmax_problem()
    fun, probs, J = softmax_regression(X, Y)
    w = np.random.default_rng(2).standard_normal(J.shape[-1])
    H = softmax_hessian(probs(w)) / len(X)
    if form == "(m, m) matrix":
        N, K = Y.shape
        full = np.zeros((N * K, N * K))
        for i in range(N):
            full[i * K:(i + 1) * K, i * K:(i + 1) * K] = H[i]
        H = full
    G = gauss_newton_matrix(J, H)
    # the model is linear in w, so G is the exact Hessian: compare with central differences
    h = 1e-5
    fd = np.stack([(fun(w + h * e)[1] - fun(w - h * e)[1]) / (2 * h) for e in np.eye(len(w))])
    np.testing.assert_allclose(G, fd, atol=1e-8)
    np.testing.assert_allclose(G, G.T, atol=1e-14)


def test_newton_on_l2_softmax_regression_converges_quadratically():
    X, Y = small_softmax_problem(N=200, D=6, K=4, seed=3)
    l2 = 1e-3
    fun, probs, J = softmax_regression(X, Y, l2)
    n = J.shape[-1]
    w = np.zeros(n)
    opt = Newton(w, damping=1e-3,
                 hessian=lambda w: gauss_newton_matrix(J, softmax_hessian(probs(w)) / len(X)) + l2 * np.eye(n))
    grads = []
    for _ in range(12):
        opt.step(lambda: fun(w))
        grads.append(np.max(np.abs(fun(w)[1])))
    assert grads[-1] <= opt.tolerance_grad and opt.n_iter < 12  # at the optimum, steps stop
    # quadratic convergence: once the gradient is small, each step roughly squares it
    close = next(i for i, g in enumerate(grads) if g < 1e-3)
    assert grads[close + 1] < 10 * grads[close] ** 2 + 1e-14
    # every step was accepted and the next one reused its trial evaluation: one closure call each
    assert opt.func_evals == opt.n_iter + 1


@pytest.mark.parametrize("A,ok", [(np.diag([1.0, 4.0]), True), (np.diag([1.0, -4.0]), False),
                                  (np.array([[1.0, 2.0], [2.0, 1.0]]), False)])
def test_cholesky_solve(A, ok):
    b = np.array([1.0, 2.0])
    x = cholesky_solve(A, b)
    assert (x is not None) == ok
    if ok:
        np.testing.assert_allclose(A @ x, b, rtol=1e-14)


def _quadratic_params():
    return np.zeros(3)


@pytest.mark.parametrize("kwargs,message", [
    (dict(damping=-1.0, hessian=np.eye), "damping must be a finite number >= 0"),
    (dict(damping=float("nan"), hessian=np.eye), "damping must be a finite number >= 0"),
    (dict(curvature="fisher", hessian=np.eye), "curvature must be 'hessian' or 'gauss_newton'"),
    ({}, "hessian must be a callable"),
    (dict(curvature="gauss_newton"), "jacobian must be a callable"),
    (dict(hessian=np.eye, increase=1.0), "increase must be > 1"),
    (dict(hessian=np.eye, decrease=1.0), r"decrease must be in \(0, 1\)"),
    (dict(hessian=np.eye, damping=1.0, max_damping=1.0), "max_damping must be > damping"),
    (dict(hessian=np.eye, max_tries=0), "max_tries must be a positive integer"),
    (dict(hessian=np.eye, tolerance_grad=-1.0), "tolerance_grad must be a finite number >= 0"),
])
def test_bad_arguments_name_the_argument(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Newton(_quadratic_params(), **kwargs)


@pytest.mark.parametrize("kwargs,exc,message", [
    (dict(hessian=lambda x: np.eye(4)), ValueError, r"hessian matrix has shape \(4, 4\); params have n=3"),
    (dict(curvature="gauss_newton", jacobian=lambda x: np.ones((5, 3)), loss_hessian=lambda x: np.eye(4)),
     ValueError, r"loss_hessian has shape \(4, 4\); the jacobian has 5 outputs"),
    (dict(curvature="gauss_newton", jacobian=lambda x: np.ones((5, 3)), loss_hessian=np.ones((5, 2, 2))),
     ValueError, "loss_hessian blocks have shape"),
    (dict(curvature="gauss_newton", jacobian=lambda x: np.ones(3)), ValueError, "jacobian must be 2-D"),
    (dict(hessian=lambda x: -np.eye(3), adapt=False), np.linalg.LinAlgError, "not positive definite"),
])
def test_bad_callables_are_reported_at_step(kwargs, exc, message):
    x = np.ones(3)
    opt = Newton(x, **kwargs)
    with pytest.raises(exc, match=message):
        opt.step(lambda: (float(x @ x), 2 * x))


def test_cupy_matches_numpy():
    cupy = pytest.importorskip("cupy")
    A, b, x_star = quadratic(30, 1e4)
    Ac, bc = cupy.asarray(A), cupy.asarray(b)
    x = cupy.zeros(30)
    opt = Newton(x, damping=0.0, hessian=lambda x: Ac)
    opt.step(lambda: (float(0.5 * x @ Ac @ x - bc @ x), Ac @ x - bc))
    np.testing.assert_allclose(cupy.asnumpy(x), x_star, atol=1e-10)
