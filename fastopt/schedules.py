"""Learning-rate schedules: callables of ``t``, the number of updates done before this one
(0 for the first update; optax's ``count``). Evaluated on the host, once per step, or on the
device from the device's step count by an optimizer built with ``capturable=True`` (any
schedule built here, joins of them included: :attr:`Schedule.rows`).

    constant(a0)                          a0
    step_decay(a0, factor, every)         a0 * factor ** (t // every)      (lecture notes: "halve every few epochs")
    exponential_decay(a0, k)              a0 * exp(-k t)
    inverse_time_decay(a0, k)             a0 / (1 + k t)                   (lecture notes: "1/t decay")
    cosine_decay(a0, steps, final=0)      final + (a0 - final) (1 + cos(pi min(t, steps) / steps)) / 2
    linear_warmup(peak, steps, start=0)   start + (peak - start) min(t, steps) / steps
    join(schedules, boundaries)           schedules[i](t - boundaries[i-1]) between boundaries
"""
from __future__ import annotations

import bisect
import functools
import math
from collections.abc import Callable, Iterable, Sequence

import numpy as np

# The kinds of built-in schedule and the one formula of each live beside the device step
# (the bottom floor), which evaluates them from the device step count; the host's callables
# call the same functions.
from .kernels._device import (  # noqa: F401 - the rows' kinds and lr_on_device, re-exported
    CONSTANT,
    COSINE,
    EXPONENTIAL,
    INVERSE_TIME,
    STEP,
    WARMUP,
    Row,
    _cosine,
    _exponential,
    _inverse_time,
    _step_decay,
    _warmup,
    lr_on_device,
)


def _number(name: str, value: float, lo: float = 0.0, hi: float = math.inf, hi_closed: bool = False) -> None:
    try:  # a bool is no number here, as for an optimizer's lr
        ok = not isinstance(value, (bool, np.bool_)) and (lo <= value < hi or (hi_closed and value == hi))
    except TypeError:
        ok = False
    if not ok:
        raise ValueError(f"{name} must be a number in [{lo}, {hi}{']' if hi_closed else ')'}, got {value!r}")


def _is_count(value: int) -> bool:
    return not isinstance(value, (bool, np.bool_)) and isinstance(value, (int, np.integer)) and value >= 1


def _count(name: str, value: int) -> None:
    if not _is_count(value):
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


class Schedule:
    """A named schedule; ``repr`` shows how it was built (for logs and checkpoints).

    fn: ``fn(t) -> number``, the value after ``t`` updates (t >= 0); description: the ``repr``;
    rows: the same schedule as device rows (:data:`Row`), or None (default) for one that only
    the host can evaluate. Calling it checks ``t >= 0`` and returns ``float(fn(t))``. The
    built-in schedules' ``fn`` are partials of module functions, not lambdas, so that a
    schedule pickles (an optimizer's ``state_dict()`` holds it)."""

    def __init__(self, fn: Callable[[int], float], description: str, rows: Sequence[Row] | None = None) -> None:
        self._fn, self._description = fn, description
        self.rows = None if rows is None else tuple(rows)

    def __call__(self, t: int) -> float:
        if t < 0:
            raise ValueError(f"t must be >= 0 (updates done so far), got {t}")
        return float(self._fn(t))

    def __repr__(self) -> str:
        return self._description


def constant(value: float) -> Schedule:
    """``value`` at every step. value: a number >= 0."""
    _number("value", value)
    return Schedule(functools.partial(_constant, value=value), f"constant({value})",
                    [(0, 0, CONSTANT, value, 0.0, 0.0)])


def step_decay(init: float, factor: float, every: int) -> Schedule:
    """``init * factor ** (t // every)``: multiplied by ``factor`` every ``every`` updates.

    init: >= 0; factor: in [0, 1]; every: a positive integer."""
    _number("init", init)
    _number("factor", factor, 0.0, 1.0, hi_closed=True)
    _count("every", every)
    return Schedule(functools.partial(_step_decay, init=init, factor=factor, every=every),
                    f"step_decay({init}, {factor}, {every})",
                    [(0, 0, STEP, init, factor, every)])


def exponential_decay(init: float, k: float) -> Schedule:
    """``init * exp(-k t)``. init, k: numbers >= 0."""
    _number("init", init)
    _number("k", k)
    return Schedule(functools.partial(_exponential, init=init, k=k), f"exponential_decay({init}, {k})",
                    [(0, 0, EXPONENTIAL, init, k, 0.0)])


