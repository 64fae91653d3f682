"""Whole-model optimizers against the rules' NumPy references, in every form params take:
a ParamBuffer (one flat pass), a ParamBuffer split into param groups, separate arrays."""
import math

import numpy as np
import pytest

import fastopt
from cases import N_DRAWS, hparams
from conftest import to_backend, to_host
from fastopt import optimizer
from fastopt.kernels import RULES, _dispatch

SHAPES = [(7, 5), (3,), (11, 13), (1,), (0,), (2, 3, 4)]  # odd sizes, a scalar-like and an empty one
STEPS = 5
MODES = ["buffer", "groups", "lists"]


def _other(hp):
    """A second group's hyper-parameters: half the lr, no weight decay (as for biases)."""
    out = dict(hp, lr=hp.get("lr", 1e-3) / 2)
    if "weight_decay" in out:
        out["weight_decay"] = 0.0
    return out


def _build(rule, hp, mode, init, dtype=np.float64):
    cls = fastopt.OPTIMIZERS[rule]
    if mode == "lists":
        params = [a.astype(dtype) for a in init]
        return cls(params, **hp), params, None
    buf = fastopt.ParamBuffer([a.astype(dtype) for a in init])
    if mode == "buffer":
        return cls(buf, **hp), buf.params, buf
    groups = [{"params": buf.params[0::2]}, {"params": buf.params[1::2], **_other(hp)}]
    return cls(groups, **hp), buf.params, buf


def _hp_per_param(hp, mode):
    """Each param's hyper-parameters: in "groups" mode odd tensors form the second group."""
    return [_other(hp) if mode == "groups" and i % 2 else hp for i in range(len(SHAPES))]


def _run(opt, params, buf, grads_per_step):
    for grads in grads_per_step:
        if buf is not None:
            for view, g in zip(buf.grads, grads):
                view[...] = g
            opt.step()
        else:
            opt.step([g.astype(params[0].dtype) for g in grads])


def _reference(rule, hp_per_param, init, grads_per_step):
    module, _, ref = RULES[rule]
    params = [a.copy() for a in init]
    states = [[np.zeros(a.shape) for _ in module.states] for a in init]
    for t, grads in enumerate(grads_per_step, start=1):
        for p, g, s, hp in zip(params, grads, states, hp_per_param):
            ref(p, g, *s, step=t, **hp)
    return params, states


def _data(seed, steps=STEPS, shapes=SHAPES):
    rng = np.random.default_rng(seed)
    init = [rng.standard_normal(s) for s in shapes]
    return init, [[rng.standard_normal(s) for s in shapes] for _ in range(steps)]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("draw", range(N_DRAWS))
@pytest.mark.parametrize("rule", sorted(RULES))
def test_matches_reference(rule, draw, mode):
    hp = hparams(rule, draw)
    init, grads = _data(draw)
    opt, params, buf = _build(rule, hp, mode, init)
    _run(opt, params, buf, grads)
    expected, states = _reference(rule, _hp_per_param(hp, mode), init, grads)
    for i, (got, want) in enumerate(zip(params, expected)):
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12, err_msg=f"param {i}")
    names = RULES[rule][0].states
    for k, p in enumerate(opt._params):  # the optimizer's order is group order
        i = next(i for i, q in enumerate(params) if q is p)
        group = next(g for g in opt.param_groups if any(q is p for q in g["params"]))
        views = opt.state_views(k)
        for name, want in zip(names, states[i]):
            if name in opt.states_needed(group):
                np.testing.assert_allclose(views[name], want, rtol=1e-10, atol=1e-12, err_msg=f"{name} of {i}")
    assert opt.steps == STEPS


@pytest.mark.parametrize("rule, draw", [("adamw", 1), ("sgd", 2), ("lion", 3), ("nadam", 4)])
def test_entry_point_steps_equal_the_dispatchers_bit_for_bit(rule, draw):
    """After its first step a plan calls its kernel's compiled entry point with Python floats
    (``Scalars.pack(native=True)``), which the unboxing rounds to float32: every step must
    give the bits of the in-place function (the dispatcher, NumPy float32 scalars)."""
    hp = hparams(rule, draw)
    init, grads = _data(draw)
    opt, params, buf = _build(rule, hp, "buffer", init, np.float32)
    _, inplace, _ = RULES[rule]
    names = RULES[rule][0].states
    mine = [a.astype(np.float32) for a in init]
    states = [{n: np.zeros(a.shape, np.float32) for n in opt.states_needed(opt.param_groups[0])} for a in init]
    for t, step_grads in enumerate(grads, start=1):
        for view, g in zip(buf.grads, step_grads):
            view[...] = g
        opt.step()
        for p, g, s in zip(mine, step_grads, states):
            inplace(p, g.astype(np.float32), *(s.get(n) for n in names), step=t, **hp)
        for i, (got, want) in enumerate(zip(params, mine)):
            np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32), err_msg=f"step {t}, param {i}")
    assert opt._plans[0].entry is not None, "the plan never took its entry point: nothing was compared"


