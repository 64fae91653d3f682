"""Global-norm clipping and the non-finite guard: the norm against torch and float64
NumPy, determinism, the clip fused into the update equal bit for bit to the separate pass,
and "skip" / "raise" / "propagate" on a bad gradient."""
import math

import numpy as np
import pytest

import fastopt
from conftest import to_backend, to_host
from fastopt.clip import NormPlan, clip_grad_norm_
from fastopt.kernels import _dispatch, _reduce

SHAPES = [(7, 5), (1,), (300,), (0,), (2, 3, 4)]
NORMS = [2.0, math.inf, 1.0, 3.0, 0.5]


def _grads(seed, dtype=np.float64, shapes=SHAPES, scale=10.0):
    rng = np.random.default_rng(seed)
    return [(scale * rng.standard_normal(s)).astype(dtype) for s in shapes]


def _norm64(grads, p):
    flat = np.concatenate([g.reshape(-1).astype(np.float64) for g in grads])
    return float(np.max(np.abs(flat))) if p == math.inf else float(np.sum(np.abs(flat) ** p) ** (1 / p))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("norm_type", NORMS)
def test_norm_matches_float64_numpy(norm_type, dtype):
    grads = _grads(1, dtype)
    total, finite = NormPlan(grads).norm(norm_type)
    assert finite
    assert total == pytest.approx(_norm64(grads, norm_type), rel=1e-12)


def test_norm_is_the_same_bits_every_run(monkeypatch):
    """Many chunks, parallel threads: the partials are added in chunk order."""
    monkeypatch.setattr(_reduce, "CHUNK", 16)
    monkeypatch.setattr(_dispatch, "PARALLEL_THRESHOLD", 0)
    grads = _grads(2, np.float32, shapes=[(1000,), (37,), (513,)])
    plan = NormPlan(grads)
    assert plan.chunks.shape[0] > 60
    first = plan.norm()[0]
    assert all(NormPlan(grads).norm()[0] == first for _ in range(20))


def test_segment_norms():
    grads = _grads(3)
    norms, _finite = NormPlan(grads).segment_norms()
    np.testing.assert_allclose(norms, [np.linalg.norm(g) for g in grads], rtol=1e-13)


@pytest.mark.parametrize("where", ["list", "buffer"])
@pytest.mark.parametrize("norm_type", NORMS)
def test_clip_grad_norm_matches_torch(norm_type, where):
    torch = pytest.importorskip("torch")
    grads = _grads(4, shapes=[s for s in SHAPES if s != (0,)])  # torch's inf-norm rejects empty tensors
    params = [torch.zeros(g.shape, dtype=torch.float64, requires_grad=True) for g in grads]
    for p, g in zip(params, grads):
        p.grad = torch.tensor(g)
    expected = torch.nn.utils.clip_grad_norm_(params, 1.5, norm_type=norm_type)
    if where == "buffer":
        buf = fastopt.ParamBuffer([np.zeros_like(g) for g in grads])
        for view, g in zip(buf.grads, grads):
            view[...] = g
        total, mine = clip_grad_norm_(buf, 1.5, norm_type), buf.grads
    else:
        mine = [g.copy() for g in grads]
        total = clip_grad_norm_(mine, 1.5, norm_type)
    assert total == pytest.approx(float(expected), rel=1e-12)
    for m, p in zip(mine, params):
        np.testing.assert_allclose(m, p.grad.numpy(), rtol=1e-12, atol=1e-15)


def test_clip_below_max_norm_leaves_gradients_alone():
    grads = _grads(5, scale=1e-3)
    before = [g.copy() for g in grads]
    clip_grad_norm_(grads, 100.0)
    for a, b in zip(before, grads):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan])
def test_nonfinite_is_found(bad):
    grads = _grads(6)
    grads[2][123] = bad
    assert not NormPlan(grads).norm()[1]
    with pytest.raises(FloatingPointError, match="non-finite"):
        clip_grad_norm_(grads, 1.0, error_if_nonfinite=True)


def test_error_if_nonfinite_sees_a_norm_that_overflows():
    """Finite gradients whose norm overflows float64: torch raises, and so does this."""
    grads = [np.array([1e200, 1.0]), np.array([1e200])]
    before = [g.copy() for g in grads]
    with pytest.raises(FloatingPointError, match="non-finite"):
        clip_grad_norm_(grads, 1.0, error_if_nonfinite=True)
    for a, b in zip(before, grads):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("max_norm", [0.0, -1.0, None, "1"])
