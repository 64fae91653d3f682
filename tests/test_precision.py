"""16-bit storage (issue 13): bfloat16 and float16 params, gradients and state read and
written through the engine's one storage seam (``kernels/_formats.py``), the math in
float32; ``state_dtype``, ``master_weights`` and ``stochastic_rounding`` on the optimizers.

The conversions are checked against NumPy's and ml_dtypes' casts (every 16-bit pattern
read, random and edge values written), every rule against its float64 reference one step
at a time (the reference fed the stored values, its result rounded to the format), and the
options against float32 runs that they must equal bit for bit."""
import re

import ml_dtypes
import numpy as np
import pytest
from numba import njit

import fastopt
from cases import N_DRAWS, gradients, hparams
from conftest import BACKENDS, SIMULATOR, to_backend, to_host
from fastopt.buffer import _copy_in
from fastopt.kernels import RULES, _formats
from fastopt.kernels._formats import load, rounding_key, store

BF16, F16 = np.dtype(ml_dtypes.bfloat16), np.dtype(np.float16)
FORMATS = [pytest.param(BF16, id="bf16"), pytest.param(F16, id="f16")]
BITS = {BF16: np.uint16, F16: np.int16}
# one unit in the last place, relative: 8 bits of bfloat16's significand, 11 of float16's
ULP = {BF16: 2.0 ** -7, F16: 2.0 ** -10}


@njit
def _load_all(a, out):
    for i in range(a.size):
        out[i] = load(a, i)


@njit
def _store_all(x, a):
    for i in range(x.size):
        store(a, i, x[i])


@njit
def _store_noisy(x, a, noise):
    for i in range(x.size):
        store(a, i, x[i], noise[i])


def _same(a, b):
    """Bit-equal floats, any NaN equal to any NaN."""
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return (a.view(np.uint32) == b.view(np.uint32)) | (np.isnan(a) & np.isnan(b))


def _edge_values():
    rng = np.random.default_rng(0)
    scale = np.float32(10) ** rng.integers(-12, 6, 20000).astype(np.float32)
    return np.concatenate([
        rng.standard_normal(20000).astype(np.float32) * scale,
        rng.integers(0, 2 ** 32, 20000, dtype=np.uint64).astype(np.uint32).view(np.float32),  # every exponent
        np.array([0, -0.0, np.inf, -np.inf, np.nan, 65504, 65519.99, 65520, 65536, 6e-8, 2.98e-8, 5.96e-8, 1e-45,
                  3.4e38, 1.00390625, 1.01171875, -2.0 ** -14, 2.0 ** -24 * 1.5], np.float32)])


# -- the conversions ------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", FORMATS)
def test_every_16_bit_pattern_loads_as_numpy_casts_it(fmt):
    bits = np.arange(2 ** 16, dtype=np.uint32).astype(np.uint16).view(BITS[fmt])
    out = np.zeros(bits.size, np.float32)
    _load_all(bits, out)
    assert _same(out, bits.view(fmt).astype(np.float32)).all()
    # the Python form (the CUDA simulator's) gives the same numbers
    assert _same([load(bits, i) for i in range(0, bits.size, 61)], out[::61]).all()


@pytest.mark.parametrize("fmt", FORMATS)
def test_stores_round_to_nearest_even_as_numpy_casts(fmt):
    x = _edge_values()
    got = np.zeros(x.size, BITS[fmt])
    _store_all(x, got)
    with np.errstate(all="ignore"):
        want = x.astype(fmt)
    assert _same(got.view(fmt).astype(np.float32), want.astype(np.float32)).all()
    py = np.zeros(500, BITS[fmt])
    for i in range(py.size):
        store(py, i, x[i])
    assert np.array_equal(py, got[:500])