@pytest.mark.parametrize("mode, launches_per_step", [("buffer", 1), ("groups", 2), ("lists", 2)])
def test_one_launch_per_group(mode, launches_per_step):
    init, grads = _data(0)
    opt, params, buf = _build("adam", {}, mode, init)
    if mode == "lists":  # two groups of separate arrays
        opt = fastopt.Adam([{"params": params[:3]}, {"params": params[3:], "lr": 1e-2}])
    _run(opt, params, buf, grads)
    assert opt.launches == launches_per_step * STEPS


def test_many_tensors_chunked_and_parallel(monkeypatch):
    """The list kernel splits big tensors into chunks shared by threads: force both with
    small sizes and compare with the flat pass over the same numbers."""
    monkeypatch.setattr(optimizer, "CHUNK", 7)
    monkeypatch.setattr(_dispatch, "PARALLEL_THRESHOLD", 0)
    shapes = [(40,), (3, 9), (1,), (64,), (5,)] * 4
    init, grads = _data(1, steps=3, shapes=shapes)
    flat, _, fbuf = _build("adam", dict(weight_decay=0.1), "buffer", init, np.float32)
    listed = fastopt.Adam([a.astype(np.float32) for a in init], weight_decay=0.1)
    _run(flat, fbuf.params, fbuf, grads)
    _run(listed, listed._params, None, grads)
    assert listed._plans[0].parallel and listed._plans[0].chunks.shape[0] > len(shapes)
    for a, b in zip(fbuf.params, listed._params):
        np.testing.assert_array_equal(a, b)


def test_lr_schedule_and_lr_property():
    sched = fastopt.schedules.warmup_cosine(peak=0.1, warmup_steps=2, total_steps=6)
    init, grads = _data(2, steps=4)
    opt, params, buf = _build("sgd", dict(lr=sched, momentum=0.9), "buffer", init)
    seen = []
    for g in grads:
        seen.append(opt.lr)
        _run(opt, params, buf, [g])
    assert seen == [sched(t) for t in range(4)]
    hp_per_step = [dict(lr=sched(t), momentum=0.9) for t in range(4)]
    expected = [a.copy() for a in init]
    bufs = [np.zeros(a.shape) for a in init]
    for t, (g, hp) in enumerate(zip(grads, hp_per_step), start=1):
        for p, gi, b in zip(expected, g, bufs):
            RULES["sgd"][2](p, gi, b, step=t, **hp)
    for got, want in zip(params, expected):
        np.testing.assert_allclose(got, want, rtol=1e-12)


def test_group_lr_set_by_hand_is_used():
    """As with torch, writing group["lr"] between steps changes the next step."""
    init, grads = _data(3, steps=2)
    opt, params, buf = _build("sgd", dict(lr=0.1), "buffer", init)
    _run(opt, params, buf, grads[:1])
    before = [p.copy() for p in params]
    opt.param_groups[0]["lr"] = 0.0
    _run(opt, params, buf, grads[1:])
    for a, b in zip(before, params):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("rule", sorted(RULES))
def test_state_dict_round_trip_is_exact(rule):
    hp = hparams(rule, 1)
    init, grads = _data(4, steps=6)
    a, pa, ba = _build(rule, hp, "groups", init)
    _run(a, pa, ba, grads[:3])
    sd = a.state_dict()
    b, pb, bb = _build(rule, hp, "groups", [p.copy() for p in pa])
    b.load_state_dict(sd)
    _run(a, pa, ba, grads[3:])
    _run(b, pb, bb, grads[3:])
    for x, y in zip(pa, pb):
        np.testing.assert_array_equal(x, y)
    assert b.steps == 6


@pytest.mark.cuda
@pytest.mark.parametrize("rule", ["sgd", "adam", "rmsprop", "lion"])
def test_cuda_lists_match_cpu(rule):
    hp = hparams(rule, 1)
    shapes = [(5, 7), (1,), (33,)]
    init, grads = _data(5, steps=3, shapes=shapes)
    cpu = fastopt.OPTIMIZERS[rule]([a.copy() for a in init], **hp)
    dev = fastopt.OPTIMIZERS[rule]([to_backend(a, "cuda") for a in init], **hp)
    for g in grads:
        cpu.step(g)
        dev.step([to_backend(x, "cuda") for x in g])
    assert dev.launches == 3 * len(shapes)
    for a, b in zip(cpu._params, dev._params):
        np.testing.assert_allclose(to_host(b), a, rtol=1e-12, atol=1e-14)


# -- bad input: a clear error naming the argument, nothing written --------------------