def test_clip_bad_max_norm(max_norm):
    with pytest.raises(ValueError, match="max_norm"):
        clip_grad_norm_(_grads(7), max_norm)


# -- inside the optimizers ------------------------------------------------------------

def _buffer_run(cls, grads_seq, **kw):
    buf = fastopt.ParamBuffer(_grads(8, np.float32, scale=1.0))
    opt = cls(buf, **kw)
    for grads in grads_seq:
        for view, g in zip(buf.grads, grads):
            view[...] = g
        opt.step()
    return buf, opt


@pytest.mark.parametrize("cls", [fastopt.Adam, fastopt.SGD, fastopt.Lion])
def test_fused_clip_equals_separate_pass_bit_for_bit(cls):
    seq = [_grads(10 + i, np.float32) for i in range(4)]
    fused, opt = _buffer_run(cls, seq, lr=1e-2, max_grad_norm=0.5)
    separate = fastopt.ParamBuffer(_grads(8, np.float32, scale=1.0))
    plain = cls(separate, lr=1e-2)
    for grads in seq:
        for view, g in zip(separate.grads, grads):
            view[...] = g
        clip_grad_norm_(separate, 0.5)
        plain.step()
    np.testing.assert_array_equal(fused.arena, separate.arena)
    assert opt.last_grad_norm == pytest.approx(_norm64(seq[-1], 2.0), rel=1e-6)


def test_fused_clip_matches_torch():
    torch = pytest.importorskip("torch")
    seq = [_grads(20 + i) for i in range(5)]
    init = _grads(21, scale=1.0)
    params = [a.copy() for a in init]
    opt = fastopt.AdamW(params, lr=1e-2, max_grad_norm=1.0)
    tparams = [torch.tensor(a, requires_grad=True) for a in init]
    topt = torch.optim.AdamW(tparams, lr=1e-2, foreach=False)
    for grads in seq:
        opt.step(grads)
        for p, g in zip(tparams, grads):
            p.grad = torch.tensor(g)
        torch.nn.utils.clip_grad_norm_(tparams, 1.0)
        topt.step()
    for a, p in zip(params, tparams):
        np.testing.assert_allclose(a, p.detach().numpy(), rtol=1e-10, atol=1e-13)


def _poisoned(seed, dtype=np.float32):
    grads = _grads(seed, dtype)
    grads[0][3, 2] = np.nan
    return grads


def test_skip_leaves_everything_untouched():
    seq = [_grads(30, np.float32), _poisoned(31), _grads(32, np.float32)]
    buf, opt = _buffer_run(fastopt.Adam, seq[:1], lr=1e-2)
    params, state, steps = buf.arena.copy(), {k: v.copy() for k, v in opt.arenas.items()}, opt.steps
    for view, g in zip(buf.grads, seq[1]):
        view[...] = g
    opt.step()
    assert opt.last_step_skipped and opt.skipped_steps == 1 and opt.steps == steps
    np.testing.assert_array_equal(buf.arena, params)
    for k, v in state.items():
        np.testing.assert_array_equal(opt.arenas[k], v)
    clean, _ = _buffer_run(fastopt.Adam, [seq[0], seq[2]], lr=1e-2)
    for view, g in zip(buf.grads, seq[2]):
        view[...] = g
    opt.step()
    assert not opt.last_step_skipped
    np.testing.assert_array_equal(buf.arena, clean.arena)  # as if the bad batch never came


def test_raise_writes_nothing():
    params = _grads(40, np.float32, scale=1.0)
    before = [p.copy() for p in params]
    opt = fastopt.SGD(params, lr=0.1, momentum=0.9, nonfinite="raise")
    with pytest.raises(FloatingPointError, match="nothing was updated"):
        opt.step(_poisoned(41))
    assert opt.steps == 0
    for a, b in zip(before, params):
        np.testing.assert_array_equal(a, b)


def test_propagate_behaves_like_pytorch():
    params = _grads(42, np.float32, scale=1.0)
    opt = fastopt.SGD(params, lr=0.1, nonfinite="propagate")
    opt.step(_poisoned(43))
    assert np.isnan(params[0][3, 2]) and np.isfinite(params[1]).all() and opt.steps == 1
    assert opt.last_grad_norm is None  # no reduction pass ran


