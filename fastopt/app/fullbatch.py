"""The full-batch runs of the application, ``fastopt compare --model logreg`` and ``fastopt
train --model logreg`` (lbfgs and newton run nowhere else): L2-regularized softmax
regression (:class:`fastopt.fullbatch.SoftmaxRegression`) minimized by second-order methods
next to first-order ones, each from W = 0, against f* from SciPy's L-BFGS-B.

What one iteration is, for every method starting from W = 0:

    adam, momentum, ...  one gradient at the current weights, one update: 1 closure call
    lbfgs                one ``LBFGS.step(closure)`` with max_iter=1: a two-loop direction and a
                         strong-Wolfe line search (at most 25 calls); the history carries over
    newton               one ``Newton.step(closure)``: exact Hessian, Cholesky solve of
                         (H + lambda I) d = -g, trial x + d (1 call; a rejected trial raises
                         lambda and costs one more)

"Calls" are real evaluations of f and grad f (:class:`fastopt.fullbatch.Closure` answers a
repeated point from memory), the same count as one long ``LBFGS(max_iter=N)`` run.
"""
import dataclasses
import math
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from ..buffer import ParamBuffer
from ..fullbatch import Closure, SoftmaxRegression, one_blas_thread
from ..lbfgs import LBFGS
from ..newton import Newton
from ..nn._array import to_numpy
from .config import UsageError
from .outputs import open_out, plot_gaps, write_metrics
from .prepare import kernel_threads, open_run
from .recipes import hyper_flag, make_optimizer, optimizer_kwargs

MODEL = "logreg"
SECOND_ORDER = ("lbfgs", "newton")  # full batch only
DEFAULT_L2 = 1e-4         # weak: an ill-conditioned problem, where curvature pays (as in the benchmark)
DEFAULT_ITERATIONS = 1000  # on the digits, enough for adam and momentum to reach f*(1 + 1e-6) (~670, ~580)
# full-batch learning rates: the best of benchmarks/test_second_order.py's grids (adam 0.1-3,
# sgd with momentum 0.9: 1-20), and again on this standardized split (momentum at 20 diverges);
# other first-order methods use recipes.DEFAULT_LR, tuned for minibatches
FULL_BATCH_LR = {"adam": 1.0, "momentum": 10.0}
RELS = (1e-4, 1e-6)       # targets f*(1 + rel)
# tighter than torch's defaults (1e-7, 1e-9), which stop short of the 1e-6 target in float64;
# max_eval = 1 + 25: the start (a remembered call) and torch's 25 line-search evaluations
LBFGS_SETTINGS = dict(max_iter=1, max_eval=26, history_size=10, tolerance_grad=1e-10, tolerance_change=1e-12)
NEWTON_DAMPING = 1e-3
MAX_NEWTON_PARAMS = 5000  # the n x n Hessian: 200 MB and a 5000^3 Cholesky per step beyond this
TABLE_HEADERS = ("optimizer", "lr", "iters@1e-4", "iters@1e-6", "s@1e-6", "calls", "seconds", "final loss",
                 "f - f*", "test acc")
CSV_FIELDS = ("optimizer", "iteration", "loss", "gap", "calls", "seconds")


def make_stepper(cfg, name, objective, buffer, closure, strict):
    """``(step, lr)``: one iteration of optimizer ``name`` on ``buffer`` (lr None for newton)."""
    if name == "lbfgs":
        lr = cfg.lr if cfg.lr is not None else 1.0
        opt = LBFGS(buffer, lr=lr, **LBFGS_SETTINGS)
        return lambda: opt.step(closure), lr
    if name == "newton":
        opt = Newton(buffer, damping=NEWTON_DAMPING, hessian=objective.hessian)
        return lambda: opt.step(closure), None
    # a first-order method: train's optimizer, its schedule laid over the iterations (one step each)
    run = dataclasses.replace(cfg, epochs=cfg.iterations or DEFAULT_ITERATIONS,
                              lr=cfg.lr if cfg.lr is not None else FULL_BATCH_LR.get(name))
    opt, _ = make_optimizer(run, SimpleNamespace(buffer=buffer), 1, name=name, strict=strict)
    _, kwargs = optimizer_kwargs(name, run.lr, cfg.hyper, strict=False)

    def step():
        closure()  # remembered: the loss recorded after the previous iteration evaluated here
        opt.step()
    return step, kwargs["lr"]


def run_iterations(step, closure, iterations):
    """f at the iterates x_0 .. x_N with the closure calls and seconds spent until each, and
    ``last_move``: the last iteration that changed the weights (a converged Newton keeps
    iterating, but its steps round to nothing and cost no call); stops early if f stops
    being finite."""
    t0 = time.perf_counter()
    trace = dict(loss=[closure()], calls=[closure.calls], seconds=[0.0], last_move=0)
    for k in range(1, iterations + 1):
        closure.new_iteration()
        before = closure.w.copy()
        step()
        if not bool(closure.xp.array_equal(before, closure.w)):
            trace["last_move"] = k
        trace["loss"].append(closure())
        trace["calls"].append(closure.calls)
        trace["seconds"].append(time.perf_counter() - t0)
        if not math.isfinite(trace["loss"][-1]):
            break
    return trace


