"""Optimizer trajectories on 2-D test problems: the lecture notes' narrow-valley pictures.

Two problems, each with its value, gradient, start point, minimum and plot bounds:

    quadratic    f(x, y) = (a x^2 + b y^2) / 2,  a = 1, b = 50: a narrow valley along x.
                 Curvatures a and b, condition number kappa = b / a = 50. Plain gradient
                 descent is stable for lr < 2 / b = 0.04; near that limit it zig-zags across
                 the valley (y shrinks by |1 - lr b| per step) while crawling along it
                 (x shrinks by 1 - lr a), so momentum pays off (see :func:`quadratic`).
    rosenbrock   f(x, y) = (1 - x)^2 + 100 (y - x^2)^2: a curved, flat-bottomed valley
                 with its minimum at (1, 1); curvature ~1000 across it, ~0.4 along it.

:func:`trajectory` runs one optimizer on the float64 point (x, y) with the fused in-place
rules of :mod:`fastopt.functional`; :func:`plot_valley` draws every trajectory over the
contours of both problems and returns a table of final loss and distance to the minimum.
"""
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .. import functional as F
from ..kernels import RULES

# optimizer name -> (rule in fastopt.kernels.RULES, hyper-parameters that define the name)
OPTIMIZERS = {
    "sgd": ("sgd", {}),
    "momentum": ("sgd", dict(momentum=0.9)),
    "nesterov": ("sgd", dict(momentum=0.9, nesterov=True)),
    "adagrad": ("adagrad", {}),
    "rmsprop": ("rmsprop", {}),
    "adam": ("adam", {}),
    "adamw": ("adamw", {}),
    "nadam": ("nadam", {}),
    "radam": ("radam", {}),
    "adamax": ("adamax", {}),
    "adadelta": ("adadelta", {}),
    "lion": ("lion", {}),
}
LECTURE_OPTIMIZERS = ("sgd", "momentum", "nesterov", "adagrad", "rmsprop", "adam")
TABLE_HEADERS = ("problem", "optimizer", "final loss", "distance to minimum")


@dataclass(frozen=True)
class Problem:
    """A 2-D objective. ``f(x, y)`` works element-wise on arrays (for contour grids);
    ``grad(p)`` is the gradient at the point ``p = (x, y)``. ``hyper[name]`` holds the
    default hyper-parameters of optimizer ``name`` on this problem (tuned for the picture)."""

    name: str
    formula: str
    f: Callable
    grad: Callable
    start: tuple
    minimum: tuple
    bounds: tuple  # ((x_lo, x_hi), (y_lo, y_hi))
    steps: int
    hyper: dict = field(default_factory=dict)
    log_levels: bool = False  # contour levels log-spaced (values spanning decades)

    def value(self, p):
        return float(self.f(p[0], p[1]))


def quadratic(a=1.0, b=50.0):
    """The narrow valley ``f(x, y) = (a x^2 + b y^2) / 2`` (a < b: the valley runs along x).

    The step sizes of the non-adaptive rules scale with ``1 / b``: plain SGD gets 1.8 / b,
    90% of its stability limit 2 / b, so that it visibly zig-zags (|1 - lr b| = 0.8 per
    step); momentum and Nesterov get 0.5 / b; RAdam, whose first steps are plain momentum
    SGD, 1.5 / b. The adaptive rules take steps of about ``lr`` per coordinate whatever
    the curvature, so theirs are fixed."""
    if not 0 < a <= b:
        raise ValueError(f"need 0 < a <= b for a valley along x, got a={a!r}, b={b!r}")
    a_text = "" if a == 1 else f"{a:g}"
    return Problem(
        name="quadratic",
        formula=f"$f(x, y) = ({a_text}x^2 + {b:g}y^2)\\,/\\,2$",
        f=lambda x, y: 0.5 * (a * x * x + b * y * y),
        grad=lambda p: np.array([a * p[0], b * p[1]]),
        start=(-9.0, 1.5), minimum=(0.0, 0.0), bounds=((-10.0, 2.0), (-2.5, 2.5)), steps=100,
        hyper=dict(sgd=dict(lr=1.8 / b), momentum=dict(lr=0.5 / b), nesterov=dict(lr=0.5 / b),
                   adagrad=dict(lr=1.5), rmsprop=dict(lr=0.1), adam=dict(lr=0.3), adamw=dict(lr=0.3),
                   nadam=dict(lr=0.3), radam=dict(lr=1.5 / b), adamax=dict(lr=0.5),
                   adadelta=dict(lr=50.0), lion=dict(lr=0.1)),
    )