@pytest.mark.parametrize("kw, match", [
    (dict(nonfinite="ignore"), "nonfinite must be one of"),
    (dict(max_grad_norm=-1.0), "max_grad_norm"),
    (dict(max_grad_norm=0), "max_grad_norm"),
], ids=["nonfinite", "negative", "zero"])
def test_bad_options(kw, match):
    with pytest.raises(ValueError, match=match):
        fastopt.Adam([np.zeros(3)], **kw)


@pytest.mark.cuda
@pytest.mark.parametrize("norm_type", [2.0, math.inf])
def test_cuda_norm_matches_cpu(norm_type):
    grads = _grads(50, np.float32, shapes=[(37,), (5, 3), (1,)])
    total, finite = NormPlan([to_backend(g, "cuda") for g in grads]).norm(norm_type)
    assert finite and total == pytest.approx(_norm64(grads, norm_type), rel=1e-5)
    grads[1][2, 1] = np.inf
    assert not NormPlan([to_backend(g, "cuda") for g in grads]).norm(norm_type)[1]
    grads[1][2, 1] = np.nan
    total, finite = NormPlan([to_backend(g, "cuda") for g in grads]).norm(norm_type)
    assert not finite and math.isnan(total)


@pytest.mark.cuda
def test_cuda_clip_and_skip():
    grads = _grads(51, np.float32, shapes=[(37,), (5, 3)])
    dev = [to_backend(g, "cuda") for g in grads]
    total = clip_grad_norm_(dev, 1.0)
    assert total == pytest.approx(_norm64(grads, 2.0), rel=1e-5)
    assert _norm64([to_host(d) for d in dev], 2.0) == pytest.approx(1.0, rel=1e-4)
    params = [to_backend(np.ones(g.shape, np.float32), "cuda") for g in grads]
    opt = fastopt.Adam(params, lr=0.1)
    bad = [g.copy() for g in grads]
    bad[0][0] = np.nan
    opt.step([to_backend(g, "cuda") for g in bad])
    assert opt.last_step_skipped and all((to_host(p) == 1).all() for p in params)


def _norms64(grads, p):
    return [_norm64([g], p) if g.size else 0.0 for g in grads]


@pytest.mark.parametrize("chunk", [None, 16], ids=["one-chunk", "many-chunks"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("norm_type", NORMS)
def test_segment_norms_match_float64_numpy_for_every_p(norm_type, dtype, chunk, monkeypatch):
    """Per-tensor norms (LARS's trust ratios) for p = 2, inf, 1, 3, 0.5; with small chunks
    each tensor's partials are combined across chunks (summed, or the max for p = inf)."""
    if chunk:
        monkeypatch.setattr(_reduce, "CHUNK", chunk)
    grads = _grads(5, dtype)
    plan = NormPlan(grads)
    assert chunk is None or plan.chunks.shape[0] > len(grads) + 10
    norms, finite = plan.segment_norms(norm_type)
    assert finite and norms.shape == (len(grads),)
    np.testing.assert_allclose(norms, _norms64(grads, norm_type), rtol=1e-12, atol=0)
    total, _ = plan.norm(norm_type)
    assert total == pytest.approx(_norm64(grads, norm_type), rel=1e-12)


@pytest.mark.cuda
@pytest.mark.parametrize("norm_type", NORMS)
def test_cuda_norms_match_float64_numpy_for_every_p(norm_type):
    grads = _grads(52, np.float32, shapes=[(37,), (5, 3), (1,), (300,)])
    plan = NormPlan([to_backend(g, "cuda") for g in grads])
    total, finite = plan.norm(norm_type)
    assert finite and total == pytest.approx(_norm64(grads, norm_type), rel=1e-5)
    norms, finite = plan.segment_norms(norm_type)
    assert finite
    np.testing.assert_allclose(norms, _norms64(grads, norm_type), rtol=1e-5, atol=0)


def test_the_norm_is_an_engine_pass_that_writes_nothing():
    from fastopt.kernels._engine import Kernels, Scalars
    for kernels in _reduce.NORM.values():
        assert kernels.writes == () and not kernels.reads_grad and kernels.sums[1] == "nonfinite"
    assert _reduce.NORM[_reduce.MAX].sums[0] == "max"
    bad = [(("squares", "cubes"), "sums must be kinds"), (("nonfinite", "max"), "'max' first")]
    for sums, message in bad:
        with pytest.raises(ValueError, match=message):
            Kernels("bad", _reduce.norm_math, (), Scalars((), ()), writes=(), sums=sums)


@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan])
@pytest.mark.parametrize("norm_type", [2.0, math.inf, 3.0])
def test_one_nonfinite_value_in_any_chunk_is_seen(norm_type, bad, monkeypatch):
    monkeypatch.setattr(_reduce, "CHUNK", 16)  # many chunks: the bad value in the last of them
    grads = _grads(3, np.float32)
    grads[2][-1] = bad
    total, finite = NormPlan(grads).norm(norm_type)
    assert not finite
    if math.isnan(bad):  # the max norm too: max(t, nan) is t, yet the norm is NaN (torch's too)
        assert math.isnan(total) and math.isnan(fastopt.grad_norm(grads, norm_type))
    else:
        assert total == math.inf