def _bad_cases():
    f64 = lambda *s: np.zeros(s)  # noqa: E731
    return [
        ("negative lr", lambda: fastopt.Adam([f64(3)], lr=-1.0), ValueError, "learning rate"),
        ("bad beta in a group", lambda: fastopt.Adam([{"params": [f64(3)], "betas": (0.9, 1.5)}]),
         ValueError, "param group 0.*beta"),
        ("schedule going negative", lambda: fastopt.SGD([f64(3)], lr=lambda t: -1.0), ValueError, "learning rate"),
        ("empty params", lambda: fastopt.SGD([], lr=0.1), ValueError, "params is empty"),
        ("mixed dtypes", lambda: fastopt.SGD([f64(3), np.zeros(3, np.float32)], lr=0.1), TypeError,
         r"params\[1\] has dtype float32 but params\[0\] has dtype float64"),
        ("int params", lambda: fastopt.SGD([np.zeros(3, np.int64)], lr=0.1), TypeError, r"params\[0\]"),
        ("read-only param", lambda: fastopt.SGD([_readonly(3)], lr=0.1),
         ValueError, r"params\[0\].*writeable"),
        ("strided param", lambda: fastopt.SGD([np.zeros(6)[::2]], lr=0.1), ValueError, "contiguous"),
        ("duplicate param", lambda: (lambda a: fastopt.SGD([a, a], lr=0.1))(f64(3)), ValueError, "more than once"),
        ("nesterov without momentum", lambda: fastopt.SGD([f64(3)], lr=0.1, nesterov=True), ValueError, "Nesterov"),
        ("negative initial accumulator", lambda: fastopt.Adagrad([f64(3)], initial_accumulator_value=-1),
         ValueError, "initial_accumulator_value"),
        ("buffer views mixed with arrays",
         lambda: (lambda buf: fastopt.SGD([buf.params[0], f64(3)], lr=0.1))(_LIVE.setdefault(0, fastopt.ParamBuffer(
             [f64(3)]))), ValueError, "mix"),
        ("overlapping params", lambda: (lambda a: fastopt.SGD([a[:4], a[2:]], lr=0.1))(f64(8)), ValueError,
         r"params\[0\] and params\[1\] share memory"),
    ]


_LIVE = {}  # keeps a ParamBuffer alive while a case uses its views


def _readonly(n):
    a = np.zeros(n)
    a.flags.writeable = False
    return a


@pytest.mark.parametrize("name, make, error, match", _bad_cases(), ids=[c[0] for c in _bad_cases()])
def test_bad_construction(name, make, error, match):
    with pytest.raises(error, match=match):
        opt = make()
        opt.step([np.ones(a.shape) for a in opt._params])  # the schedule case fails at the step


@pytest.mark.parametrize("grads, error, match", [
    (None, ValueError, "grads is required"),
    ([np.ones(3)], ValueError, "grads has 1 arrays for 2 params"),
    ([np.ones(3), np.ones(5)], ValueError, r"grads\[1\] has shape \(5,\)"),
    ([np.ones(3), np.ones(4, np.float32)], TypeError, r"grads\[1\] has dtype float32"),
    ([np.ones(3), np.ones(8)[::2]], ValueError, r"grads\[1\] is not C-contiguous"),
], ids=["missing", "count", "shape", "dtype", "strided"])
def test_bad_grads_write_nothing(grads, error, match):
    params = [np.ones(3), np.ones(4)]
    opt = fastopt.Adam(params, lr=0.1)
    with pytest.raises(error, match=match):
        opt.step(grads)
    assert all((p == 1).all() for p in params) and opt.steps == 0


def test_grads_given_to_a_buffer_optimizer_is_an_error():
    buf = fastopt.ParamBuffer([np.ones(3)])
    with pytest.raises(ValueError, match="grads must be None"):
        fastopt.SGD(buf, lr=0.1).step([np.ones(3)])


@pytest.mark.parametrize("mutate, match", [
    (lambda sd: sd["param_groups"].pop(), "param groups"),
    (lambda sd: sd["param_groups"][0]["params"].pop(), "params in the state dict"),
    (lambda sd: sd["state"][0].__setitem__("exp_avg", np.zeros(99)), "shape"),
    (lambda sd: sd["param_groups"][0].__setitem__("lr", -1.0), "learning rate"),
    (lambda sd: sd["state"][1].__setitem__("step", 7.0), "different steps"),
], ids=["groups", "params", "shape", "hyper", "steps"])
def test_bad_state_dict_writes_nothing(mutate, match):
    init, grads = _data(6, steps=2)
    opt, params, buf = _build("adam", {}, "groups", init)
    _run(opt, params, buf, grads)
    sd = opt.state_dict()
    before = opt.state_dict()
    mutate(sd)
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(sd)
    after = opt.state_dict()
    assert after["param_groups"] == before["param_groups"]
    for i in before["state"]:
        for k, v in before["state"][i].items():
            np.testing.assert_array_equal(after["state"][i][k], v)


