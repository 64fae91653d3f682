"""8-bit blockwise state (kernels/_blockwise.py, fastopt/state8bit.py) against NumPy float64
references: the codes, every rule's blockwise step, the 32-bit fallback, resume and state dicts."""
import numpy as np
import pytest

import fastopt
from cases import hparams
from conftest import BACKENDS, to_backend, to_host
from fastopt.kernels import RULES
from fastopt.kernels import _blockwise as B

N = 4096 + 300  # one tensor with 8-bit state: 17 full blocks and a partial one
CLASSES = {"adam": fastopt.Adam, "adamw": fastopt.AdamW, "lion": fastopt.Lion, "sgd": fastopt.SGD,
           "rmsprop": fastopt.RMSprop}


@pytest.mark.parametrize("code", B.CODES)
@pytest.mark.parametrize("signed", [True, False])
def test_quantize_matches_reference(code, signed):
    rng = np.random.default_rng(1)
    x = rng.standard_normal(3000) * np.exp(rng.uniform(-20, 0, 3000))
    x = x if signed else x * x
    codes, absmax = B.quantize(x, signed, code)
    _, ref_absmax = B.reference_quantize(x, signed, code)
    assert np.array_equal(absmax, ref_absmax)  # the block scale is exact
    got = B.dequantize(codes, absmax, signed, code)
    y = np.float32(x).astype(np.float64) / np.repeat(np.where(absmax > 0, absmax, 1), B.BLOCK)[:x.size]
    table = B.code_table(code, signed)
    nearest = np.abs(y[:, None] - table[None, :]).min(axis=1)  # the best any code can do
    scale = np.repeat(absmax, B.BLOCK)[:x.size].astype(np.float64)
    assert np.all(np.abs(got / scale - y) <= nearest + 1e-6)
    if code == "fp8":  # the bound of the code: 1/16 relative over its range
        small = 2.0 ** (-14 if signed else -30)
        normal = np.abs(y) >= small
        assert np.all(np.abs(got / scale - y)[normal] <= np.abs(y[normal]) / 16 + 1e-7)
    top = np.argmax(np.abs(x[:B.BLOCK]))
    if code == "fp8" or x[top] > 0:  # the block's extreme value round-trips exactly
        assert got[top] == np.float32(x[top])


def _needed_states(rule, hp):
    r = RULES[rule][0]
    return r.states_needed({**r.defaults, **hp})


def _reference_step(rule, p, g, states, step, hp, code):
    """The blockwise algorithm in float64: dequantized states, the rule's NumPy reference."""
    ref = RULES[rule][2]
    values = {n: B.reference_dequantize(c, a, B.SIGNED[n], code) for n, (c, a) in states.items()}
    p64 = p.astype(np.float64)
    args = [values.get(n) for n in RULES[rule][0].states]
    ref(p64, g.astype(np.float64), *args, step=step, **hp)
    return p64, {n: v for n, v in zip(RULES[rule][0].states, args) if n in states}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rule", list(CLASSES))
@pytest.mark.parametrize("draw", range(4))
def test_step_matches_blockwise_reference(rule, draw, backend):
    hp = hparams(rule, draw)
    if backend == "cuda" and draw:
        pytest.skip("the simulator (about 4 s a step here) runs the defaults of each rule")
    code = "dynamic" if draw == 3 else "fp8"
    rng = np.random.default_rng(draw)
    p = (rng.standard_normal(N) * 0.5).astype(np.float32)
    p_dev = to_backend(p, backend)
    opt = CLASSES[rule]([p_dev], state_bits=8, state_code=code, **hp)
    if not _needed_states(rule, hp):
        pytest.skip("no state with these options")
    for step in range(1, 3 if backend == "cuda" else 4):
        g = rng.standard_normal(N).astype(np.float32) * np.float32(10.0 ** rng.uniform(-3, 0))
        before = to_host(p_dev).copy()
        state = {}
        if step > 1:
            sd = opt.state_dict()["state"][0]
            state = {n: (sd[n], sd[n + ".absmax"]) for n in _needed_states(rule, hp)}
        else:
            state = {n: (np.zeros(N, np.uint8), np.zeros(B.n_blocks(N), np.float32)) for n in _needed_states(rule, hp)}
        opt.step([to_backend(g, backend)])
        want_p, want_states = _reference_step(rule, before, g, state, step, hp, code)
        np.testing.assert_allclose(to_host(p_dev), want_p, rtol=2e-5, atol=2e-6)
        sd = opt.state_dict()["state"][0]
        for n, want in want_states.items():
            absmax = sd[n + ".absmax"]
            ref_absmax = np.abs(np.pad(want, (0, -N % B.BLOCK))).reshape(-1, B.BLOCK).max(axis=1)
            np.testing.assert_allclose(absmax, ref_absmax, rtol=1e-5, atol=1e-30)
            got = B.reference_dequantize(sd[n], absmax, B.SIGNED[n], code)
            # the code written is one of the two that bracket the exact new value
            scale = np.repeat(absmax.astype(np.float64), B.BLOCK)[:N]
            y = want / np.where(scale > 0, scale, 1)
            table = np.sort(B.code_table(code, B.SIGNED[n]))
            table = table[np.isfinite(table)]
            lo = table[np.clip(np.searchsorted(table, y - 1e-5, side="right") - 1, 0, 255)]
            hi = table[np.clip(np.searchsorted(table, y + 1e-5), 0, table.size - 1)]
            ok = (got / np.where(scale > 0, scale, 1) >= lo - 1e-7) & (got / np.where(scale > 0, scale, 1) <= hi + 1e-7)
            assert ok.all(), (n, np.flatnonzero(~ok)[:5])