def describe_run(name, trace, acc):
    """One line per method: its final loss, iterations (and when the weights last moved, if
    long before the end), closure calls, time and test accuracy."""
    iterations = len(trace["loss"]) - 1
    stalled = trace["last_move"] < iterations
    return (f"{name}: final loss {trace['loss'][-1]:.10g} after {iterations} iterations"
            + (f" (the weights last changed in iteration {trace['last_move']}; the later iterations left "
               "them as they were and cost no call)" if stalled else "")
            + f", {trace['calls'][-1]} calls, {trace['seconds'][-1]:.3f} s; test accuracy {acc:.2%}")


def scipy_reference(objective, iterations):
    """SciPy's L-BFGS-B (m = 10) from W = 0 to its tightest tolerances, on the host:
    ``(f*, minimizer, trace of its first ``iterations`` iterations, W after them)``."""
    from scipy.optimize import minimize
    last, trace, w_at = {}, dict(loss=[], calls=[], seconds=[]), {}

    def fun(w):
        f, g = objective.loss_grad(w)
        last.update(f=f, calls=last.get("calls", 0) + 1)
        if not trace["loss"]:  # x_0
            record()
        return f, g

    def record():
        if len(trace["loss"]) <= iterations:
            trace["loss"].append(last["f"])
            trace["calls"].append(last["calls"])
            trace["seconds"].append(time.perf_counter() - t0)

    def callback(xk):  # after each iteration; L-BFGS-B's last evaluation is the new iterate
        record()
        if len(trace["loss"]) == iterations + 1 and not w_at:
            w_at["w"] = xk.copy()

    t0 = time.perf_counter()
    # ftol = gtol = 0: on until no step lowers f (rounding); with ftol 1e-15 it stopped 1.4e-14
    # above the minimum on the digits, and Newton's loss had to stand in for f*
    r = minimize(fun, np.zeros(objective.n), jac=True, method="L-BFGS-B", callback=callback,
                 options=dict(maxiter=10_000, ftol=0.0, gtol=0.0))
    return r.fun, r.x, trace, w_at.get("w", r.x)


def first_hit(trace, target):
    """(iteration, calls, seconds) at the first iterate with f <= target, or None."""
    for k, f in enumerate(trace["loss"]):
        if f <= target:
            return k, trace["calls"][k], trace["seconds"][k]
    return None


ROUNDING = 1e-12  # relative: f is a mean over the training set, its value uncertain in about this digit


def choose_fstar(scipy_f, best, seen):
    """``(f*, where it comes from)``: SciPy's L-BFGS-B minimum, lowered to ``best``'s lowest
    loss ``seen`` if that is lower, so that no gap f - f* is negative. Within ROUNDING the
    two are the same minimum and f* is named SciPy's; beyond it SciPy stopped short, and
    the words say so."""
    if scipy_f <= seen:
        return scipy_f, "scipy L-BFGS-B"
    below = scipy_f - seen
    if below <= ROUNDING * abs(scipy_f):
        return seen, f"scipy L-BFGS-B, within rounding: {best}'s lowest loss is {below:.1e} lower and is used"
    return seen, f"{best}'s lowest loss: scipy L-BFGS-B stopped {below:.1e} above it"


# -- settings ---------------------------------------------------------------------------------
def uses_full_batch(cfg, optimizers, strict):
    """Whether the run is the full-batch logreg one; raises UsageError for settings that do
    not go with it (``strict``: ``fastopt train``, where an inapplicable flag is an error)."""
    second = [n for n in optimizers if n in SECOND_ORDER]
    if cfg.model != MODEL:
        if second:
            raise UsageError(f"{' and '.join(second)} {'runs' if len(second) == 1 else 'run'} full batch, on "
                             f"--model {MODEL} only, got --model {cfg.model}")
        for flag, value in (("--l2", cfg.l2), ("--iterations", cfg.iterations)):
            if value is not None:
                raise UsageError(f"{flag} applies to --model {MODEL} only (full batch), got --model {cfg.model}")
        return False
    for flag, on in (("--ema", cfg.ema is not None), ("--checkpoint", cfg.checkpoint), ("--resume", cfg.resume),
                     ("--precision", cfg.precision != "fp32"), ("--master-weights", cfg.master_weights),
                     ("--stochastic-rounding", cfg.stochastic_rounding), ("--state-dtype", cfg.state_dtype),
                     ("--state-bits", cfg.state_bits), ("--state-code", cfg.state_code)):
        if on:
            raise UsageError(f"{flag} does not apply to --model {MODEL} (a full-batch run)")
    if strict:
        for name in second:
            given = {"--lr": name == "newton" and cfg.lr is not None, "--schedule": cfg.schedule != "constant",
                     "--max-grad-norm": cfg.max_grad_norm is not None,
                     **{hyper_flag(k): True for k in cfg.hyper}}
            flags = [flag for flag, on in given.items() if on]
            if flags:
                takes = "--lr (its initial step, default 1)" if name == "lbfgs" else "no optimizer flag"
                raise UsageError(f"{flags[0]} does not apply to {name} (it takes {takes})")
    return True


