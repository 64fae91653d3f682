"""Time to a target loss on full-batch L2-regularized softmax regression on the digits
(1,797 images, 64 pixels / 16 + a bias column, 10 classes: 650 float64 parameters):

    f(W) = mean_i cross-entropy(softmax(x_i W), y_i) + L2/2 |W|^2,    targets f* (1 + rel)

with f* from SciPy's L-BFGS-B run to its tightest tolerances. Each method runs from W = 0
until the loss first reaches the tightest target; the table (printed at the end of the run)
gives, for each target, the iterations, closure calls (loss + gradient evaluations) and wall
time at the first closure call at or below it (medians over the rounds, all rows from the
same run). Adam and SGD+momentum are fastopt.functional's fused rules, full batch, at the
learning rate of a small grid that reaches the tightest target in the fewest iterations.

BLAS runs single-threaded for every method: NumPy and SciPy each bring their own OpenBLAS,
whose idle threads spin against each other on a small machine (SciPy's L-BFGS-B ran many
times slower with both at 2 threads). With FASTOPT_PLOT_DIR set, the loss gap f - f* against
closure calls is drawn to $FASTOPT_PLOT_DIR/second_order_digits.png (fastopt.plots).
"""
import contextlib
import os
import time

import numpy as np
import pytest

from fastopt.fullbatch import SoftmaxRegression, one_blas_thread
from fastopt.functional import adam_, sgd_
from fastopt.lbfgs import LBFGS
from fastopt.newton import Newton

L2 = 1e-4         # weak regularization: an ill-conditioned problem, where curvature pays
RELS = (1e-4, 1e-6)  # targets: f <= f* (1 + rel)
FIRST_ORDER_CAP = 20_000
LR_GRID = {"adam": [0.1, 0.3, 1.0, 3.0], "sgd": [1.0, 3.0, 10.0, 20.0]}  # each best lr inside its grid here
METHODS = ["fastopt LBFGS strong-Wolfe", "fastopt LBFGS fixed step", "fastopt Newton damped",
           "scipy L-BFGS-B", "fastopt adam_", "fastopt sgd_ momentum 0.9"]
ROUNDS = {"fastopt adam_": 3, "fastopt sgd_ momentum 0.9": 3}
SUMMARY = {}  # method -> row of the table
SUMMARY_INFO = {}


def digits_problem():
    """fun(w) -> (f, g) and hessian(w) -> (n, n) for w = W.ravel(), W (65, 10): the objective of
    fastopt.fullbatch (the one ``fastopt compare --model logreg`` minimizes, there on a
    standardized training split)."""
    from sklearn.datasets import load_digits
    X, y = load_digits(return_X_y=True)
    objective = SoftmaxRegression(X / 16.0, y, 10, L2)
    return objective.loss_grad, objective.hessian, objective.n


class Reached(Exception):
    """Raised by a closure at the first evaluation at or below the tightest target."""


class Counter:
    """Wraps fun(w) -> (f, g): counts calls, records the loss curve and, for each target,
    (iteration, calls, seconds) at the first call at or below it; stops the run at the last.
    ``iteration`` (set by the runner) reads the optimizer's iteration count."""

    def __init__(self, fun, targets):
        self.fun, self.targets = fun, sorted(targets, reverse=True)
        self.evals, self.curve, self.hits = 0, [], []
        self.iteration = lambda: self.evals
        self.t0 = time.perf_counter()

    def __call__(self, w):
        f, g = self.fun(w)
        self.evals += 1
        self.curve.append((self.evals, f))
        while len(self.hits) < len(self.targets) and f <= self.targets[len(self.hits)]:
            self.hits.append((self.iteration(), self.evals, time.perf_counter() - self.t0))
        if len(self.hits) == len(self.targets):
            self.final = f
            raise Reached
        if not np.isfinite(f):
            raise FloatingPointError(f"loss {f} after {self.evals} calls")
        return f, g


def run_lbfgs(fun, n, targets, line_search):
    w, c = np.zeros(n), Counter(fun, targets)
    opt = LBFGS(w, max_iter=10_000, history_size=10, line_search=line_search, tolerance_grad=0.0,
                tolerance_change=0.0)
    c.iteration = lambda: opt.n_iter
    with contextlib.suppress(Reached):
        opt.step(lambda: c(w))
    return c


def run_newton(fun, hessian, n, targets):
    w, c = np.zeros(n), Counter(fun, targets)
    opt = Newton(w, damping=1e-3, hessian=hessian)
    c.iteration = lambda: opt.n_iter
    with contextlib.suppress(Reached):
        for _ in range(100):
            opt.step(lambda: c(w))
    return c


def run_first_order(fun, n, targets, rule, lr, cap=FIRST_ORDER_CAP):
    """Full-batch Adam or SGD with momentum 0.9 (iteration k evaluates at the k-th iterate)."""
    w, c = np.zeros(n), Counter(fun, targets)
    s1, s2 = np.zeros(n), np.zeros(n)
    with contextlib.suppress(Reached, FloatingPointError):
        for step in range(1, cap + 1):
            _, g = c(w)
            if rule == "adam":
                adam_(w, g, s1, s2, step=step, lr=lr)
            else:
                sgd_(w, g, s1, step=step, lr=lr, momentum=0.9)
    return c


def run_scipy(fun, n, targets):
    from scipy.optimize import minimize
    c, nit = Counter(fun, targets), [0]
    c.iteration = lambda: nit[0]

    def callback(*_):
        nit[0] += 1
    with contextlib.suppress(Reached):
        minimize(c, np.zeros(n), jac=True, method="L-BFGS-B", callback=callback,
                 options=dict(maxiter=10_000, ftol=0.0, gtol=0.0))
    return c