# -- L1 (the lecture notes' lambda |w|_1) --------------------------------------------

@pytest.mark.parametrize("cls, kw", [(fastopt.SGD, dict(lr=0.1)), (fastopt.Adam, dict(lr=0.05)),
                                     (fastopt.AdamW, dict(lr=0.05))], ids=["sgd", "adam", "adamw"])
def test_proximal_l1_gives_exact_zeros(cls, kw):
    rng = np.random.default_rng(7)
    w = rng.standard_normal(500) * 0.1
    opt = cls([w], l1=0.5, l1_mode="proximal", **kw)
    plain_w = w.copy()
    plain = cls([plain_w], **kw)
    for _ in range(20):
        g = 0.01 * rng.standard_normal(500)
        opt.step([g])
        plain.step([g.copy()])
    assert (w == 0).sum() > 250 and (plain_w == 0).sum() == 0


def test_subgradient_l1_pulls_toward_zero():
    w = np.array([2.0, -3.0, 0.0])
    fastopt.SGD([w], lr=0.1, l1=1.0).step([np.zeros(3)])
    np.testing.assert_array_equal(w, [1.9, -2.9, 0.0])


@pytest.mark.parametrize("kw, match", [(dict(l1=-1.0), "l1"), (dict(l1=0.1, l1_mode="lasso"), "l1_mode")])
def test_bad_l1(kw, match):
    with pytest.raises(ValueError, match=match):
        fastopt.SGD([np.zeros(3)], lr=0.1, **kw)
    with pytest.raises(ValueError, match=match):
        fastopt.functional.adam_(np.zeros(3), np.zeros(3), np.zeros(3), np.zeros(3), step=1, **kw)


def test_state_dict_that_turns_an_option_on_gets_its_state():
    """Loading amsgrad=True into an optimizer that stepped without it allocates max_exp_avg_sq."""
    init, grads = _data(8, steps=4)
    a, pa, ba = _build("adam", dict(amsgrad=True), "buffer", init)
    b, pb, bb = _build("adam", dict(amsgrad=False), "buffer", init)
    _run(a, pa, ba, grads[:2])
    _run(b, pb, bb, grads[:1])
    b.load_state_dict(a.state_dict())
    bb.arena[...] = ba.arena
    _run(a, pa, ba, grads[2:])
    _run(b, pb, bb, grads[2:])
    np.testing.assert_array_equal(ba.arena, bb.arena)
    assert "max_exp_avg_sq" in b.arenas and b.steps == 4


def test_loading_a_fresh_state_dict_resets_the_state():
    init, grads = _data(9, steps=3)
    stepped, ps, bs = _build("adam", {}, "buffer", init)
    _run(stepped, ps, bs, grads[:2])
    fresh, pf, bf = _build("adam", {}, "buffer", [p.copy() for p in ps])
    stepped.load_state_dict(fresh.state_dict())
    _run(stepped, ps, bs, grads[2:])
    _run(fresh, pf, bf, grads[2:])
    np.testing.assert_array_equal(bs.arena, bf.arena)
    assert stepped.steps == fresh.steps == 1


def test_groups_with_equal_hyperparameters_keep_their_own_state():
    a, b = np.array([1.0]), np.array([1.0])
    opt = fastopt.SGD([{"params": [a]}, {"params": [b]}], lr=0.1, momentum=0.9)
    for _ in range(3):
        opt.step([np.array([1.0]), np.array([-1.0])])
    np.testing.assert_allclose(a, 2.0 - b)  # mirror images: no shared momentum


def test_a_bad_schedule_in_one_group_leaves_every_group_untouched():
    a, b = np.ones(3), np.ones(3)
    opt = fastopt.SGD([{"params": [a]}, {"params": [b], "lr": lambda t: 0.1 if t == 0 else math.inf}], lr=0.1)
    opt.step([np.ones(3), np.ones(3)])
    before = a.copy(), b.copy()
    with pytest.raises(ValueError, match="param group 1"):
        opt.step([np.ones(3), np.ones(3)])
    np.testing.assert_array_equal(a, before[0])
    np.testing.assert_array_equal(b, before[1])
    assert [p.step for p in opt._plans] == [1, 1]


def test_a_rejected_param_group_changes_nothing():
    buf = fastopt.ParamBuffer([np.ones(3)])
    opt = fastopt.SGD(buf, lr=0.1)
    with pytest.raises(ValueError, match="mix"):
        opt.add_param_group({"params": [np.ones(2)]})
    assert len(opt.param_groups) == 1 and len(opt._params) == 1
    buf.grads[0][...] = 1.0
    opt.step()
    np.testing.assert_array_equal(buf.params[0], np.full(3, 0.9))  # the one group still steps
