"""fastopt.LBFGS: convergence (Rosenbrock, L2 softmax regression on the digits), agreement
with scipy's L-BFGS-B and step-for-step agreement with torch.optim.LBFGS, the three forms of
params, checkpoints, stopping rules and bad input."""
import copy
import functools

import numpy as np
import pytest

from fastopt.buffer import ParamBuffer
from fastopt.lbfgs import LBFGS, axpy

ROSEN_START = (-1.5, 2.0)
L2 = 1e-2


def rosenbrock(x):
    """f = 100 (x1 - x0^2)^2 + (1 - x0)^2, minimum 0 at (1, 1); (f, grad)."""
    f = 100 * (x[1] - x[0] ** 2) ** 2 + (1 - x[0]) ** 2
    g = np.array([-400 * x[0] * (x[1] - x[0] ** 2) - 2 * (1 - x[0]), 200 * (x[1] - x[0] ** 2)])
    return float(f), g


def digits():
    """sklearn's 8x8 digits as float64, pixels / 16, labels one-hot."""
    load_digits = pytest.importorskip("sklearn.datasets").load_digits
    X, y = load_digits(return_X_y=True)
    return X / 16.0, np.eye(10)[y]


def softmax_regression(X, Y, l2):
    """(W, b) -> (f, dW, db) for f = mean cross-entropy of softmax(X W + b) + l2/2 (|W|^2 + |b|^2)."""
    n = len(X)

    def fun(W, b):
        Z = X @ W + b
        Z = Z - Z.max(1, keepdims=True)
        log_s = np.log(np.exp(Z).sum(1, keepdims=True))
        P = np.exp(Z - log_s)
        f = -np.sum(Y * (Z - log_s)) / n + 0.5 * l2 * (np.sum(W * W) + b @ b)
        return f, X.T @ (P - Y) / n + l2 * W, (P - Y).sum(0) / n + l2 * b
    return fun


@pytest.fixture(scope="module")
def problem():
    X, Y = digits()
    return X, Y, softmax_regression(X, Y, L2)