@pytest.mark.parametrize("fmt", FORMATS)
def test_stochastic_rounding_is_unbiased_between_the_two_neighbours(fmt):
    rng = np.random.default_rng(1)
    for value in [1.0001, 3.3e-6, -7.77e-7, 1234.567, 5e-8]:
        if fmt == BF16 and value == 5e-8:
            continue
        x = np.full(200_000, value, np.float32)
        got = np.zeros(x.size, BITS[fmt])
        _store_noisy(x, got, rng.integers(0, 2 ** 32, x.size, dtype=np.uint64).astype(np.uint32))
        values = got.view(fmt).astype(np.float64)
        low, high = np.unique(values)  # exactly the two neighbours of the value
        assert low < np.float32(value) < high
        p = (np.float32(value) - low) / (high - low)
        # the mean of 200,000 Bernoulli draws: 5 standard deviations
        assert abs(values.mean() - np.float32(value)) <= 5 * (high - low) * np.sqrt(p * (1 - p) / x.size)


def test_stochastic_rounding_never_makes_a_finite_float16_inf():
    """Between float16's largest value (65504) and 65536 rounding up would give inf: those
    values are kept at 65504 (round to nearest gives inf from 65520 on)."""
    rng = np.random.default_rng(4)
    x = np.full(20_000, 65505.0, np.float32)
    x[::2] = 65530.0
    got = np.zeros(x.size, np.int16)
    _store_noisy(x, got, rng.integers(0, 2 ** 32, x.size, dtype=np.uint64).astype(np.uint32))
    assert (got.view(np.float16) == np.float16(65504)).all()


@pytest.mark.parametrize("fmt", FORMATS)
def test_stochastic_rounding_compiled_equals_python(fmt):
    x = _edge_values()[:3000]
    noise = np.random.default_rng(2).integers(0, 2 ** 32, x.size, dtype=np.uint64).astype(np.uint32)
    got = np.zeros(x.size, BITS[fmt])
    _store_noisy(x, got, noise)
    py = np.zeros(x.size, BITS[fmt])
    for i in range(x.size):
        store(py, i, x[i], noise[i])
    assert np.array_equal(py, got)


@njit
def _bit_form_f16(bits, x, loaded, stored):
    for i in range(bits.size):
        loaded[i] = _formats._load_f16(bits[i])
    for i in range(x.size):
        stored[i] = _formats._store_f16(x[i], None)


def test_float16_bit_form_equals_numpy_too():
    """The float16 conversions by bit operations (used where the CPU lacks F16C, and for
    stochastic rounding) give NumPy's numbers as the hardware conversions do."""
    bits = np.arange(2 ** 16, dtype=np.uint32).astype(np.uint16).view(np.int16)
    x = _edge_values()
    loaded, stored = np.zeros(bits.size, np.float32), np.zeros(x.size, np.int16)
    _bit_form_f16(bits, x, loaded, stored)
    assert _same(loaded, bits.view(F16).astype(np.float32)).all()
    with np.errstate(all="ignore"):
        assert _same(stored.view(F16).astype(np.float32), x.astype(F16).astype(np.float32)).all()


# -- every rule, one step at a time against its float64 reference --------------------------