def test_small_tensors_keep_32bit_state():
    rng = np.random.default_rng(3)
    sizes = (100, 4095, 5000)
    a = [rng.standard_normal(n).astype(np.float32) for n in sizes]
    b = [x.copy() for x in a]
    o8, o32 = fastopt.AdamW(a, state_bits=8), fastopt.AdamW(b)
    for _ in range(3):
        g = [rng.standard_normal(n).astype(np.float32) for n in sizes]
        o8.step(g)
        o32.step(g)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])  # the same float32 state
    sd = o8.state_dict()["state"]
    assert sd[1]["exp_avg"].dtype == np.float32 and "exp_avg.absmax" not in sd[1]
    assert sd[2]["exp_avg"].dtype == np.uint8 and sd[2]["exp_avg.absmax"].size == B.n_blocks(5000)


def test_state_memory_per_param():
    n = 1 << 16
    opt = fastopt.AdamW8bit([np.zeros(n, np.float32)])
    opt.step([np.ones(n, np.float32)])
    nbytes = sum(a.nbytes for a in opt.arenas.values())
    assert nbytes / n <= 2.05


def _run(opt, params, grads):
    for g in grads:
        opt.step(g)


def test_resume_is_bit_exact(tmp_path):
    rng = np.random.default_rng(4)
    sizes = (6000, 50)
    grads = [[rng.standard_normal(n).astype(np.float32) for n in sizes] for _ in range(6)]
    a = [rng.standard_normal(n).astype(np.float32) for n in sizes]
    b = [x.copy() for x in a]
    full = fastopt.Lion8bit(a, lr=1e-3)
    _run(full, a, grads)
    half = fastopt.Lion8bit(b, lr=1e-3)
    _run(half, b, grads[:3])
    fastopt.save(tmp_path / "c.npz", half, b)
    c = [np.zeros_like(x) for x in b]
    resumed = fastopt.Lion8bit(c, lr=1e-3)
    fastopt.load(tmp_path / "c.npz", resumed, c)
    _run(resumed, c, grads[3:])
    assert all(np.array_equal(x, y) for x, y in zip(a, c))
    assert all(np.array_equal(x, y) for x, y in zip(full.export_state()["arenas"].values(),
                                                     resumed.export_state()["arenas"].values()))


@pytest.mark.parametrize("source", ["fastopt8", "fastopt32", "torch32"])
def test_state_dict_round_trips(source):
    torch = pytest.importorskip("torch") if source == "torch32" else None
    rng = np.random.default_rng(5)
    p = rng.standard_normal(5000).astype(np.float32)
    grads = [rng.standard_normal(5000).astype(np.float32) for _ in range(3)]
    o8 = fastopt.AdamW8bit([p.copy()])
    _run(o8, None, [[g] for g in grads])
    if source == "fastopt8":
        other = fastopt.AdamW8bit([p.copy()])
        other.load_state_dict(o8.state_dict())
        assert all(np.array_equal(x, y) for x, y in zip(o8.export_state()["arenas"].values(),
                                                         other.export_state()["arenas"].values()))
        t = o8.state_dict(torch=True)["state"][0]["exp_avg"].numpy()  # dequantized for torch
        np.testing.assert_array_equal(t, o8.state_views(0)["exp_avg"])
        return
    if source == "fastopt32":
        o32 = fastopt.AdamW([p.copy()])
        _run(o32, None, [[g] for g in grads])
        sd, want = o32.state_dict(), o32.state_views(0)
    else:
        tp = torch.from_numpy(p.copy()).requires_grad_()
        topt = torch.optim.AdamW([tp])
        for g in grads:
            tp.grad = torch.from_numpy(g)
            topt.step()
        sd = topt.state_dict()
        want = {k: v.numpy() for k, v in topt.state[tp].items() if k != "step"}
    o = fastopt.AdamW8bit([p.copy()])
    o.load_state_dict(sd)  # 32-bit state is quantized on load
    for n in ("exp_avg", "exp_avg_sq"):
        got = o.state_views(0)[n]
        codes, absmax = B.quantize(want[n], B.SIGNED[n])
        np.testing.assert_array_equal(got, B.dequantize(codes, absmax, B.SIGNED[n]))