def test_a_param_buffers_alignment_padding_never_counts():
    """The padding between a ParamBuffer's spans holds whatever was written there: the norm
    of the buffer is its params' gradients' norm (as the optimizer's guard reads it)."""
    buf = fastopt.ParamBuffer([np.zeros(s, np.float32) for s in [(3,), (5,), (2, 2)]])
    assert buf.grad_arena.size > buf.numel  # there is padding
    buf.grad_arena[...] = np.nan
    for g in buf.grads:
        g[...] = 1.0
    assert fastopt.grad_norm(buf) == fastopt.grad_norm(buf.grads) == pytest.approx(math.sqrt(12))
    assert fastopt.grad_norm(buf, math.inf) == 1.0
    assert clip_grad_norm_(buf, 1.0) == pytest.approx(math.sqrt(12))
    for g in buf.grads:
        np.testing.assert_allclose(g, 1 / math.sqrt(12), rtol=1e-5)
    # a NaN gradient: the NaN factor reaches the spans only, never the padding (0 * NaN)
    buf.grad_arena[...] = 0.0
    buf.grads[1][0] = np.nan
    assert math.isnan(clip_grad_norm_(buf, 1.0))
    spans = np.zeros(buf.grad_arena.size, bool)
    for o, g in zip(buf.offsets, buf.grads):
        spans[o:o + g.size] = True
    assert (buf.grad_arena[~spans] == 0).all() and np.isnan(buf.grad_arena[spans]).all()
    # the spans' plan is laid out once per buffer (per call it cost ~8 ms for 400 tensors)
    assert fastopt.clip._buffer_plan(buf) is fastopt.clip._buffer_plan(buf)


@pytest.mark.parametrize("norm_type", [2.0, 1.0, 3.0, float("inf")])
def test_gradients_of_several_dtypes_have_one_global_norm(norm_type):
    """As torch's clip takes them: float32, float64 and bfloat16 gradients in one list."""
    import ml_dtypes
    rng = np.random.default_rng(0)
    grads = [rng.standard_normal(40).astype(np.float32), rng.standard_normal(7),
             rng.standard_normal(33).astype(ml_dtypes.bfloat16)]
    flat = np.concatenate([g.astype(np.float64) for g in grads])
    want = np.abs(flat).max() if norm_type == float("inf") else np.sum(np.abs(flat) ** norm_type) ** (1 / norm_type)
    assert fastopt.grad_norm(grads, norm_type) == pytest.approx(want, rel=1e-6)
    before = [g.astype(np.float64) for g in grads]
    total = fastopt.clip_grad_norm_(grads, 0.5, norm_type)
    assert total == pytest.approx(want, rel=1e-6)
    for g, b in zip(grads, before):
        np.testing.assert_allclose(g.astype(np.float64), b * 0.5 / (want + 1e-6), rtol=1e-2)


@pytest.mark.parametrize("norm_type", ["fro", None, True, -1.0])
def test_a_bad_norm_type_is_named(norm_type):
    with pytest.raises(ValueError, match="norm_type must be"):
        fastopt.clip_grad_norm_([np.ones(3)], 1.0, norm_type=norm_type)
