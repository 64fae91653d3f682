"""EMA and PolyakAverage against float64 NumPy references, in both forms params take (a
ParamBuffer: one flat pass over the arena; separate arrays: one call over typed lists),
plus swaps, state dicts, bad input, the CUDA path (simulator) and f64-free PTX."""
import numpy as np
import pytest

import fastopt
from conftest import SIMULATOR, to_backend, to_host
from fastopt import optimizer
from fastopt.averaging import EMA, PolyakAverage
from fastopt.kernels import _dispatch, ema, polyak
from fastopt.kernels._formats import BFLOAT16

SHAPES = [(7, 5), (3,), (0,), (11, 13), (1,), (2, 3, 4)]  # odd sizes, an empty one
UPDATES = 25
FORMS = ["buffer", "lists"]
DTYPES = [np.float32, np.float64]
TOL = {np.float32: dict(rtol=2e-5, atol=2e-6), np.float64: dict(rtol=1e-12, atol=1e-13)}
CLASSES = [(EMA, dict(decay=0.9, warmup=True)), (PolyakAverage, {})]


def _decays(n=4, seed=0):
    """(decay, warmup) draws, plus both ends of [0, 1]."""
    rng = np.random.default_rng(seed)
    drawn = [(float(rng.uniform(0.5, 0.999)), bool(i % 2)) for i in range(n)]
    cases = [*drawn, (0.0, False), (1.0, False), (1.0, True)]
    return [pytest.param(d, w, id=f"{d:.4g}{'-warmup' if w else ''}") for d, w in cases]


def _iterates(seed, updates=UPDATES, shapes=SHAPES):
    """The params at construction and after each of ``updates`` optimizer steps (a random walk)."""
    rng = np.random.default_rng(seed)
    out = [[rng.standard_normal(s) for s in shapes]]
    for _ in range(updates):
        out.append([p + 0.3 * rng.standard_normal(p.shape) for p in out[-1]])
    return out


def _build(cls, form, first, dtype=np.float64, **hp):
    """An averager of ``first`` (cast to dtype) in the given form, and the params it watches."""
    arrays = [a.astype(dtype) for a in first]
    if form == "buffer":
        buf = fastopt.ParamBuffer(arrays)
        return cls(buf, **hp), buf.params
    return cls(arrays, **hp), arrays


def _run(averager, params, iterates):
    for it in iterates:
        for p, x in zip(params, it):
            p[...] = x  # what an optimizer step does: new values, same arrays
        averager.update()


def _copies(arrays):
    return [np.array(a, copy=True) for a in arrays]


@pytest.mark.parametrize("decay, warmup", _decays())
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("form", FORMS)
def test_ema_matches_reference(form, dtype, decay, warmup):
    its = [[x.astype(dtype).astype(np.float64) for x in it] for it in _iterates(1)]
    avg, params = _build(EMA, form, its[0], dtype, decay=decay, warmup=warmup)
    _run(avg, params, its[1:])
    expected = _copies(its[0])
    for step, it in enumerate(its[1:], start=1):
        for e, p in zip(expected, it):
            ema.ema_reference(e, p, step=step, decay=decay, warmup=warmup)
    assert avg.num_updates == UPDATES
    for i, (got, want) in enumerate(zip(avg.averaged(), expected)):
        assert got.dtype == dtype and got.shape == want.shape
        np.testing.assert_allclose(got, want, **TOL[dtype], err_msg=f"param {i}")


@pytest.mark.parametrize("decay, warmup, step, expected", [
    (0.999, True, 1, 2 / 11),     # warm-up: (1 + k) / (10 + k) while below decay
    (0.999, True, 10, 11 / 20),
    (0.999, True, 990, 991 / 1000),
    (0.999, True, 9000, 0.999),   # (1 + k) / (10 + k) has passed decay
    (0.5, True, 7, 8 / 17),
    (0.5, True, 8, 0.5),          # 9 / 18: the two meet
    (0.9, False, 1, 0.9),         # no warm-up: decay from the first update
])
def test_warmup_decay(decay, warmup, step, expected):
    assert ema.decay_at(step, decay, warmup) == pytest.approx(expected, rel=1e-15)
    # what an update does with it: an average at 0 fed a param at 1 moves to 1 - decay_k
    p = np.zeros(1)
    avg = EMA([p], decay=decay, warmup=warmup)
    avg.num_updates = step - 1
    assert avg.current_decay == pytest.approx(expected, rel=1e-15)
    p[0] = 1.0
    avg.update()
    assert avg.averaged()[0][0] == pytest.approx(1 - expected, rel=1e-14)