RULE_CASES = [pytest.param(rule, i, id=f"{rule}-{i}") for rule in RULES for i in range(N_DRAWS)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("rule,draw", RULE_CASES)
def test_every_rule_in_16_bits_is_its_reference_rounded(rule, draw, fmt, backend):
    """Each step from the stored values: the kernel's result (float32 math, one rounding)
    is the float64 reference's rounded to the format, within one unit in the last place."""
    module, fn, reference = RULES[rule]
    hp = hparams(rule, draw)
    n = 301 if SIMULATOR or backend == "cpu" else 4099
    rng = np.random.default_rng(draw)
    param = rng.standard_normal(n).astype(fmt)
    state = [np.zeros(n, fmt) for _ in module.states]
    for step, g in enumerate(gradients(4, n, seed=draw), start=1):
        g = g.astype(fmt)
        want_p, want_s = param.astype(np.float64), [s.astype(np.float64) for s in state]
        reference(want_p, g.astype(np.float64), *want_s, step=step, **hp)
        dev = [to_backend(a, backend) for a in (param, g, *state)]
        fn(*dev, step=step, **hp)
        param, _, *state = [to_host(a) for a in dev]
        assert param.dtype == fmt
        for name, got, want in [("param", param, want_p), *zip(module.states, state, want_s)]:
            want = want.astype(np.float32).astype(fmt).astype(np.float64)
            got = got.astype(np.float64)
            tol = ULP[fmt] * np.abs(want) + (6e-8 if fmt == F16 else 1e-38)
            bad = ~((np.abs(got - want) <= tol) | (np.isnan(got) & np.isnan(want)))
            if rule == "lion" and name == "param":  # sign() of a float32 near zero may flip: a few elements
                assert bad.sum() <= 2, f"{rule} {name} step {step}"
            else:
                assert not bad.any(), f"{rule} {name} step {step}: {got[bad][:3]} vs {want[bad][:3]} {hp}"


# -- the optimizer's options ---------------------------------------------------------------

SHAPES = [(33, 7), (7,), (5, 5)]
OPTIMIZERS = [pytest.param(fastopt.AdamW, {}, id="adamw"), pytest.param(fastopt.SGD, {"momentum": 0.9}, id="sgd"),
              pytest.param(fastopt.Lion, {}, id="lion"),
              pytest.param(fastopt.RMSprop, {"centered": True}, id="rmsprop")]


def _init(dtype, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(s).astype(dtype) for s in SHAPES]


def _run(cls, dtype, steps, hp, buf=None, opt=None, first=0, **options):
    """``steps`` steps on a ParamBuffer of ``dtype`` with seeded gradients (the same values
    in every dtype: drawn in float64, rounded to bfloat16 first)."""
    if buf is None:
        buf = fastopt.ParamBuffer(_init(BF16))
        buf = fastopt.ParamBuffer([a.astype(dtype) for a in buf.params])
        opt = cls(buf, lr=1e-2, **hp, **options)
    for t in range(first, first + steps):
        for view, g in zip(buf.grads, _init(BF16, seed=100 + t)):
            view[...] = g.astype(dtype)
        opt.step()
    return buf, opt


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("cls,hp", OPTIMIZERS)
def test_master_weights_are_a_float32_run_and_params_its_rounding(cls, hp, fmt):
    """With master_weights=True and float32 state, the masters follow exactly the float32
    run on the same (16-bit) values, and each step writes the params as their rounding."""
    ref, _ = _run(cls, np.float32, 5, hp)
    buf, opt = _run(cls, fmt, 5, hp, master_weights=True, state_dtype="float32")
    for i, (param, want) in enumerate(zip(buf.params, ref.params)):
        np.testing.assert_array_equal(opt.state_views(i)["master"], want)
        np.testing.assert_array_equal(param.view(BITS[fmt]), want.astype(fmt).view(BITS[fmt]))


@pytest.mark.parametrize("cls,hp", OPTIMIZERS)
def test_bf16_state_of_float32_params_is_the_float32_run_with_its_state_rounded(cls, hp):
    """torch's fused CUDA mixed mode: the math reads the bf16 state, updates in float32,
    stores the state rounded: the same as float32 state rounded after every step."""
    buf, opt = _run(cls, np.float32, 5, hp, state_dtype="bfloat16")
    ref, ref_opt = _run(cls, np.float32, 0, hp)
    for t in range(5):
        _run(cls, np.float32, 1, hp, buf=ref, opt=ref_opt, first=t)
        for arena in ref_opt.arenas.values():
            arena[...] = arena.astype(BF16).astype(np.float32)
    np.testing.assert_array_equal(buf.arena, ref.arena)
    for name, arena in opt.arenas.items():
        assert arena.dtype == BF16
        np.testing.assert_array_equal(arena.astype(np.float32), ref_opt.arenas[name])


def test_stochastic_rounding_keeps_the_updates_round_to_nearest_loses():
    """bf16 params at 1.0, steps of 1e-4 (a fortieth of bfloat16's spacing there): round to
    nearest never moves them; stochastic rounding moves them by the right amount on average."""
    n, steps, lr = 20_000, 100, 1e-4
    result = {}
    for sr in (False, True):
        buf = fastopt.ParamBuffer([np.ones(n, BF16)])
        opt = fastopt.SGD(buf, lr=lr, stochastic_rounding=sr)
        buf.grads[0][...] = np.ones(n, BF16)
        for _ in range(steps):
            opt.step()
        result[sr] = buf.arena[:n].astype(np.float64)
    assert (result[False] == 1.0).all()
    assert abs(result[True].mean() - (1 - steps * lr)) < 2e-4
    assert len(np.unique(result[True])) > 1


@pytest.mark.parametrize("options", [dict(stochastic_rounding=True), dict(master_weights=True),
                                     dict(master_weights=True, stochastic_rounding=True, rounding_seed=7)],
                         ids=["sr", "masters", "masters-sr"])
def test_a_resumed_16_bit_run_is_bit_exact(tmp_path, options):
    full, _ = _run(fastopt.AdamW, BF16, 6, {}, **options)
    buf, opt = _run(fastopt.AdamW, BF16, 3, {}, **options)
    fastopt.save(tmp_path / "c.npz", opt, buf)
    buf2 = fastopt.ParamBuffer([np.zeros(s, BF16) for s in SHAPES])
    opt2 = fastopt.AdamW(buf2, lr=1e-2, **options)
    fastopt.load(tmp_path / "c.npz", opt2, buf2)
    _run(fastopt.AdamW, BF16, 3, {}, buf=buf2, opt=opt2, first=3)
    np.testing.assert_array_equal(buf2.arena.view(np.uint16), full.arena.view(np.uint16))
    # the same through a state dict
    buf3 = fastopt.ParamBuffer([a.copy() for a in buf.params])
    opt3 = fastopt.AdamW(buf3, lr=1e-2, **options)
    opt3.load_state_dict(opt.state_dict())
    _run(fastopt.AdamW, BF16, 3, {}, buf=buf3, opt=opt3, first=3)
    np.testing.assert_array_equal(buf3.arena.view(np.uint16), full.arena.view(np.uint16))


def test_stochastic_rounding_is_reproducible_and_seeded():
    a, _ = _run(fastopt.AdamW, BF16, 3, {}, stochastic_rounding=True)
    b, _ = _run(fastopt.AdamW, BF16, 3, {}, stochastic_rounding=True)
    c, _ = _run(fastopt.AdamW, BF16, 3, {}, stochastic_rounding=True, rounding_seed=1)
    d, _ = _run(fastopt.AdamW, BF16, 3, {})
    assert np.array_equal(a.arena.view(np.uint16), b.arena.view(np.uint16))
    assert not np.array_equal(a.arena.view(np.uint16), c.arena.view(np.uint16))
    assert not np.array_equal(a.arena.view(np.uint16), d.arena.view(np.uint16))


def test_rounding_keys_differ_by_seed_step_and_offset():
    keys = {int(rounding_key(s, t, o)) for s in range(3) for t in range(3) for o in (0, 1, 4096)}
    assert len(keys) == 27


@pytest.mark.parametrize("fmt", FORMATS)
def test_guard_and_norm_read_16_bit_gradients(fmt):
    buf = fastopt.ParamBuffer([a.astype(fmt) for a in _init(np.float32)])
    opt = fastopt.Adam(buf, lr=1e-2, max_grad_norm=1.0)
    grads = _init(fmt, seed=3)
    for view, g in zip(buf.grads, grads):
        view[...] = g
    opt.step()
    want = np.sqrt(sum((g.astype(np.float64) ** 2).sum() for g in grads))
    assert opt.last_grad_norm == pytest.approx(want, rel=1e-6)
    before = buf.arena.copy()
    buf.grads[1][3] = np.inf
    opt.step()
    assert opt.last_step_skipped and np.array_equal(buf.arena.view(BITS[fmt]), before.view(BITS[fmt]))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["EMA", "Polyak"])
