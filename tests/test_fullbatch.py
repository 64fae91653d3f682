"""fastopt.fullbatch and fastopt.app.fullbatch: the softmax-regression objective (its loss against the definition, its
gradient by gradcheck, its Hessian against differences of the gradient), the per-iteration
L-BFGS driver against one long L-BFGS run, ``fastopt compare / train --model logreg`` end to
end, and bad combinations: one line, exit 2, nothing written."""
import itertools
import json

import numpy as np
import pytest

from fastopt import gradcheck
from fastopt.app.cli import main
from fastopt.app.config import Config
from fastopt.app.fullbatch import (
    FULL_BATCH_LR,
    LBFGS_SETTINGS,
    make_stepper,
    run_iterations,
)
from fastopt.buffer import ParamBuffer
from fastopt.fullbatch import Closure, SoftmaxRegression
from fastopt.lbfgs import LBFGS

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# (N samples, D features, K classes, l2, weight scale): scale 5 saturates the softmax, 0 is W = 0
PROBLEMS = [(12, 3, 4, 0.1, 0.5), (30, 5, 3, 1e-4, 5.0), (8, 2, 2, 1.0, 0.0)]


def problem(n, d, k, l2, scale, seed=0):
    """An objective whose labels follow a noisy linear rule, and a W of the given scale."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d))
    y = (x @ rng.standard_normal((d, k)) + 0.5 * rng.standard_normal((n, k))).argmax(axis=1)
    return SoftmaxRegression(x, y, k, l2), rng.standard_normal((d + 1, k)) * scale, x, y


@pytest.mark.parametrize("case", PROBLEMS, ids=str)
def test_loss_is_the_definition_and_the_gradient_passes_gradcheck(case):
    from scipy.special import logsumexp
    objective, W, x, y = problem(*case)
    l2 = case[3]
    z = x @ W[:-1] + W[-1]
    expected = np.mean(logsumexp(z, axis=1) - z[np.arange(len(y)), y]) + l2 / 2 * np.sum(W ** 2)
    f, G = objective.loss_grad(W)
    assert f == pytest.approx(expected, rel=1e-12)
    gradcheck(lambda W: objective.loss_grad(W)[0], [W], [G])  # raises with a report on failure
    f_flat, g_flat = objective.loss_grad(W.ravel())  # flat W: the same, flat
    assert f_flat == f and np.array_equal(g_flat, G.ravel())


@pytest.mark.parametrize("case", PROBLEMS, ids=str)
def test_hessian_matches_differences_of_the_gradient(case):
    objective, W, _, _ = problem(*case)
    w, h = W.ravel(), 1e-6
    H = objective.hessian(w)
    columns = []
    for j in range(objective.n):
        e = np.zeros(objective.n)
        e[j] = h
        columns.append((objective.loss_grad(w + e)[1] - objective.loss_grad(w - e)[1]) / (2 * h))
    np.testing.assert_allclose(H, np.stack(columns, axis=1), rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(H, H.T, rtol=1e-12, atol=1e-15)
    # strictly convex: the cross-entropy part is positive semi-definite, l2 I lifts it
    assert np.linalg.eigvalsh(H).min() >= case[3] * (1 - 1e-6)


def test_one_lbfgs_step_per_iteration_replays_one_long_run():
    """max_iter=1 steps with the remembering closure take the iterates of one long
    LBFGS(max_iter=N) run, with the same number of evaluations."""
    objective, _, _, _ = problem(200, 10, 4, 1e-3, 0.0, seed=1)
    iterations = 20
    buffer = ParamBuffer(shapes=[objective.shape], dtype=np.float64)
    closure = Closure(objective, buffer)
    step, lr = make_stepper(Config(), "lbfgs", objective, buffer, closure, strict=True)
    trace = run_iterations(step, closure, iterations)

    long = ParamBuffer(shapes=[objective.shape], dtype=np.float64)
    calls = []

    def plain():
        f, g = objective.loss_grad(long.params[0])
        long.grads[0][...] = g
        calls.append(f)
        return f
    settings = dict(LBFGS_SETTINGS, max_iter=iterations, max_eval=10**6)
    LBFGS(long, lr=lr, **settings).step(plain)
    assert np.array_equal(buffer.params[0], long.params[0])
    assert closure.calls == len(calls) == trace["calls"][-1] and len(trace["loss"]) == iterations + 1
    assert trace["loss"][-1] < 0.2 * trace["loss"][0]


def assert_png(path):
    from matplotlib.image import imread
    assert path.read_bytes()[:8] == PNG_MAGIC, path
    image = imread(path)
    assert image.shape[0] > 300 and image.shape[1] > 400, (path, image.shape)
    assert image[..., :3].std() > 0.05, f"{path} is blank"


def test_compare_logreg_end_to_end(tmp_path, capsys):
    names = ["lbfgs", "newton", "adam"]
    code = main(["compare", "--optimizers", ",".join(names), "--model", "logreg", "--iterations", "15",
                 "--out", str(tmp_path)])
    out, err = capsys.readouterr()
    assert code == 0, err
    for png in ("loss.png", "loss_calls.png"):
        assert_png(tmp_path / png)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    runs, fstar = metrics["runs"], metrics["fstar"]
    assert list(runs) == [*names, "scipy L-BFGS-B"] and metrics["fstar_source"].startswith(("scipy", "newton"))
    assert len({r["loss"][0] for r in runs.values()}) == 1  # the same start, W = 0
    assert all(len(runs[n]["loss"]) == 16 and min(runs[n]["loss"]) >= fstar for n in names)
    final = {n: r["loss"][-1] for n, r in runs.items()}
    assert final["lbfgs"] < final["adam"] and final["newton"] < final["adam"]
    assert runs["newton"]["hits"]["1e-06"] is not None  # Newton's quadratic phase: there in 15 iterations
    assert runs["adam"]["calls"] == list(range(1, 17)) and runs["adam"]["lr"] == FULL_BATCH_LR["adam"]
    assert metrics["config"]["dtype"] == "float64"
    table = out[out.index("optimizer "):].splitlines()
    assert [line.split()[0] for line in table[2:6]] == [*names, "scipy"]


def test_train_with_lbfgs_alone_is_the_full_batch_logreg(tmp_path, capsys):
    code = main(["train", "--optimizer", "lbfgs", "--iterations", "5", "--out", str(tmp_path)])
    _out, err = capsys.readouterr()
    assert code == 0, err
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["command"] == "train" and metrics["config"]["model"] == "logreg"
    loss = metrics["runs"]["lbfgs"]["loss"]
    assert len(loss) == 6 and all(b < a for a, b in itertools.pairwise(loss))
    assert_png(tmp_path / "loss.png")


# (arguments, text the one error line must contain)
BAD = [
    (["compare", "--optimizers", "lbfgs,adam", "--model", "conv"], "lbfgs runs full batch, on --model logreg only"),
    (["train", "--optimizer", "newton", "--model", "mlp"], "newton runs full batch, on --model logreg only"),
    (["compare", "--model", "mlp", "--l2", "0.01"], "--l2 applies to --model logreg only"),
    (["train", "--iterations", "5"], "--iterations applies to --model logreg only"),
    (["compare", "--optimizers", "lbfgs", "--l2", "0"], "argument --l2: must be > 0"),
    (["compare", "--model", "logreg", "--ema", "0.9"], "--ema does not apply to --model logreg"),
    (["train", "--optimizer", "lbfgs", "--checkpoint"], "--checkpoint does not apply to --model logreg"),
    (["train", "--optimizer", "newton", "--lr", "0.1"], "--lr does not apply to newton"),
    (["train", "--optimizer", "lbfgs", "--momentum", "0.9"], "--momentum does not apply to lbfgs"),
    (["train", "--model", "logreg", "--momentum", "0.9"], "--momentum does not apply to adam"),
]


@pytest.mark.parametrize("argv,message", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_combinations_give_one_line_and_exit_2(tmp_path, capsys, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)  # the default --out is relative
    code = main([*argv, "--no-progress"])
    out, err = capsys.readouterr()
    assert code == 2 and not (tmp_path / "runs").exists()
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fastopt: error: ") and message in lines[0], err
    assert "Traceback" not in err + out
