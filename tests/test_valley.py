"""Optimizer trajectories on the 2-D problems: the problems' own math, convergence where
theory says it must happen, divergence past SGD's stability limit, and the picture."""
import numpy as np
import pytest

from fastopt.app import valley as V


def numeric_grad(problem, p, h=1e-6):
    e = np.eye(2) * h
    return np.array([(problem.value(p + e[i]) - problem.value(p - e[i])) / (2 * h) for i in range(2)])


@pytest.mark.parametrize("problem", [V.QUADRATIC, V.ROSENBROCK, V.quadratic(2.0, 30.0)],
                         ids=["quadratic", "rosenbrock", "quadratic(2,30)"])
def test_problem_gradient_and_minimum(problem):
    for p in [np.array(problem.start), np.array([0.3, -0.7]), np.array([1.2, 1.9])]:
        np.testing.assert_allclose(problem.grad(p), numeric_grad(problem, p), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(problem.grad(np.array(problem.minimum)), 0, atol=1e-12)
    assert problem.value(problem.minimum) == 0 < problem.value(problem.start)
    (x_lo, x_hi), (y_lo, y_hi) = problem.bounds
    for x, y in (problem.start, problem.minimum):
        assert x_lo < x < x_hi and y_lo < y < y_hi


@pytest.mark.parametrize("optimizer", sorted(V.OPTIMIZERS))
@pytest.mark.parametrize("problem", sorted(V.PROBLEMS))
def test_trajectory_shapes_and_start(problem, optimizer):
    path, losses = V.trajectory(problem, optimizer, 30)
    assert path.shape == (31, 2) and losses.shape == (31,) and path.dtype == np.float64
    np.testing.assert_array_equal(path[0], V.PROBLEMS[problem].start)
    assert np.isfinite(path).all()  # the tuned defaults do not blow up
    f = V.PROBLEMS[problem].f
    np.testing.assert_allclose(losses, f(path[:, 0], path[:, 1]), rtol=1e-12)
    assert not np.array_equal(path[-1], path[0])


def test_sgd_trajectory_is_gradient_descent():
    """Plain SGD through the fused kernel equals p <- p - lr grad(p), step by step."""
    q, lr = V.QUADRATIC, 0.03
    path, _ = V.trajectory(q, "sgd", 20, lr=lr)
    p = np.array(q.start)
    for t in range(1, 21):
        p = p - lr * q.grad(p)
        np.testing.assert_allclose(path[t], p, rtol=1e-13, atol=1e-15)


# (optimizer, steps, tolerance on the distance to the minimum) on the narrow valley, with
# the default hyper-parameters. Heavy-ball momentum 0.9 contracts by sqrt(0.9) per step
# in both directions, so 200 steps leave about 9 * 0.9**100 = 2e-4 of the start's 9.
CONVERGES = [("momentum", 200, 1e-3), ("nesterov", 200, 1e-3), ("adam", 300, 1e-3),
             ("adagrad", 150, 1e-3), ("rmsprop", 200, 1e-3)]


@pytest.mark.parametrize("optimizer,steps,tol", CONVERGES, ids=[c[0] for c in CONVERGES])
def test_reaches_the_minimum_of_the_valley(optimizer, steps, tol):
    path, losses = V.trajectory("quadratic", optimizer, steps)
    assert V.distance_to_minimum("quadratic", path[-1]) < tol
    assert losses[-1] < 1e-6 * losses[0]


def test_momentum_beats_plain_sgd_on_the_valley():
    """The lecture's point: at its best step size SGD crawls along the valley, momentum does not."""
    q = V.QUADRATIC
    b = q.grad(np.array([0.0, 1.0]))[1]  # the steep curvature
    sgd = V.trajectory(q, "sgd", 100, lr=2 / (1 + b))[0]  # 2 / (a + b): GD's optimal rate
    momentum = V.trajectory(q, "momentum", 100)[0]
    assert V.distance_to_minimum(q, momentum[-1]) < 0.2 * V.distance_to_minimum(q, sgd[-1])


@pytest.mark.parametrize("b", [20.0, 50.0, 100.0])
def test_sgd_diverges_past_two_over_curvature(b):
    """Gradient descent on the valley is stable for lr < 2 / b and diverges above it."""
    q = V.quadratic(1.0, b)
    stable, stable_losses = V.trajectory(q, "sgd", 200, lr=1.9 / b)
    _, unstable_losses = V.trajectory(q, "sgd", 200, lr=2.1 / b)
    assert stable_losses[-1] < 1e-3 * stable_losses[0]
    assert unstable_losses[-1] > 1e3 * unstable_losses[0]
    # y flips sign every step: the zig-zag
    assert (np.sign(stable[1:30, 1]) == -np.sign(stable[:29, 1])).all()


def test_divergence_to_overflow_leaves_nan_rows():
    path, losses = V.trajectory("quadratic", "sgd", 2000, lr=1.0)
    assert path.shape == (2001, 2)
    first_nan = int(np.argmax(np.isnan(losses)))
    assert 0 < first_nan < 2000 and np.isnan(path[first_nan:]).all()
    assert np.isfinite(losses[:first_nan]).all()
    rows = V.summary_rows("quadratic", {"sgd": (path, losses)})
    assert rows == [("quadratic", "sgd", np.inf, np.inf)]


def test_hyper_parameters_layering():
    assert V.hyper_parameters("quadratic", "nesterov") == dict(momentum=0.9, nesterov=True, lr=0.01)
    assert V.hyper_parameters("rosenbrock", "adam", lr=1.0, betas=(0.5, 0.9)) == \
        dict(lr=1.0, betas=(0.5, 0.9))
    path_default, _ = V.trajectory("quadratic", "adam", 5)
    path_other, _ = V.trajectory("quadratic", "adam", 5, lr=0.01)
    assert not np.allclose(path_default, path_other)


@pytest.mark.parametrize("call,message", [
    (lambda: V.trajectory("quadratic", "sgdd"), "optimizer must be one of"),
    (lambda: V.trajectory("bowl", "sgd"), "problem must be one of"),
    (lambda: V.trajectory("quadratic", "sgd", -1), "steps must be"),
    (lambda: V.trajectory("quadratic", "sgd", 2.5), "steps must be"),
    (lambda: V.trajectory("quadratic", "sgd", lr=-1), "learning rate"),
    (lambda: V.quadratic(5.0, 1.0), "0 < a <= b"),
    (lambda: V.plot_valley("x.png", optimizers=("adam", "nope")), "optimizer must be one of"),
])
def test_bad_arguments(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_plot_valley_writes_a_png_and_a_table(tmp_path):
    from matplotlib.image import imread

    optimizers = ("sgd", "momentum", "adam")
    out, rows = V.plot_valley(tmp_path / "sub" / "valley.png", optimizers, steps=60)
    assert out == tmp_path / "sub" / "valley.png"
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = imread(out)
    assert image.shape[0] > 300 and image.shape[1] > 400
    assert image[..., :3].std() > 0.05  # something was drawn
    assert [r[:2] for r in rows] == [(p, o) for p in ("quadratic", "rosenbrock") for o in optimizers]
    for problem, optimizer, loss, distance in rows:
        path, losses = V.trajectory(problem, optimizer, 60)
        assert loss == pytest.approx(losses[-1])
        assert distance == pytest.approx(V.distance_to_minimum(problem, path[-1]))