@pytest.mark.parametrize("make, match", [
    (lambda p: fastopt.Adagrad(p, state_bits=8), "no 8-bit form"),
    (lambda p: fastopt.AdamW(p, state_bits=8, state_dtype="bfloat16"), "give one"),
    (lambda p: fastopt.AdamW(p, state_bits=4), "state_bits must be"),
    (lambda p: fastopt.AdamW(p, state_bits=8, state_code="nf4"), "state_code must be"),
    (lambda p: fastopt.AdamW([x.astype(np.float64) for x in p], state_bits=8), "float64"),
])
def test_named_errors(make, match):
    with pytest.raises(ValueError, match=match):
        make([np.zeros(5000, np.float32)])


def test_wrong_state_dict_format_is_refused_before_any_write():
    p = np.ones(5000, np.float32)
    o8 = fastopt.AdamW8bit([p.copy()])
    o8.step([np.ones(5000, np.float32)])
    o32 = fastopt.AdamW([p.copy()])
    with pytest.raises(ValueError, match="state_bits=8"):
        o32.load_state_dict(o8.state_dict())
    assert o32.arenas is None
    bad = o8.state_dict()
    bad["state"][0]["exp_avg.absmax"] = bad["state"][0]["exp_avg.absmax"][:3]
    before = {k: v.copy() for k, v in o8.export_state()["arenas"].items()}
    with pytest.raises(ValueError, match="block scales"):
        o8.load_state_dict(bad)
    assert all(np.array_equal(before[k], v) for k, v in o8.export_state()["arenas"].items())


def _eight_bit_run(tmp_path, code, **hp):
    rng = np.random.default_rng(6)
    p = [rng.standard_normal(5000).astype(np.float32)]
    opt = fastopt.RMSprop(p, state_bits=8, state_code=code, **hp)
    opt.step([rng.standard_normal(5000).astype(np.float32)])
    return opt, p


@pytest.mark.parametrize("how", ["checkpoint", "state_dict"])
def test_codes_of_another_state_code_are_refused_before_any_write(tmp_path, how):
    """The same uint8 codes mean other values under another code map: refused, not reread."""
    saved, _ = _eight_bit_run(tmp_path, "fp8")
    opt, _ = _eight_bit_run(tmp_path, "dynamic")
    before = {k: v.copy() for k, v in opt.export_state()["arenas"].items()}
    with pytest.raises(ValueError, match="state_code"):
        if how == "checkpoint":
            fastopt.load(fastopt.save(tmp_path / "c.npz", saved), opt)
        else:
            opt.load_state_dict(saved.state_dict())
    assert all(np.array_equal(before[k], v) for k, v in opt.export_state()["arenas"].items())


@pytest.mark.parametrize("how", ["checkpoint", "state_dict"])
@pytest.mark.parametrize("fresh", [True, False], ids=["fresh", "stepped"])
def test_saved_options_that_need_more_8bit_state_load_exactly(tmp_path, how, fresh):
    """A checkpoint of RMSprop(centered, momentum) into RMSprop() with neither: the 8-bit
    state the saved options keep is made and loaded, and the two go on alike."""
    saved, p = _eight_bit_run(tmp_path, "dynamic", centered=True, momentum=0.9)
    q = [np.zeros_like(p[0])]
    opt = fastopt.RMSprop(q, state_bits=8, state_code="dynamic")
    if not fresh:
        opt.step([np.ones(5000, np.float32)])
    if how == "checkpoint":
        fastopt.load(fastopt.save(tmp_path / "c.npz", saved, p), opt, q)
    else:
        opt.load_state_dict(saved.state_dict())
        q[0][...] = p[0]
    assert opt.param_groups[0]["centered"] and opt.param_groups[0]["momentum"] == 0.9
    g = [np.random.default_rng(8).standard_normal(5000).astype(np.float32)]
    saved.step(g)
    opt.step(g)
    np.testing.assert_array_equal(p[0], q[0])
    for n, arena in saved.export_state()["arenas"].items():
        np.testing.assert_array_equal(arena, opt.export_state()["arenas"][n], err_msg=n)