def test_averages_of_16_bit_params_are_float32(kind, backend):
    """Increments far below half a bf16 step still move the average (float32): params moved
    from 1 to 2, then averaged at decay 0.99 (a bf16 average would stay at 1). A swap writes
    the average's nearest rounding into the params and gives the live weights back bit for
    bit; the average itself is not rounded by it."""
    updates = 300 if backend == "cpu" else 40  # the simulator runs every thread in Python
    live = to_backend(np.ones(37, BF16), backend)
    avg = fastopt.EMA([live], decay=0.99) if kind == "EMA" else fastopt.PolyakAverage([live])
    moved = to_backend(np.full(37, 2.0, BF16), backend)
    _copy_in(live, 0, to_host(moved))
    for _ in range(updates):
        avg.update()
    want = 2 - 0.99 ** updates if kind == "EMA" else (1 + 2 * updates) / (updates + 1)
    got = to_host(avg.averaged()[0])
    assert got.dtype == np.float32 and got[0] != 1.0
    np.testing.assert_allclose(got, want, rtol=1e-5)
    with avg.average_parameters():
        np.testing.assert_array_equal(to_host(live).view(np.uint16), got.astype(BF16).view(np.uint16))
    np.testing.assert_array_equal(to_host(live).view(np.uint16), np.full(37, 2.0, BF16).view(np.uint16))
    np.testing.assert_array_equal(to_host(avg.averaged()[0]), got)