QUADRATIC = quadratic()

ROSENBROCK = Problem(
    name="rosenbrock",
    formula="$f(x, y) = (1 - x)^2 + 100\\,(y - x^2)^2$",
    f=lambda x, y: (1 - x) ** 2 + 100 * (y - x * x) ** 2,
    grad=lambda p: np.array([-2 * (1 - p[0]) - 400 * p[0] * (p[1] - p[0] ** 2),
                             200 * (p[1] - p[0] ** 2)]),
    start=(-1.5, 2.0), minimum=(1.0, 1.0), bounds=((-2.0, 2.0), (-1.0, 3.0)), steps=2000,
    hyper=dict(sgd=dict(lr=1.5e-3), momentum=dict(lr=3e-4), nesterov=dict(lr=3e-4),
               adagrad=dict(lr=0.5), rmsprop=dict(lr=3e-3), adam=dict(lr=0.05), adamw=dict(lr=0.05),
               nadam=dict(lr=0.02), radam=dict(lr=6e-3), adamax=dict(lr=0.1),
               adadelta=dict(lr=0.5), lion=dict(lr=3e-3)),
    log_levels=True,
)

PROBLEMS = {p.name: p for p in (QUADRATIC, ROSENBROCK)}


def _problem(problem):
    if isinstance(problem, Problem):
        return problem
    if problem not in PROBLEMS:
        raise ValueError(f"problem must be one of {sorted(PROBLEMS)} or a Problem, got {problem!r}")
    return PROBLEMS[problem]


def _rule(optimizer):
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {sorted(OPTIMIZERS)}, got {optimizer!r}")
    return OPTIMIZERS[optimizer]


def hyper_parameters(problem, optimizer, **overrides):
    """The hyper-parameters :func:`trajectory` uses: those that define ``optimizer``
    (momentum 0.9 for "momentum"), then the problem's tuned defaults, then ``overrides``."""
    problem = _problem(problem)
    _, fixed = _rule(optimizer)
    return {**fixed, **problem.hyper.get(optimizer, {}), **overrides}


def trajectory(problem, optimizer, steps=None, **hyper):
    """Run ``optimizer`` for ``steps`` updates (default ``problem.steps``) from
    ``problem.start``. Returns ``(path, losses)``: path (steps + 1, 2) float64 with the
    start in row 0, losses (steps + 1,). ``hyper`` overrides the defaults (see
    :func:`hyper_parameters`). Once the point leaves the floats (a diverging run) the
    remaining rows are NaN, so the shapes do not depend on the outcome."""
    problem = _problem(problem)
    rule, _ = _rule(optimizer)
    steps = problem.steps if steps is None else steps
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 0:
        raise ValueError(f"steps must be a non-negative integer, got {steps!r}")
    update = getattr(F, f"{rule}_")
    hp = hyper_parameters(problem, optimizer, **hyper)
    p = np.array(problem.start, dtype=np.float64)
    # every rule's state starts at zero; unused ones (e.g. amsgrad's) are ignored by the rule
    states = [np.zeros(2) for _ in RULES[rule][0].states]
    path = np.full((steps + 1, 2), np.nan)
    losses = np.full(steps + 1, np.nan)
    path[0], losses[0] = p, problem.value(p)
    with np.errstate(over="ignore", invalid="ignore"):
        for t in range(1, steps + 1):
            update(p, problem.grad(p), *states, step=t, **hp)
            loss = problem.value(p)
            if not (np.isfinite(loss) and np.isfinite(p).all()):
                break
            path[t], losses[t] = p, loss
    return path, losses