# -- the run ----------------------------------------------------------------------------------
def full_batch(cfg, optimizers, log=print, command="compare"):
    """Each optimizer from W = 0 for ``cfg.iterations`` iterations on the logreg objective of
    the training split; f* from SciPy's L-BFGS-B (or the lowest loss seen). Writes loss.png
    (f - f* per iteration), loss_calls.png (per closure call), metrics.json, metrics.csv in
    ``cfg.out``; returns the metrics dict, whose ``table`` rows go with TABLE_HEADERS."""
    iterations = cfg.iterations or DEFAULT_ITERATIONS
    l2 = cfg.l2 if cfg.l2 is not None else DEFAULT_L2
    device, data = open_run(cfg, log)
    dtype = np.dtype(cfg.dtype)
    host = SoftmaxRegression(data.x_train.astype(np.float64, copy=False), data.y_train, data.n_classes, l2)
    if "newton" in optimizers and host.n > MAX_NEWTON_PARAMS:
        raise UsageError(f"newton forms the n x n Hessian: {host.n:,} parameters is more than "
                         f"{MAX_NEWTON_PARAMS:,} (use lbfgs)")
    log(f"data: {data.name}, {len(data.x_train):,} train / {len(data.x_test):,} test; softmax regression, "
        f"{host.n:,} {dtype.name} parameters, L2 {l2:g}, full batch, {iterations} iterations from W = 0")
    data = data.to(device)
    # on the host in float64 the objective is the reference's own (built once: it copies x)
    objective = host if device == "cpu" and dtype == np.float64 else \
        SoftmaxRegression(data.x_train, data.y_train, data.n_classes, l2)

    def run(name, n_iter):
        buffer = ParamBuffer(shapes=[objective.shape], dtype=dtype, device=device, names=["weight"])
        closure = Closure(objective, buffer)
        step, lr = make_stepper(cfg, name, objective, buffer, closure, strict=command == "train")
        return run_iterations(step, closure, n_iter), buffer.params[0], lr

    out, runs = Path(cfg.out), {}
    with kernel_threads(cfg.threads), one_blas_thread(), np.errstate(over="ignore", invalid="ignore"):
        for name in optimizers:  # one untimed iteration each: checks the settings, compiles the kernels
            run(name, 1)
        open_out(out, log)  # once every setting has been checked
        for name in optimizers:
            trace, w, lr = run(name, iterations)
            acc = float((to_numpy(objective.logits(w, data.x_test).argmax(axis=1)) == to_numpy(data.y_test)).mean())
            runs[name] = dict(lr=lr, **trace, test_acc=acc)
            log(describe_run(name, trace, acc))
        fstar_scipy, _, trace, w = scipy_reference(host, iterations)
    best = min(runs, key=lambda n: min(runs[n]["loss"]))
    seen = min(runs[best]["loss"])
    acc = float((host.logits(w, to_numpy(data.x_test)).argmax(axis=1) == to_numpy(data.y_test)).mean())
    runs["scipy L-BFGS-B"] = dict(lr=None, **trace, test_acc=acc)
    fstar, source = choose_fstar(fstar_scipy, best, seen)
    table, rows = [], []
    for name, r in runs.items():
        hits = [first_hit(r, fstar * (1 + rel)) for rel in RELS]
        r.update(fstar=fstar, hits={str(rel): h for rel, h in zip(RELS, hits)})
        table.append((name, "-" if r["lr"] is None else r["lr"], *(h[0] if h else "-" for h in hits),
                      hits[-1][2] if hits[-1] else "-", r["calls"][-1], r["seconds"][-1], r["loss"][-1],
                      r["loss"][-1] - fstar, r["test_acc"]))
        rows += [dict(optimizer=name, iteration=k, loss=f, gap=f - fstar, calls=c, seconds=s)
                 for k, (f, c, s) in enumerate(zip(r["loss"], r["calls"], r["seconds"]))]
    metrics = {"command": command, "config": cfg.as_dict(), "device": device, "data": data.name,
               "model": {"name": MODEL, "parameters": host.n, "l2": l2}, "iterations": iterations,
               "fstar": fstar, "fstar_source": source, "optimizers": list(optimizers), "runs": runs,
               "table": {"headers": TABLE_HEADERS, "rows": table},
               "files": ["loss.png", "loss_calls.png", "metrics.json", "metrics.csv"]}
    write_metrics(out, metrics, rows, CSV_FIELDS)
    title = f"softmax regression on {data.name}, full batch, L2 {l2:g}: loss - f*\nf* = {fstar:.10g} ({source})"
    plot_gaps(out, runs, fstar, title)
    log(f"f* = {fstar:.12g} ({source}); iters@rel, s@rel: iterations and seconds until f <= f*(1 + rel); "
        f"calls: evaluations of f and grad f in all {iterations} iterations")
    return metrics