def test_state_dict_to_torch_and_back_in_bf16():
    torch = pytest.importorskip("torch")
    _, opt = _run(fastopt.AdamW, np.float32, 2, {}, state_dtype="bfloat16")
    sd = opt.state_dict(torch=True)
    assert sd["state"][0]["exp_avg"].dtype == torch.bfloat16
    buf2 = fastopt.ParamBuffer(_init(np.float32))
    opt2 = fastopt.AdamW(buf2, lr=1e-2, state_dtype="bfloat16")
    opt2.load_state_dict(sd)
    for name, arena in opt.arenas.items():
        np.testing.assert_array_equal(opt2.arenas[name].view(np.uint16), arena.view(np.uint16))


@pytest.mark.parametrize("make, error, match", [
    (lambda: fastopt.Adam(_init(np.float32), master_weights=True), ValueError, "master_weights"),
    (lambda: fastopt.Adam(_init(np.float32), stochastic_rounding=True), ValueError, "stochastic_rounding"),
    (lambda: fastopt.Adam(_init(BF16), master_weights=True, stochastic_rounding=False, state_dtype="int8"),
     ValueError, "state_dtype"),
    (lambda: fastopt.Adam(_init(BF16), master_weights="yes"), TypeError, "master_weights"),
    (lambda: fastopt.Adam(_init(BF16), stochastic_rounding=True, rounding_seed=-1), ValueError, "rounding_seed"),
    (lambda: fastopt.LAMB(_init(BF16)), TypeError, "16-bit"),
    (lambda: fastopt.Adam(_init(np.float16) + _init(BF16)), TypeError, "dtype"),
])
def test_bad_precision_options_are_named(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_a_checkpoint_of_another_state_format_is_refused(tmp_path):
    buf, opt = _run(fastopt.AdamW, np.float32, 2, {}, state_dtype="bfloat16")
    fastopt.save(tmp_path / "c.npz", opt, buf)
    other = fastopt.AdamW(fastopt.ParamBuffer(_init(np.float32)), lr=1e-2)
    before = [a.copy() for a in other._buffer.params]
    with pytest.raises(ValueError, match="state dtype is float32 here but bfloat16"):
        fastopt.load(tmp_path / "c.npz", other)
    assert other.arenas is None and all(np.array_equal(a, b) for a, b in zip(before, other._buffer.params))
    buf, opt = _run(fastopt.AdamW, BF16, 2, {}, master_weights=True)
    fastopt.save(tmp_path / "m.npz", opt, buf)
    with pytest.raises(ValueError, match="master weights"):
        fastopt.load(tmp_path / "m.npz", fastopt.AdamW(fastopt.ParamBuffer(_init(BF16)), lr=1e-2))


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_optimizer_with_masters_and_rounding_on_each_backend(backend):
    """The same steps on the CPU and on CUDA (the simulator runs the Python conversions):
    the same bits."""
    cpu, _ = _run(fastopt.Adam, BF16, 2, {}, master_weights=True, stochastic_rounding=True)
    params = [to_backend(a.astype(BF16), backend) for a in _init(BF16)]
    opt = fastopt.Adam(params, lr=1e-2, master_weights=True, stochastic_rounding=True)
    for t in range(2):
        opt.step([to_backend(g.astype(BF16), backend) for g in _init(BF16, seed=100 + t)])
    got = np.concatenate([to_host(p).reshape(-1).astype(np.float32) for p in params])
    want = np.concatenate([a.reshape(-1).astype(np.float32) for a in cpu.params])
    # separate arrays round with other keys than a ParamBuffer's runs: equal to a rounding step
    np.testing.assert_allclose(got, want, rtol=2 * ULP[BF16], atol=0)


def test_formats_table_names_the_user_dtypes():
    assert set(_formats.BY_NAME) == {"float64", "float32", "float16", "bfloat16"}
    assert _formats.kernel_dtype("bfloat16") == np.uint16 and _formats.kernel_dtype(np.float16) == np.int16


class _CudaArrayLike:
    """A CUDA array as the interface describes it (no memory behind it: only the checks read it)."""

    def __init__(self, typestr, dtype=None, shape=(5,)):
        self.__cuda_array_interface__ = {"shape": shape, "typestr": typestr, "data": (1 << 20, False),
                                         "strides": None, "version": 3}
        if dtype is not None:
            self.dtype = dtype


@pytest.mark.parametrize("array, seen", [
    (_CudaArrayLike("<V2", BF16), BF16),        # a Numba view of a torch bf16 tensor's bits
    (_CudaArrayLike("<f2", F16), F16),
    (_CudaArrayLike("<f4", "torch.float32"), np.dtype(np.float32)),  # a dtype NumPy cannot read
    (_CudaArrayLike("<f4", BF16), np.dtype(np.float32)),  # not the interface's width: the interface wins
    (_CudaArrayLike("<i8"), np.dtype(np.int64)),  # no dtype of its own: the interface's (not NumPy's float64)
])
def test_a_cuda_array_s_own_dtype_names_its_format(array, seen):
    from fastopt.kernels._dispatch import _Array
    assert _Array("param", array).dtype == seen


def test_bf16_cuda_kernels_need_no_bf16_instructions():
    """bfloat16 is converted with integer bit operations, so the kernels run on every GPU
    numba-cuda targets (sm_75 and up), not only on sm_80+ where bf16 arithmetic exists."""
    pytest.importorskip("numba_cuda", reason="numba-cuda is not installed")
    if SIMULATOR:
        pytest.skip("compile_ptx does not exist under the simulator")
    from fastopt.kernels import _ptx
    rule = RULES["adamw"][0]
    layout = next(_ptx.variants(rule))
    ptx = _ptx.compile_kernel(rule.kernels, layout, _ptx.example_scalars(rule, BF16), BF16, (7, 5))
    body = [line for line in ptx.splitlines() if not line.lstrip().startswith((".common", "//", ".globl"))]
    assert ".target sm_75" in ptx and len(body) > 100
    assert not [line for line in body if re.search(r"\.bf16(x2)?\b", line)]
    assert _ptx.f64_count(ptx) == 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("options", [dict(state_dtype="bfloat16"), dict(state_bits=8)], ids=["bf16-state", "8-bit"])
def test_with_masters_the_params_are_the_masters_nearest_rounding(options, backend):
    """Stochastic rounding with master weights rounds the 16-bit state: the params are
    written as the master's nearest rounding, the master keeping the exact value."""
    rng = np.random.default_rng(3)
    shapes = [(4101,), (37,)]  # 8-bit: a blockwise tensor and a small one
    params = [to_backend(rng.standard_normal(s).astype(BF16), backend) for s in shapes]
    opt = fastopt.Adam(params, lr=1e-2, master_weights=True, stochastic_rounding="state_bits" not in options,
                       **options)
    for _ in range(3):
        opt.step([to_backend(rng.standard_normal(s).astype(BF16), backend) for s in shapes])
    for i, p in enumerate(params):
        master = to_host(opt.state_views(i)["master"])
        np.testing.assert_array_equal(to_host(p).view(np.uint16), master.astype(BF16).view(np.uint16))