@pytest.fixture(scope="module")
def problem():
    pytest.importorskip("sklearn")
    from scipy.optimize import minimize
    fun, hessian, n = digits_problem()
    with one_blas_thread():
        r = minimize(fun, np.zeros(n), jac=True, method="L-BFGS-B",
                     options=dict(maxiter=10_000, ftol=1e-15, gtol=1e-11))
    SUMMARY_INFO["fstar"] = r.fun
    return dict(fun=fun, hessian=hessian, n=n, fstar=r.fun, targets=[r.fun * (1 + rel) for rel in RELS])


@pytest.fixture(scope="module")
def tuned(problem):
    """Per rule, the lr of the grid that reaches the tightest target in the fewest iterations
    (untimed); SUMMARY_INFO keeps every lr's count for the table's footnote."""
    best = {}
    with one_blas_thread(), np.errstate(over="ignore", invalid="ignore"):  # a diverging lr overflows
        for rule, grid in LR_GRID.items():
            counts = {}
            for lr in grid:
                c = run_first_order(problem["fun"], problem["n"], problem["targets"], rule, lr)
                counts[lr] = c.evals if hasattr(c, "final") else None
            SUMMARY_INFO[rule] = counts
            reached = {lr: k for lr, k in counts.items() if k is not None}
            best[rule] = min(reached, key=reached.get) if reached else grid[-1]
    return best


def _runner(method, p, tuned):
    fun, n, targets = p["fun"], p["n"], p["targets"]
    return {
        "fastopt LBFGS strong-Wolfe": (lambda: run_lbfgs(fun, n, targets, "strong_wolfe"), "m=10"),
        "fastopt LBFGS fixed step": (lambda: run_lbfgs(fun, n, targets, None), "m=10, lr=1"),
        "fastopt Newton damped": (lambda: run_newton(fun, p["hessian"], n, targets), "exact H, LM"),
        "scipy L-BFGS-B": (lambda: run_scipy(fun, n, targets), "m=10"),
        "fastopt adam_": (lambda: run_first_order(fun, n, targets, "adam", tuned["adam"]),
                          f"lr={tuned['adam']:g}"),
        "fastopt sgd_ momentum 0.9": (lambda: run_first_order(fun, n, targets, "sgd", tuned["sgd"]),
                                      f"lr={tuned['sgd']:g}"),
    }[method]


class _Summary:
    """Prints the table after pytest-benchmark's own (registered by the fixture below)."""

    def pytest_terminal_summary(self, terminalreporter):
        if not SUMMARY:
            return
        w = terminalreporter.write_line
        w("")
        w(f"second-order benchmark: digits softmax regression, 650 float64 params, L2={L2:g}, "
          f"f*={SUMMARY_INFO['fstar']:.12f}; per target f*(1+rel): iterations / closure calls / "
          f"wall ms (median of rounds, BLAS 1 thread)")
        head = f"{'method':<28}{'setting':<13}"
        for rel in RELS:
            head += f"{'rel ' + format(rel, 'g') + ': iters':>18}{'calls':>7}{'ms':>9}{'x LBFGS':>9}"
        w(head)
        base = SUMMARY.get("fastopt LBFGS strong-Wolfe")
        for method in METHODS:
            if method not in SUMMARY:
                continue
            r, line = SUMMARY[method], f"{method:<28}{SUMMARY[method]['setting']:<13}"
            for k in range(len(RELS)):
                iters, calls, sec = r["hits"][k]
                ratio = f"{sec / base['hits'][k][2]:9.2f}" if base else f"{'-':>9}"
                line += f"{iters:>18}{calls:>7}{sec * 1e3:9.1f}{ratio}"
            w(line)
        w("x LBFGS = wall time / fastopt LBFGS strong-Wolfe's (above 1: slower). "
          "lr grids, calls to the tightest target (None: not within "
          f"{FIRST_ORDER_CAP} or diverged): adam {SUMMARY_INFO.get('adam')}, sgd {SUMMARY_INFO.get('sgd')}")
        out = os.environ.get("FASTOPT_PLOT_DIR")
        if out:
            from fastopt.plots import plot_curves
            curves = {m: [(e, f - SUMMARY_INFO["fstar"]) for e, f in SUMMARY[m]["curve"]]
                      for m in METHODS if m in SUMMARY}
            path = plot_curves(os.path.join(out, "second_order_digits.png"), curves,
                               "digits softmax regression, full batch", "f - f*", xlabel="closure calls",
                               logy=True)
            w(f"plot: {path}")


@pytest.fixture(scope="module", autouse=True)
def _summary(request):
    name = "fastopt-second-order-summary"
    if not request.config.pluginmanager.has_plugin(name):
        request.config.pluginmanager.register(_Summary(), name)


@pytest.mark.parametrize("method", METHODS)
def test_time_to_target(benchmark, problem, tuned, method):
    run, setting = _runner(method, problem, tuned)
    counters = []
    benchmark.group = "second-order digits (time to the tightest target)"
    with one_blas_thread():
        benchmark.pedantic(lambda: counters.append(run()), rounds=ROUNDS.get(method, 5), iterations=1,
                           warmup_rounds=1)
    assert all(hasattr(c, "final") for c in counters), f"{method} did not reach f*(1+{RELS[-1]:g})"
    timed = counters[1:]  # the first is the warm-up round (compilation, caches)
    # iterations and calls are the same in every round; the time is each round's median
    hits = [(*timed[0].hits[k][:2], float(np.median([c.hits[k][2] for c in timed]))) for k in range(len(RELS))]
    SUMMARY[method] = dict(setting=setting, hits=hits, curve=timed[0].curve)