def test_momentum_turned_on_mid_run_with_8bit_state_starts_from_the_gradient():
    """As with 32-bit state: the first update with momentum makes the buffer the gradient
    (dampening 0.5 would make it half of it), quantized."""
    g = np.linspace(-1, 1, 5000).astype(np.float32)
    opt = fastopt.SGD([np.zeros(5000, np.float32)], lr=0.1, dampening=0.5, state_bits=8)
    opt.step([g])
    opt.param_groups[0]["momentum"] = 0.9
    opt.step([g])
    codes, absmax = B.quantize(g, B.SIGNED["momentum_buffer"])
    np.testing.assert_array_equal(opt.state_views(0)["momentum_buffer"],
                                  B.dequantize(codes, absmax, B.SIGNED["momentum_buffer"]))
    opt.step([g])
    assert opt.steps == 3


@pytest.mark.parametrize("arena, size", [("exp_avg.absmax", 3), ("exp_avg", 7000), ("exp_avg.small", 9)])
def test_8bit_arenas_of_another_size_are_named(tmp_path, arena, size):
    opt = fastopt.AdamW8bit([np.ones(5000, np.float32), np.ones(10, np.float32)])
    opt.step([np.ones(5000, np.float32), np.ones(10, np.float32)])
    path = fastopt.save(tmp_path / "c.npz", opt)
    with np.load(path) as z:
        entries = dict(z)
    entries[f"state.{arena}"] = np.zeros(size, entries[f"state.{arena}"].dtype)
    np.savez(path, **entries)
    fresh = fastopt.AdamW8bit([np.ones(5000, np.float32), np.ones(10, np.float32)])
    with pytest.raises(ValueError, match=f"state.{arena} is"):
        fastopt.load(path, fresh)
    assert fresh.arenas is None


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_overflowing_square_costs_its_block_no_nan(backend):
    """A finite gradient whose square overflows float32 (2e21): 32-bit state makes that one
    exp_avg_sq inf; an inf block scale would decode the whole block as 0 * inf = NaN. The
    scale is float32's largest value instead: no NaN anywhere, the other blocks untouched."""
    g = np.full(5000, 1e-3, np.float32)
    g[5] = 2e21
    p8 = to_backend(np.ones(5000, np.float32), backend)
    opt = fastopt.AdamW(p8, state_bits=8, nonfinite="propagate")
    opt.step(to_backend(g, backend))
    opt.step(to_backend(np.full(5000, 1e-3, np.float32), backend))
    got = to_host(p8)
    assert np.isfinite(got).all()
    v = opt.state_views(0)["exp_avg_sq"]
    assert np.isfinite(v).all() and v[5] > 1e38  # float32's largest, decayed by one step
    ref = np.ones(5000, np.float32)
    ref32 = fastopt.AdamW([ref], nonfinite="propagate")
    ref32.step([np.full(5000, 1e-3, np.float32)])
    ref32.step([np.full(5000, 1e-3, np.float32)])
    np.testing.assert_allclose(got[256:], ref[256:], rtol=1e-6)  # the other blocks as a 32-bit run's


@pytest.mark.parametrize("backend", BACKENDS)
def test_stochastic_rounding_keys_each_8bit_tensor_apart(backend):
    """Two equal tensors with equal gradients in one group round differently: the rounding is
    keyed per tensor (CUDA launches one kernel per tensor, its elements counted from 0)."""
    import ml_dtypes
    bf16 = ml_dtypes.bfloat16
    values = np.random.default_rng(2).standard_normal(4096).astype(bf16)
    params = [to_backend(values.copy(), backend) for _ in range(2)]
    opt = fastopt.AdamW(params, lr=1e-3, state_bits=8, stochastic_rounding=True)
    g = np.random.default_rng(3).standard_normal(4096).astype(bf16)
    opt.step([to_backend(g, backend) for _ in range(2)])
    a, b = (to_host(p).view(np.uint16) for p in params)
    assert (a != values.view(np.uint16)).any() and (a != b).any()