def inverse_time_decay(init: float, k: float) -> Schedule:
    """``init / (1 + k t)`` (1/t decay). init, k: numbers >= 0."""
    _number("init", init)
    _number("k", k)
    return Schedule(functools.partial(_inverse_time, init=init, k=k), f"inverse_time_decay({init}, {k})",
                    [(0, 0, INVERSE_TIME, init, k, 0.0)])


def cosine_decay(init: float, steps: int, final: float = 0.0) -> Schedule:
    """Half a cosine from ``init`` at t = 0 to ``final`` (default 0.0) at t = ``steps``, then
    ``final``. init, final: >= 0; steps: a positive integer."""
    _number("init", init)
    _count("steps", steps)
    _number("final", final)
    return Schedule(functools.partial(_cosine, init=init, steps=steps, final=final),
                    f"cosine_decay({init}, {steps}, final={final})",
                    [(0, 0, COSINE, init, steps, final)])


def linear_warmup(peak: float, steps: int, start: float = 0.0) -> Schedule:
    """A straight line from ``start`` (default 0.0) at t = 0 to ``peak`` at t = ``steps``, then
    ``peak``. peak, start: >= 0; steps: a positive integer."""
    _number("peak", peak)
    _count("steps", steps)
    _number("start", start)
    return Schedule(functools.partial(_warmup, peak=peak, steps=steps, start=start),
                    f"linear_warmup({peak}, {steps}, start={start})",
                    [(0, 0, WARMUP, peak, steps, start)])


def join(schedules: Iterable[Callable[[int], float]], boundaries: Iterable[int]) -> Schedule:
    """``schedules[0]`` until ``boundaries[0]``, then ``schedules[1]`` restarted at 0, ...

    schedules: callables of t (one more than boundaries); boundaries: increasing positive
    integers, the update counts at which the next schedule takes over."""
    schedules, boundaries = list(schedules), list(boundaries)
    if len(schedules) != len(boundaries) + 1:
        raise ValueError(f"join needs one boundary fewer than schedules, got {len(schedules)} schedules "
                         f"and {len(boundaries)} boundaries")
    for s in schedules:
        if not callable(s):
            raise ValueError(f"schedules must be callables of t, got {s!r}")
    if not all(map(_is_count, boundaries)) or boundaries != sorted(set(boundaries)):
        raise ValueError(f"boundaries must be increasing positive integers, got {boundaries}")
    boundaries = [int(b) for b in boundaries]  # NumPy's: the repr shows 3, not np.int64(3)
    return Schedule(functools.partial(_joined, schedules=schedules, boundaries=boundaries),
                    f"join({schedules}, {boundaries})", _joined_rows(schedules, boundaries))


def _constant(t: int, value: float) -> float:
    return value


def _joined(t: int, schedules: list, boundaries: list[int]) -> float:
    i = bisect.bisect_right(boundaries, t)
    return schedules[i](t - (boundaries[i - 1] if i else 0))


def _joined_rows(schedules: list, boundaries: list[int]) -> list[Row] | None:
    """The device rows of a join: each part's rows moved to where it starts (a nested join
    flattens), those that would start after the part ends dropped; None if a part has none."""
    rows = []
    for i, s in enumerate(schedules):
        lo = boundaries[i - 1] if i else 0
        hi = boundaries[i] if i < len(boundaries) else math.inf
        if getattr(s, "rows", None) is None:
            return None
        rows += [(lo + start, lo + origin, *rest) for start, origin, *rest in s.rows if lo + start < hi]
    return rows


def warmup_cosine(peak: float, warmup_steps: int, total_steps: int, final: float = 0.0) -> Schedule:
    """Linear warm-up from 0 to ``peak`` over ``warmup_steps``, then cosine decay to ``final``
    (default 0.0) at ``total_steps``, which must exceed ``warmup_steps`` (both positive integers)."""
    _count("warmup_steps", warmup_steps)
    _count("total_steps", total_steps)
    if total_steps <= warmup_steps:
        raise ValueError(f"total_steps ({total_steps}) must exceed warmup_steps ({warmup_steps})")
    return join([linear_warmup(peak, warmup_steps), cosine_decay(peak, total_steps - warmup_steps, final)],
                [warmup_steps])