@pytest.mark.parametrize("dtype", [np.float32, BFLOAT16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("form", FORMS)
def test_ema_at_decay_0_is_the_params_exactly(form, dtype):
    """torch.lerp's two forms: from a weight of one half on, the update steps back from p, so
    at decay 0 the average is p exactly (``avg + 1 * (p - avg)`` is 0 for 1e8 -> 1 in float32)."""
    avg, params = _build(EMA, form, [np.array([1e8, -1e8, 3.0])], dtype, decay=0.0)
    _run(avg, params, [[np.array([1.0, 7.0, -2.0])]])
    np.testing.assert_array_equal(avg.averaged()[0], np.array([1.0, 7.0, -2.0], np.float32))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("form", FORMS)
def test_polyak_is_the_mean_of_the_iterates(form, dtype):
    its = [[x.astype(dtype).astype(np.float64) for x in it] for it in _iterates(2)]
    avg, params = _build(PolyakAverage, form, its[0], dtype)
    running = _copies(its[0])
    for k, it in enumerate(its[1:], start=1):
        _run(avg, params, [it])
        for r, p in zip(running, it):
            polyak.polyak_reference(r, p, step=k)
        for i, got in enumerate(avg.averaged()):
            want = np.mean([x[i] for x in its[:k + 1]], axis=0)  # iterates 0..k, the initial params included
            np.testing.assert_allclose(got, want, **TOL[dtype], err_msg=f"param {i} after {k} updates")
            np.testing.assert_allclose(running[i], want, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("cls, hp", CLASSES, ids=["ema", "polyak"])
def test_forms_agree_bit_exactly(monkeypatch, cls, hp):
    """The flat pass and the typed-list kernel (forced parallel, big tensors split into
    chunks) compute the same numbers."""
    monkeypatch.setattr(optimizer, "CHUNK", 7)
    monkeypatch.setattr(_dispatch, "PARALLEL_THRESHOLD", 0)
    its = [[x.astype(np.float32) for x in it] for it in _iterates(3, updates=4)]
    flat, fparams = _build(cls, "buffer", its[0], np.float32, **hp)
    listed, lparams = _build(cls, "lists", its[0], np.float32, **hp)
    assert listed._plan.parallel and listed._plan.chunks.shape[0] > len(SHAPES)
    _run(flat, fparams, its[1:])
    _run(listed, lparams, its[1:])
    for a, b in zip(flat.averaged(), listed.averaged()):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("decay", [0.9999, 0.999, 0.9])
@pytest.mark.parametrize("cls", [EMA, PolyakAverage])
def test_constant_params_keep_an_exact_average(cls, decay):
    """float32: the average of a param that never changes stays that param, bit for bit
    (the kernel's lerp form; ``decay * avg + (1 - decay) * p`` settles 1.6e-4 away at decay 0.9999)."""
    params = [a.astype(np.float32) for a in _iterates(4, updates=0)[0]]
    avg = cls(params, decay=decay) if cls is EMA else cls(params)
    for _ in range(50):
        avg.update()
    for a, p in zip(avg.averaged(), params):
        np.testing.assert_array_equal(a, p)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("cls, hp", CLASSES, ids=["ema", "polyak"])
def test_swap_twice_restores_bit_exactly(cls, hp, form):
    its = _iterates(5, updates=3)
    avg, params = _build(cls, form, its[0], **hp)
    _run(avg, params, its[1:])
    live, averaged = _copies(params), _copies(avg.averaged())
    assert not any(np.array_equal(a, b) for a, b in zip(live, averaged) if a.size)  # the test can tell them apart
    avg.swap()
    assert avg.swapped
    for p, a, got in zip(params, averaged, avg.averaged()):
        np.testing.assert_array_equal(p, a)
        np.testing.assert_array_equal(got, a)
    avg.swap()
    assert not avg.swapped
    for p, x, a, got in zip(params, live, averaged, avg.averaged()):
        np.testing.assert_array_equal(p, x)
        np.testing.assert_array_equal(got, a)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("cls, hp", CLASSES, ids=["ema", "polyak"])
def test_average_parameters_restores_on_exception(cls, hp, form):
    its = _iterates(6, updates=3)
    avg, params = _build(cls, form, its[0], **hp)
    _run(avg, params, its[1:])
    live, averaged = _copies(params), _copies(avg.averaged())
    with pytest.raises(KeyError, match="evaluation failed"), avg.average_parameters():
        for p, a in zip(params, averaged):
            np.testing.assert_array_equal(p, a)
        raise KeyError("evaluation failed")
    assert not avg.swapped
    for p, x, got, a in zip(params, live, avg.averaged(), averaged):
        np.testing.assert_array_equal(p, x)
        np.testing.assert_array_equal(got, a)


@pytest.mark.parametrize("src, dst", [("buffer", "buffer"), ("lists", "lists"), ("buffer", "lists")])
@pytest.mark.parametrize("cls, hp", CLASSES, ids=["ema", "polyak"])
def test_state_dict_round_trip_continues_bit_exactly(cls, hp, src, dst):
    its = _iterates(7, updates=6)
    a, pa = _build(cls, src, its[0], **hp)
    _run(a, pa, its[1:4])
    sd = a.state_dict()
    assert not any(np.shares_memory(x, y) for x, y in zip(sd["average"], a.averaged()))  # host copies
    b, pb = _build(cls, dst, its[3])  # another start and the default hyper-parameters: the state dict sets them
    b.load_state_dict(sd)
    assert b.num_updates == 3 and b.state_dict().keys() == sd.keys()
    _run(a, pa, its[4:])
    _run(b, pb, its[4:])
    for x, y in zip(a.averaged(), b.averaged()):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("cls, hp", CLASSES, ids=["ema", "polyak"])
def test_one_launch_per_update(cls, hp, form):
    """A whole model costs one kernel call per update on the CPU, whatever its tensor count."""
    avg, params = _build(cls, form, _iterates(8, updates=0)[0], **hp)
    _run(avg, params, _iterates(9, updates=4)[1:])
    assert avg.launches == 4


@pytest.mark.parametrize("target", ["buffer", "lists", "own"])
def test_copy_to(target):
    its = _iterates(10, updates=3)
    avg, params = _build(EMA, "buffer", its[0], decay=0.5)
    _run(avg, params, its[1:])
    want = _copies(avg.averaged())
    if target == "own":
        avg.copy_to()
        out = params
    else:
        dest = fastopt.ParamBuffer([np.zeros(s) for s in SHAPES]) if target == "buffer" else \
            [np.zeros(s) for s in SHAPES]
        avg.copy_to(dest)
        out = dest.params if target == "buffer" else dest
    for o, w in zip(out, want):
        np.testing.assert_array_equal(o, w)


@pytest.mark.parametrize("target", ["lists", "buffer"])
@pytest.mark.parametrize("dtype", [BFLOAT16, np.float16], ids=["bf16", "f16"])
@pytest.mark.parametrize("cls, hp", CLASSES, ids=["ema", "polyak"])
def test_copy_to_16bit_arrays_rounds_as_a_swap(cls, hp, dtype, target):
    """The float32 average of 16-bit params goes into arrays of the params' own dtype, rounded
    as a swap rounds it; another dtype than theirs or float32 is refused."""
    its = [[x.astype(dtype) for x in it] for it in _iterates(13, updates=4)]
    avg, params = _build(cls, "lists", its[0], dtype, **hp)
    _run(avg, params, its[1:])
    with avg.average_parameters():
        want = _copies(params)
    assert any((w != a).any() for w, a in zip(want, avg.averaged()))  # rounded, not exact
    dest = [np.zeros(s, dtype) for s in SHAPES]
    if target == "buffer":
        dest = fastopt.ParamBuffer(dest)
    avg.copy_to(dest)
    for o, w in zip(dest.params if target == "buffer" else dest, want):
        assert o.dtype == dtype
        np.testing.assert_array_equal(o, w)
    with pytest.raises(TypeError, match=r"params\[0\] has dtype float64 but averaged param 0 has dtype float32"):
        avg.copy_to([np.zeros(s) for s in SHAPES])


# -- bad input: a clear error naming the argument, nothing written --------------------

def _f64(*shape):
    return np.ones(shape)


def _readonly():
    a = np.ones(3)
    a.flags.writeable = False
    return a


@pytest.mark.parametrize("make, error, match", [
    (lambda: EMA([_f64(3)], decay=1.5), ValueError, r"decay must be a number in \[0, 1\], got 1.5"),
    (lambda: EMA([_f64(3)], decay=-0.1), ValueError, "decay must be"),
    (lambda: EMA([_f64(3)], decay=float("nan")), ValueError, "decay must be"),
    (lambda: EMA([_f64(3)], decay="0.9"), ValueError, "decay must be"),
    (lambda: EMA([_f64(3)], warmup="yes"), TypeError, "warmup must be True or False"),
    (lambda: PolyakAverage([]), ValueError, "params is empty"),
    (lambda: PolyakAverage(3.0), TypeError, "params must be a ParamBuffer or a list of arrays"),
    (lambda: PolyakAverage([[1.0, 2.0]]), TypeError, r"params\[0\] must be a NumPy array"),
    (lambda: EMA([np.ones(3, np.int64)]), TypeError, r"params\[0\] has dtype int64"),
    (lambda: EMA([_f64(3), np.ones(3, np.float32)]), TypeError,
     r"params\[1\] has dtype float32 but params\[0\] has dtype float64"),
    (lambda: EMA([np.ones(6)[::2]]), ValueError, r"params\[0\] is not C-contiguous"),
    (lambda: EMA([_f64(2), _readonly()]), ValueError, r"params\[1\] is read-only"),
    (lambda: (lambda a: EMA([a[:4], a[2:]]))(_f64(8)), ValueError, r"params\[0\] and params\[1\] share memory"),
], ids=["decay>1", "decay<0", "decay nan", "decay str", "warmup str", "empty", "not a list", "not arrays",
        "int", "mixed dtypes", "strided", "read-only", "overlap"])
def test_bad_construction(make, error, match):
    with pytest.raises(error, match=match):
        make()


def _trained(cls=EMA):
    its = _iterates(11, updates=5)
    avg, params = _build(cls, "lists", its[0], decay=0.8) if cls is EMA else _build(cls, "lists", its[0])
    _run(avg, params, its[1:3])
    sd = avg.state_dict()
    _run(avg, params, its[3:])  # the live state now differs from sd: a partial write would show
    return avg, sd


def _unchanged(avg, before):
    after = avg.state_dict()
    assert {k: v for k, v in after.items() if k != "average"} == {k: v for k, v in before.items() if k != "average"}
    for x, y in zip(after["average"], before["average"]):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("mutate, error, match", [
    (lambda sd: sd["average"].__setitem__(3, np.zeros(99)), ValueError,
     r"state_dict\['average'\]\[3\] has shape \(99,\) but averaged param 3 has shape \(11, 13\)"),
    (lambda sd: sd["average"].__setitem__(5, sd["average"][5].astype(np.float32)), TypeError,
     r"state_dict\['average'\]\[5\] has dtype float32"),
    (lambda sd: sd["average"].pop(), ValueError, r"state_dict\['average'\] has 5 arrays but 6"),
    (lambda sd: sd.__setitem__("kind", "PolyakAverage"), ValueError,
     r"state_dict\['kind'\] is 'PolyakAverage' but this averager is EMA"),
    (lambda sd: sd.pop("num_updates"), ValueError, "no 'num_updates' entry"),
    (lambda sd: sd.__setitem__("num_updates", -1), ValueError, r"state_dict\['num_updates'\] must be"),
    (lambda sd: sd.__setitem__("decay", 2.0), ValueError, "state_dict: decay must be"),
], ids=["shape", "dtype", "count", "kind", "missing", "negative count", "decay"])
def test_bad_state_dict_writes_nothing(mutate, error, match):
    avg, sd = _trained()
    before = avg.state_dict()
    mutate(sd)
    with pytest.raises(error, match=match):
        avg.load_state_dict(sd)
    _unchanged(avg, before)


@pytest.mark.parametrize("dest, error, match", [
    (lambda: fastopt.ParamBuffer([np.zeros(s) for s in [*SHAPES[:3], (13, 11), *SHAPES[4:]]]), ValueError,
     r"params\[3\] has shape \(13, 11\) but averaged param 3 has shape \(11, 13\)"),
    (lambda: [np.zeros(s) for s in SHAPES[:2]], ValueError, "params has 2 arrays but 6 params are averaged"),
    (lambda: [np.zeros(s, np.float32) for s in SHAPES], TypeError, r"params\[0\] has dtype float32"),
], ids=["other buffer", "count", "dtype"])
def test_bad_copy_to_writes_nothing(dest, error, match):
    avg, _ = _trained()
    target = dest()
    arrays = target.params if isinstance(target, fastopt.ParamBuffer) else target
    with pytest.raises(error, match=match):
        avg.copy_to(target)
    assert all((a == 0).all() for a in arrays)


@pytest.mark.parametrize("call, match", [
    (lambda avg: avg.update(), r"update\(\) while the averaged weights are swapped"),
    (lambda avg: avg.load_state_dict(avg.state_dict()), r"load_state_dict\(\) while"),
    (lambda avg: avg.copy_to(), r"copy_to\(\) while"),
    (lambda avg: avg.average_parameters().__enter__(), r"average_parameters\(\) while"),
], ids=["update", "load", "copy_to", "context"])
def test_swapped_state_refuses_writes(call, match):
    avg, _ = _trained(PolyakAverage)
    avg.swap()
    before = avg.state_dict()
    with pytest.raises(RuntimeError, match=match):
        call(avg)
    _unchanged(avg, before)


def test_bad_decay_set_later_fails_at_update():
    avg, _ = _trained()
    before = avg.state_dict()
    avg.decay = 1.5
    with pytest.raises(ValueError, match="decay must be a number in"):
        avg.update()
    avg.decay = before["decay"]
    _unchanged(avg, before)


# -- CUDA (a GPU, or the simulator in a child process) -----------------------------------

@pytest.mark.cuda
@pytest.mark.parametrize("cls, hp", CLASSES, ids=["ema", "polyak"])
def test_cuda_lists_match_cpu(cls, hp):
    shapes = [(5, 7), (1,), (33,)]
    its = _iterates(12, updates=3, shapes=shapes)
    cpu, cpu_params = _build(cls, "lists", its[0], **hp)
    dev_params = [to_backend(a, "cuda") for a in its[0]]
    dev = cls(dev_params, **hp)
    _run(cpu, cpu_params, its[1:])
    for it in its[1:]:
        for p, x in zip(dev_params, it):
            p.copy_to_device(x)
        dev.update()
    assert dev.launches == 3 * len(shapes)  # one launch per tensor on CUDA
    for a, b in zip(cpu.averaged(), dev.averaged()):
        np.testing.assert_allclose(to_host(b), a, rtol=1e-12, atol=1e-14)
    dev.swap()
    for p, a in zip(dev_params, cpu.averaged()):
        np.testing.assert_allclose(to_host(p), a, rtol=1e-12, atol=1e-14)
    dev.swap()
    for p, x in zip(dev_params, its[-1]):
        np.testing.assert_array_equal(to_host(p), x)
    sd = dev.state_dict()
    cpu.load_state_dict(sd)
    again = cls([to_backend(a, "cuda") for a in its[0]])
    again.load_state_dict(sd)
    for a, b, c in zip(cpu.averaged(), sd["average"], again.averaged()):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(to_host(c), b)


# -- PTX: float32 kernels hold no float64 instruction ---------------------------------

@pytest.mark.skipif(SIMULATOR, reason="compile_ptx does not exist under the simulator")
@pytest.mark.parametrize("cc", [(8, 0), (9, 0)], ids=["sm80", "sm90"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("rule, hp", [(ema.EMA, dict(decay=0.999, warmup=True)), (polyak.POLYAK, {})],
                         ids=["ema", "polyak"])
def test_ptx_has_no_f64_in_float32(rule, hp, dtype, cc):
    pytest.importorskip("numba_cuda", reason='numba-cuda is not installed (pip install -e ".[cuda-tools]")')
    from fastopt.kernels._ptx import compile_kernel, f64_count
    scalars = rule.kernel_scalars(hp, 1, None, np.dtype(dtype))
    ptx = compile_kernel(rule.kernels, (), scalars, dtype, cc)
    assert len(ptx.splitlines()) > 50
    if dtype is np.float32:
        assert f64_count(ptx) == 0
    else:
        assert f64_count(ptx) > 0  # the count sees float64 where it is meant to be