def distance_to_minimum(problem, point):
    """Euclidean distance from ``point`` to the problem's minimum (NaN for a NaN point)."""
    return float(np.hypot(*(np.asarray(point) - _problem(problem).minimum)))


def run_all(problem, optimizers=LECTURE_OPTIMIZERS, steps=None):
    """``{optimizer: (path, losses)}`` for each optimizer with its default hyper-parameters."""
    return {name: trajectory(problem, name, steps) for name in optimizers}


def summary_rows(problem, runs):
    """Rows ``(problem, optimizer, final loss, distance to minimum)`` for :data:`TABLE_HEADERS`;
    a diverged run reports inf."""
    problem = _problem(problem)
    rows = []
    for name, (path, losses) in runs.items():
        diverged = np.isnan(losses[-1])
        rows.append((problem.name, name, np.inf if diverged else float(losses[-1]),
                     np.inf if diverged else distance_to_minimum(problem, path[-1])))
    return rows


def _levels(problem, n=25):
    """Contour levels: log-spaced for a problem whose values span decades (Rosenbrock),
    otherwise f at evenly spaced points of the x-axis, so the ellipses are evenly spaced."""
    (x_lo, x_hi), (y_lo, y_hi) = problem.bounds
    corners = [problem.f(x, y) for x in (x_lo, x_hi) for y in (y_lo, y_hi)]
    if problem.log_levels:
        return np.logspace(-2, np.log10(max(corners)), n)
    return np.linspace(0, np.sqrt(max(corners)), n + 1)[1:] ** 2


def plot_valley(out_path, optimizers=LECTURE_OPTIMIZERS, steps=None,
                problems=("quadratic", "rosenbrock"), dpi=100):
    """Draw each problem's contours with every optimizer's trajectory (one colour per
    optimizer, the same in every panel) and save a PNG. ``steps`` defaults to each
    problem's own (quadratic 100, Rosenbrock 2000). Returns ``(path, rows)``: the saved
    file and the table rows of :func:`summary_rows` for all problems
    (print them with ``fastopt.plots.format_table(rows, TABLE_HEADERS)``)."""
    for name in optimizers:
        _rule(name)
    problems = [_problem(p) for p in problems]
    from matplotlib.figure import Figure  # no pyplot: no global backend, no figure registry

    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig = Figure(figsize=(6.5 * len(problems), 6.5), dpi=dpi, layout="constrained")
    axes = fig.subplots(1, len(problems), squeeze=False)[0]
    colours = _colours(len(optimizers))
    rows = []
    for ax, problem in zip(axes, problems):
        runs = run_all(problem, optimizers, steps)
        rows += summary_rows(problem, runs)
        (x_lo, x_hi), (y_lo, y_hi) = problem.bounds
        X, Y = np.meshgrid(np.linspace(x_lo, x_hi, 300), np.linspace(y_lo, y_hi, 300))
        ax.contour(X, Y, problem.f(X, Y), levels=_levels(problem), colors="0.75", linewidths=0.7)
        for colour, (name, (path, _)) in zip(colours, runs.items()):
            lr = hyper_parameters(problem, name).get("lr")
            ax.plot(path[:, 0], path[:, 1], "-", color=colour, lw=1.4, marker="o", ms=2,
                    markevery=max(1, len(path) // 100),
                    label=name if lr is None else f"{name} (lr={lr:g})")
        ax.plot(*problem.start, "ko", ms=6)
        ax.plot(*problem.minimum, "k*", ms=12, label="minimum")
        ax.set(xlim=(x_lo, x_hi), ylim=(y_lo, y_hi), xlabel="x", ylabel="y",
               title=f"{problem.name}: {problem.formula}, {len(path) - 1} steps")
        # below the panel: inside it the legend would hide trajectories
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=3, fontsize=8)
    fig.suptitle("Optimizer trajectories from the start (black dot) towards the minimum (star)")
    fig.savefig(out_path)
    return out_path, rows


def _colours(n):
    """n distinct colours: tab20's ten dark hues first, then their light twins."""
    from matplotlib import colormaps
    cmap = colormaps["tab20"]
    return [cmap((2 * i) % 20 + (i // 10) % 2) for i in range(n)]