@pytest.fixture(scope="module", autouse=True)
def one_blas_thread():
    """These problems are too small for BLAS threads, whose idle spinning slows a loaded
    2-core machine many times over (NumPy's and SciPy's OpenBLAS each have a pool)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        yield
        return
    with threadpool_limits(1):
        yield


def make(form, fun, W0, b0, **kw):
    """An LBFGS over (W, b) held as `form`, its closure, and a reader of the current (W, b)."""
    D, K = W0.shape
    if form == "array":  # one flat vector w = [W.ravel(), b]
        w = np.concatenate([W0.ravel(), b0])

        def closure():
            f, gW, gb = fun(w[:D * K].reshape(D, K), w[D * K:])
            return f, np.concatenate([gW.ravel(), gb])
        return LBFGS(w, **kw), closure, lambda: (w[:D * K].reshape(D, K), w[D * K:])
    if form == "list":
        W, b = W0.copy(), b0.copy()

        def closure():
            f, gW, gb = fun(W, b)
            return f, [gW, gb]
        return LBFGS([W, b], **kw), closure, lambda: (W, b)
    buf = ParamBuffer([W0, b0])  # b's segment ends in alignment padding: x includes it

    def closure():
        f, buf.grads[0][...], buf.grads[1][...] = fun(*buf.params)
        return f
    return LBFGS(buf, **kw), closure, lambda: tuple(buf.params)


@pytest.mark.parametrize("line_search,lr,max_iter,steps", [
    ("strong_wolfe", 1.0, 200, 1),
    ("strong_wolfe", 1.0, 20, 10),   # the history carries over from one step to the next
    (None, 0.5, 500, 1),
])
def test_rosenbrock_reaches_the_minimum(line_search, lr, max_iter, steps):
    x = np.array(ROSEN_START)
    opt = LBFGS(x, lr=lr, max_iter=max_iter, line_search=line_search, tolerance_grad=1e-12, tolerance_change=1e-14)
    for _ in range(steps):
        opt.step(lambda: rosenbrock(x))
    np.testing.assert_allclose(x, [1.0, 1.0], atol=1e-6)
    assert opt.func_evals <= 5 * opt.n_iter


def torch_lbfgs(x0, fun, steps=1, **kw):
    """torch.optim.LBFGS on the same float64 problem, gradients from the same NumPy function."""
    torch = pytest.importorskip("torch")
    x = torch.tensor(x0, dtype=torch.float64)
    opt = torch.optim.LBFGS([x], **kw)

    def closure():
        f, g = fun(x.numpy())
        x.grad = torch.from_numpy(g)
        return f
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # its idle OpenMP threads would spin against NumPy's BLAS on a small machine
    try:
        for _ in range(steps):
            opt.step(closure)
    finally:
        torch.set_num_threads(threads)
    st = opt.state[x]
    return x.numpy(), fun(x.numpy())[0], st["n_iter"], st["func_evals"]


@pytest.mark.parametrize("history_size,max_iter,steps", [(10, 200, 1), (3, 200, 1), (10, 20, 10)])
def test_rosenbrock_matches_torch(history_size, max_iter, steps):
    kw = dict(max_iter=max_iter, history_size=history_size, tolerance_grad=1e-12, tolerance_change=1e-14)
    tx, tf, t_iter, t_evals = torch_lbfgs(ROSEN_START, rosenbrock, steps, line_search_fn="strong_wolfe", **kw)
    x = np.array(ROSEN_START)
    opt = LBFGS(x, line_search="strong_wolfe", **kw)
    for _ in range(steps):
        opt.step(lambda: rosenbrock(x))
    assert (opt.n_iter, opt.func_evals) == (t_iter, t_evals)
    np.testing.assert_allclose(x, tx, atol=1e-12)
    assert rosenbrock(x)[0] == pytest.approx(tf, abs=1e-15)


@pytest.fixture(scope="module")
def scipy_optimum(problem):
    optimize = pytest.importorskip("scipy.optimize")
    X, Y, fun = problem
    D, K = X.shape[1], Y.shape[1]

    def flat(w):
        f, gW, gb = fun(w[:D * K].reshape(D, K), w[D * K:])
        return f, np.concatenate([gW.ravel(), gb])
    r = optimize.minimize(flat, np.zeros(D * K + K), jac=True, method="L-BFGS-B",
                          options=dict(maxiter=10_000, ftol=1e-15, gtol=1e-10))
    return r.fun


@pytest.mark.parametrize("form", ["array", "list", "buffer"])
@pytest.mark.parametrize("line_search", ["strong_wolfe", None])
def test_digits_reaches_scipys_optimum(problem, scipy_optimum, form, line_search):
    X, _Y, fun = problem
    opt, closure, _ = make(form, fun, np.zeros((X.shape[1], 10)), np.zeros(10), max_iter=1000,
                           line_search=line_search, tolerance_grad=1e-9, tolerance_change=1e-14)
    opt.step(closure)
    final = closure()
    final = final[0] if isinstance(final, tuple) else final
    assert final == pytest.approx(scipy_optimum, rel=1e-6)


@pytest.mark.parametrize("line_search,history_size,max_iter,steps", [
    ("strong_wolfe", 10, 500, 1), (None, 10, 500, 1), ("strong_wolfe", 100, 30, 4), (None, 5, 30, 4)])
def test_digits_matches_torch(problem, line_search, history_size, max_iter, steps):
    X, Y, fun = problem
    D, K = X.shape[1], Y.shape[1]

    def flat(w):
        f, gW, gb = fun(w[:D * K].reshape(D, K), w[D * K:])
        return f, np.concatenate([gW.ravel(), gb])
    # torch's default tolerances stop well above the rounding noise floor, where the two
    # runs (which differ in the last bits: FMA, summation order) take the same decisions
    kw = dict(max_iter=max_iter, history_size=history_size, tolerance_grad=1e-7, tolerance_change=1e-12)
    _, tf, t_iter, t_evals = torch_lbfgs(np.zeros(D * K + K), flat, steps, line_search_fn=line_search, **kw)
    w = np.zeros(D * K + K)
    opt = LBFGS(w, line_search=line_search, **kw)
    for _ in range(steps):
        opt.step(lambda: flat(w))
    assert (opt.n_iter, opt.func_evals) == (t_iter, t_evals)
    assert flat(w)[0] == pytest.approx(tf, rel=1e-12)


@pytest.mark.parametrize("form", ["array", "list", "buffer"])
@pytest.mark.parametrize("line_search", ["strong_wolfe", None])
def test_state_dict_resumes_the_same_run(problem, form, line_search):
    X, _Y, fun = problem
    W0, b0 = np.zeros((X.shape[1], 10)), np.zeros(10)
    kw = dict(max_iter=4, max_eval=100, history_size=3, line_search=line_search)
    opt, closure, read = make(form, fun, W0, b0, **kw)
    for _ in range(3):
        opt.step(closure)
    saved = copy.deepcopy(opt.state_dict())
    saved_params = [p.copy() for p in read()]
    assert len(saved["state"]["old_dirs"]) == 3 and saved["state"]["n_iter"] == 12
    opt.step(closure)
    opt.step(closure)

    other, other_closure, other_read = make(form, fun, *saved_params, max_iter=1, history_size=1)
    other.load_state_dict(saved)
    other.step(other_closure)
    other.step(other_closure)
    for a, b in zip(read(), other_read()):
        np.testing.assert_array_equal(a, b)
    assert (other.n_iter, other.func_evals) == (opt.n_iter, opt.func_evals)


@pytest.mark.parametrize("kw,check", [
    (dict(tolerance_grad=1e3), lambda o, moved: o.n_iter == 0 and o.func_evals == 1 and not moved),
    (dict(max_iter=3, max_eval=100), lambda o, moved: o.n_iter == 3 and moved),
    (dict(max_iter=3), lambda o, moved: o.func_evals == 3 and o.n_iter < 3),  # max_eval = 3 * 5 // 4
    # the line search may take one call past max_eval, as in torch
    (dict(max_iter=50, max_eval=7), lambda o, moved: 7 <= o.func_evals <= 8 and o.n_iter < 7),
    (dict(max_iter=3, max_eval=100, line_search=None), lambda o, moved: o.n_iter == 3 and o.func_evals == 3),
])
def test_stopping_rules(kw, check):
    x = np.array(ROSEN_START)
    opt = LBFGS(x, **kw)
    opt.step(lambda: rosenbrock(x))
    assert check(opt, not np.array_equal(x, ROSEN_START))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("layout", ["contiguous", "strided"])
def test_axpy_is_in_place(dtype, layout):
    rng = np.random.default_rng(0)
    x, y = (rng.standard_normal(2001).astype(dtype) for _ in range(2))
    if layout == "strided":
        x, y = x[::2], y[::2]
    expected = y + dtype(-0.37) * x
    out = axpy(-0.37, x, y)
    assert out is y
    np.testing.assert_allclose(y, expected, rtol=1e-6 if dtype == np.float32 else 1e-13)


@pytest.mark.parametrize("kwargs,exc,message", [
    (dict(lr=0), ValueError, "lr must be > 0"),
    (dict(lr=-1), ValueError, "lr must be > 0"),
    (dict(lr=float("nan")), ValueError, "lr must be > 0"),
    (dict(history_size=0), ValueError, "history_size must be a positive integer"),
    (dict(max_iter=0), ValueError, "max_iter must be a positive integer"),
    (dict(max_eval=2.5), ValueError, "max_eval must be a positive integer"),
    (dict(tolerance_grad=-1e-7), ValueError, "tolerance_grad must be"),
    (dict(tolerance_change=float("inf")), ValueError, "tolerance_change must be"),
    (dict(line_search="armijo"), ValueError, "line_search must be 'strong_wolfe' or None"),
    (dict(params=[]), ValueError, "params is empty"),
    (dict(params=[np.zeros(3), np.zeros(3, np.float32)]), TypeError, r"params\[1\] has dtype float32"),
    (dict(params=[np.zeros(3, np.int64)]), TypeError, r"params\[0\] has dtype int64"),
    (dict(params=[[1.0, 2.0]]), TypeError, r"params\[0\] must be a NumPy or CuPy array"),
    (dict(params=3.0), TypeError, "params must be a ParamBuffer, an array or a list of arrays"),
    (dict(params=[np.zeros(3), np.broadcast_to(np.zeros(1), (3,))]), ValueError, r"params\[1\] is read-only"),
])
def test_bad_arguments_name_the_argument(kwargs, exc, message):
    kwargs.setdefault("params", np.zeros(3))
    with pytest.raises(exc, match=message):
        LBFGS(**kwargs)


@pytest.mark.parametrize("params,closure,exc,message", [
    (lambda: [np.zeros(2)], lambda: 1.0, TypeError, r"returns \(loss, grads\)"),
    (lambda: [np.zeros(2)], lambda: (1.0, [np.zeros(2), np.zeros(2)]), ValueError, "returned 2 gradients for 1"),
    (lambda: [np.zeros(2)], lambda: (1.0, [np.zeros(3)]), ValueError, "gradient 0 has 3 elements"),
    (lambda: ParamBuffer([np.zeros(2)]), lambda: (1.0, [np.zeros(2)]), TypeError, "returns the loss only"),
])
def test_closure_contract_is_checked(params, closure, exc, message):
    opt = LBFGS(params())
    with pytest.raises(exc, match=message):
        opt.step(closure)


def test_cupy_matches_numpy(problem):
    cupy = pytest.importorskip("cupy")
    X, Y, _fun = problem
    D, K = X.shape[1], Y.shape[1]
    Xc, Yc = cupy.asarray(X), cupy.asarray(Y)

    def flat(xp, Xa, Ya, w):
        Z = Xa @ w[:D * K].reshape(D, K) + w[D * K:]
        Z = Z - Z.max(1, keepdims=True)
        log_s = xp.log(xp.exp(Z).sum(1, keepdims=True))
        P = xp.exp(Z - log_s)
        f = -xp.sum(Ya * (Z - log_s)) / len(Xa) + 0.5 * L2 * (w @ w)
        g = xp.concatenate([(Xa.T @ (P - Ya)).ravel(), (P - Ya).sum(0)]) / len(Xa) + L2 * w
        return f, g
    results = []
    for xp, Xa, Ya in [(np, X, Y), (cupy, Xc, Yc)]:
        w = xp.zeros(D * K + K)
        opt = LBFGS(w, max_iter=200)
        opt.step(functools.partial(flat, xp, Xa, Ya, w))
        results.append((float(flat(xp, Xa, Ya, w)[0]), opt.n_iter))
    assert results[1][0] == pytest.approx(results[0][0], rel=1e-10)
    assert abs(results[1][1] - results[0][1]) <= 2
