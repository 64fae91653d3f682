"""Schedules against their textbook formulas, evaluated independently here."""
import math
import pickle

import numpy as np
import pytest

import fastopt
from fastopt import schedules as S

T = [0, 1, 2, 7, 10, 99, 100, 101, 1000]

# (schedule, the formula it must follow)
CASES = [
    (S.constant(0.1), lambda t: 0.1),
    (S.step_decay(0.1, 0.5, 10), lambda t: 0.1 * 0.5 ** math.floor(t / 10)),
    (S.exponential_decay(0.1, 0.01), lambda t: 0.1 * math.exp(-0.01 * t)),
    (S.inverse_time_decay(0.1, 0.05), lambda t: 0.1 / (1 + 0.05 * t)),
    (S.cosine_decay(0.1, 100, final=0.001),
     lambda t: 0.001 + 0.099 * (1 + math.cos(math.pi * min(t, 100) / 100)) / 2),
    (S.linear_warmup(0.1, 10), lambda t: 0.1 * min(t, 10) / 10),
    (S.warmup_cosine(0.1, 10, 110),
     lambda t: 0.1 * t / 10 if t < 10 else 0.1 * (1 + math.cos(math.pi * min(t - 10, 100) / 100)) / 2),
    (S.join([S.constant(1.0), S.constant(0.5), S.step_decay(0.25, 0.1, 2)], [5, 8]),
     lambda t: 1.0 if t < 5 else 0.5 if t < 8 else 0.25 * 0.1 ** ((t - 8) // 2)),
]


@pytest.mark.parametrize("schedule,formula", CASES, ids=[repr(c[0])[:40] for c in CASES])
def test_schedule_follows_formula(schedule, formula):
    for t in T:
        assert schedule(t) == pytest.approx(formula(t), rel=1e-12, abs=1e-15), t


def test_warmup_is_continuous_at_the_boundary():
    s = S.warmup_cosine(0.1, 10, 110)
    assert s(9) < s(10) == pytest.approx(0.1)
    assert s(11) < s(10)


@pytest.mark.parametrize("make,message", [
    (lambda: S.step_decay(0.1, 1.5, 10), "factor"),
    (lambda: S.step_decay(0.1, 0.5, 0), "every"),
    (lambda: S.exponential_decay(-1, 0.1), "init"),
    (lambda: S.cosine_decay(0.1, 0), "steps"),
    (lambda: S.linear_warmup(float("nan"), 5), "peak"),
    (lambda: S.join([S.constant(1)], [5]), "one boundary fewer"),
    (lambda: S.join([S.constant(1), S.constant(2)], [0]), "boundaries"),
    (lambda: S.join([S.constant(1), S.constant(2)], [True]), "boundaries"),
    (lambda: S.constant(True), "value"),
    (lambda: S.warmup_cosine(0.1, 10, 10), "total_steps"),
])
def test_bad_arguments_name_the_argument(make, message):
    with pytest.raises(ValueError, match=message):
        make()


# join at and around each boundary, the values written out by hand: at t == boundary the
# next schedule starts, at its own t = 0
JOIN_AT_BOUNDARIES = [
    (S.join([S.constant(1.0), S.constant(0.5), S.step_decay(0.25, 0.1, 2)], [5, 8]),
     {0: 1.0, 4: 1.0, 5: 0.5, 6: 0.5, 7: 0.5, 8: 0.25, 9: 0.25, 10: 0.025}),
    (S.join([S.linear_warmup(1.0, 4), S.linear_warmup(2.0, 10)], [4]),
     {3: 0.75, 4: 0.0, 5: 0.2, 14: 2.0}),
    (S.join([S.constant(3.0), S.constant(4.0)], [1]), {0: 3.0, 1: 4.0, 2: 4.0}),
    (S.warmup_cosine(0.1, 10, 110), {9: 0.09, 10: 0.1, 110: 0.0}),
]


@pytest.mark.parametrize("schedule,values", JOIN_AT_BOUNDARIES, ids=[repr(c[0])[:40] for c in JOIN_AT_BOUNDARIES])
def test_join_at_its_boundaries(schedule, values):
    for t, expected in values.items():
        assert schedule(t) == pytest.approx(expected, rel=1e-12, abs=1e-15), t


def test_join_takes_numpy_integer_boundaries():
    """As every other count of a schedule (``every``, ``steps``)."""
    parts = [S.constant(1.0), S.step_decay(0.5, 0.1, 2)]
    joined, plain = S.join(parts, np.array([3])), S.join(parts, [3])
    assert repr(joined) == repr(plain)
    assert joined.rows == plain.rows
    assert [joined(t) for t in T] == [plain(t) for t in T]


# -- the device rows (capturable=True): the same values from the rows table ----------------
NESTED = S.join([S.warmup_cosine(0.2, 3, 20, final=0.01), S.step_decay(0.05, 0.5, 4),
                 S.join([S.exponential_decay(0.02, 0.1), S.inverse_time_decay(0.01, 0.3)], [5])], [12, 30])
ROWS_CASES = [schedule for schedule, _ in CASES] + [NESTED]


@pytest.mark.parametrize("schedule", ROWS_CASES, ids=[repr(s)[:40] for s in ROWS_CASES])
def test_device_rows_give_the_host_values(schedule):
    """``lr_on_device`` over a table holding the schedule's rows after another schedule's
    (as an optimizer's table of several groups) equals the host callable, bit for bit."""
    other = S.constant(7.0).rows
    table = np.array([*other, *schedule.rows], np.float64)
    for t in [*range(60), 99, 100, 101, 1000, 123457]:
        assert S.lr_on_device(table, len(other), len(schedule.rows), t) == schedule(t), t


def test_a_join_of_a_host_only_callable_has_no_rows():
    assert S.join([S.constant(1.0), lambda t: 0.5], [3]).rows is None
    assert len(NESTED.rows) == 5  # a row per part: warm-up, cosine, step, exponential, inverse time


# -- in a pickled state dict (torch.save pickles): a schedule is part of the param group ----
@pytest.mark.parametrize("schedule", ROWS_CASES, ids=[repr(s)[:40] for s in ROWS_CASES])
def test_a_pickled_state_dict_resumes_the_run_bit_exact(schedule):
    rng = np.random.default_rng(0)
    start = rng.standard_normal(8).astype(np.float32)
    grads = [rng.standard_normal(8).astype(np.float32) for _ in range(16)]
    p = start.copy()
    opt = fastopt.AdamW([p], lr=schedule)
    for g in grads:
        opt.step([g])
    resumed = start.copy()
    opt = fastopt.AdamW([resumed], lr=schedule)
    for g in grads[:6]:
        opt.step([g])
    saved = pickle.loads(pickle.dumps(opt.state_dict()))
    loaded = saved["param_groups"][0]["lr"]
    assert loaded is not schedule and repr(loaded) == repr(schedule) and loaded.rows == schedule.rows
    assert [loaded(t) for t in T] == [schedule(t) for t in T]
    opt = fastopt.AdamW([resumed], lr=schedule)
    opt.load_state_dict(saved)
    for g in grads[6:]:
        opt.step([g])
    np.testing.assert_array_equal(resumed, p)
