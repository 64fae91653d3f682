"""Learning-rate schedules: callables of ``t``, the number of updates done before this one
(0 for the first update; optax's ``count``). Evaluated on the host, once per step.

    constant(a0)                          a0
    step_decay(a0, factor, every)         a0 * factor ** (t // every)      (lecture notes: "halve every few epochs")
    exponential_decay(a0, k)              a0 * exp(-k t)
    inverse_time_decay(a0, k)             a0 / (1 + k t)                   (lecture notes: "1/t decay")
    cosine_decay(a0, steps, final=0)      final + (a0 - final) (1 + cos(pi min(t, steps) / steps)) / 2
    linear_warmup(peak, steps, start=0)   start + (peak - start) min(t, steps) / steps
    join(schedules, boundaries)           schedules[i](t - boundaries[i-1]) between boundaries
"""
import bisect
import math


def _number(name, value, lo=0.0, hi=math.inf, hi_closed=False):
    try:
        ok = lo <= value < hi or (hi_closed and value == hi)
    except TypeError:
        ok = False
    if not ok:
        raise ValueError(f"{name} must be a number in [{lo}, {hi}{']' if hi_closed else ')'}, got {value!r}")


def _count(name, value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


class Schedule:
    """A named schedule; ``repr`` shows how it was built (for logs and checkpoints)."""

    def __init__(self, fn, description):
        self._fn, self._description = fn, description

    def __call__(self, t):
        if t < 0:
            raise ValueError(f"t must be >= 0 (updates done so far), got {t}")
        return float(self._fn(t))

    def __repr__(self):
        return self._description


def constant(value):
    _number("value", value)
    return Schedule(lambda t: value, f"constant({value})")


def step_decay(init, factor, every):
    _number("init", init)
    _number("factor", factor, 0.0, 1.0, hi_closed=True)
    _count("every", every)
    return Schedule(lambda t: init * factor ** (t // every), f"step_decay({init}, {factor}, {every})")


def exponential_decay(init, k):
    _number("init", init)
    _number("k", k)
    return Schedule(lambda t: init * math.exp(-k * t), f"exponential_decay({init}, {k})")


def inverse_time_decay(init, k):
    _number("init", init)
    _number("k", k)
    return Schedule(lambda t: init / (1 + k * t), f"inverse_time_decay({init}, {k})")


def cosine_decay(init, steps, final=0.0):
    _number("init", init)
    _count("steps", steps)
    _number("final", final)
    return Schedule(lambda t: final + (init - final) * 0.5 * (1 + math.cos(math.pi * min(t, steps) / steps)),
                    f"cosine_decay({init}, {steps}, final={final})")


def linear_warmup(peak, steps, start=0.0):
    _number("peak", peak)
    _count("steps", steps)
    _number("start", start)
    return Schedule(lambda t: start + (peak - start) * min(t, steps) / steps,
                    f"linear_warmup({peak}, {steps}, start={start})")


def join(schedules, boundaries):
    """``schedules[0]`` until ``boundaries[0]``, then ``schedules[1]`` restarted at 0, ..."""
    schedules, boundaries = list(schedules), list(boundaries)
    if len(schedules) != len(boundaries) + 1:
        raise ValueError(f"join needs one boundary fewer than schedules, got {len(schedules)} schedules "
                         f"and {len(boundaries)} boundaries")
    for s in schedules:
        if not callable(s):
            raise ValueError(f"schedules must be callables of t, got {s!r}")
    if any(not isinstance(b, int) or b < 1 for b in boundaries) or boundaries != sorted(set(boundaries)):
        raise ValueError(f"boundaries must be increasing positive integers, got {boundaries}")

    def fn(t):
        i = bisect.bisect_right(boundaries, t)
        return schedules[i](t - (boundaries[i - 1] if i else 0))
    return Schedule(fn, f"join({schedules}, {boundaries})")


def warmup_cosine(peak, warmup_steps, total_steps, final=0.0):
    """Linear warm-up from 0 to ``peak``, then cosine decay to ``final`` at ``total_steps``."""
    _count("total_steps", total_steps)
    if total_steps <= warmup_steps:
        raise ValueError(f"total_steps ({total_steps}) must exceed warmup_steps ({warmup_steps})")
    return join([linear_warmup(peak, warmup_steps), cosine_decay(peak, total_steps - warmup_steps, final)],
                [warmup_steps])
