import copy
import pickle

import numpy as np
import pytest

from fastopt.buffer import ALIGN, ParamBuffer
from fastopt.kernels._formats import BFLOAT16


def _model(dtype=np.float32):
    rng = np.random.default_rng(0)
    shapes = [(3, 5), (5,), (7, 1, 3), (1,), (33,)]
    return [rng.standard_normal(s).astype(dtype) for s in shapes]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_views_hold_the_arrays_and_share_the_arena(dtype):
    arrays = _model(dtype)
    buf = ParamBuffer(arrays, names=[f"p{i}" for i in range(len(arrays))])
    assert len(buf) == 5 and buf.numel == sum(a.size for a in arrays)
    for a, p, g in zip(arrays, buf.params, buf.grads):
        np.testing.assert_array_equal(p, a)
        assert p.shape == a.shape and p.dtype == dtype
        assert np.shares_memory(p, buf.arena) and np.shares_memory(g, buf.grad_arena)
        assert p.ctypes.data % ALIGN == 0 and g.ctypes.data % ALIGN == 0
        assert not g.any()
    # padding is zero and the arena holds nothing but the params
    assert buf.arena.sum() == pytest.approx(sum(a.sum() for a in arrays))
    buf.params[1][...] = 7
    assert buf.arena[buf.offsets[1]] == 7 and arrays[1][0] != 7  # copied, not aliased
    assert buf.named_params()[2][0] == "p2"


def test_shapes_constructor_allocates_zeros():
    buf = ParamBuffer(shapes=[(4, 4), (4,)], dtype=np.float64, device="cpu")
    assert [p.shape for p in buf.params] == [(4, 4), (4,)]
    assert buf.arena.dtype == np.float64 and not buf.arena.any()


@pytest.mark.parametrize("kwargs,exc,message", [
    (dict(arrays=[]), ValueError, "arrays is empty"),
    (dict(arrays=[np.zeros(3, np.float32), np.zeros(3)]), TypeError, r"arrays\[1\] has dtype float64"),
    (dict(arrays=[np.zeros(3, np.int64)]), TypeError, "dtype int64 is not supported"),
    (dict(arrays=[np.zeros(3, np.float32), [1.0]]), TypeError, r"arrays\[1\] must be a NumPy or CUDA array"),
    (dict(shapes=[(3,)], device="tpu"), ValueError, "device must be 'cpu' or 'cuda'"),
    (dict(shapes=[(3,), (2,)], names=["a"]), ValueError, "names has 1 entries"),
    (dict(shapes=[(3,), (2,)], names=["a", "a"]), ValueError, "names must be unique"),
    ({}, ValueError, "pass either arrays or shapes"),
])
def test_bad_input_names_the_argument(kwargs, exc, message):
    with pytest.raises(exc, match=message):
        ParamBuffer(**kwargs)


def test_one_fused_call_updates_every_view():
    """The point of the arena: one functional call over it equals one call per tensor."""
    from fastopt.functional import adam_
    arrays = _model()
    buf = ParamBuffer(arrays)
    rng = np.random.default_rng(1)
    for g in buf.grads:
        g[...] = rng.standard_normal(g.shape)
    state = [np.zeros_like(buf.arena) for _ in range(2)]
    adam_(buf.arena, buf.grad_arena, *state, step=1, lr=0.1)
    for a, p, g in zip(arrays, buf.params, buf.grads):
        m, v = np.zeros_like(a), np.zeros_like(a)
        q = a.copy()
        adam_(q, np.ascontiguousarray(g), m, v, step=1, lr=0.1)
        np.testing.assert_array_equal(p, q)
    pad = np.ones(buf.arena.size, bool)
    for o, p in zip(buf.offsets, buf.params):
        pad[o:o + p.size] = False
    assert pad.any() and not buf.arena[pad].any()  # padding stayed zero


# shapes of _model(): 15, 5, 21, 1 and 33 elements; each segment rounded up to whole
# 64-byte lines of its dtype: 16 float32 or 8 float64 elements a line
@pytest.mark.parametrize("dtype,offsets,size", [
    (np.float32, [0, 16, 32, 64, 80], 128),
    (np.float64, [0, 16, 24, 48, 56], 96),
], ids=["f32", "f64"])
def test_offsets_and_arena_size_are_whole_lines_of_the_dtype(dtype, offsets, size):
    """A float32-only alignment doubles a float64 arena and splits the flat pass: exact
    offsets, exact sizes, and one launch for the whole model."""
    import fastopt
    buf = ParamBuffer(_model(dtype))
    assert buf.offsets == offsets
    assert buf.arena.size == buf.grad_arena.size == size
    assert buf.arena.nbytes == size * np.dtype(dtype).itemsize
    for g in buf.grads:
        g[...] = 1
    opt = fastopt.Adam(buf, nonfinite="propagate")
    opt.step()
    assert opt.launches == 1
    assert [a.size for a in opt.arenas.values()] == [size, size]


def test_a_nested_list_is_named_not_an_attribute_error():
    with pytest.raises(TypeError, match=r"arrays\[0\] must be a NumPy or CUDA array, got list"):
        ParamBuffer([[1.0, 2.0]])


@pytest.mark.parametrize("duplicate", [
    lambda b: pickle.loads(pickle.dumps(b)),
    copy.deepcopy,
], ids=["pickle", "deepcopy"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64, BFLOAT16], ids=["f32", "f64", "bf16"])
def test_a_copy_is_a_working_buffer_of_its_own(duplicate, dtype):
    """NumPy pickles each view as an array of its own: the copy's views must be rebuilt on
    its arenas, or what reads the arenas (optimizers, norms, averagers) sees stale values."""
    import fastopt
    buf = ParamBuffer(_model(dtype), names=[f"p{i}" for i in range(5)])
    for g in buf.grads:
        g[...] = 1
    other = duplicate(buf)
    assert other.shapes == buf.shapes and other.offsets == buf.offsets and other.names == buf.names
    assert not np.shares_memory(other.arena, buf.arena) and not np.shares_memory(other.grad_arena, buf.grad_arena)
    for p, g, q, h in zip(other.params, other.grads, buf.params, buf.grads):
        assert np.shares_memory(p, other.arena) and np.shares_memory(g, other.grad_arena)
        assert p.ctypes.data % ALIGN == 0 and g.ctypes.data % ALIGN == 0
        np.testing.assert_array_equal(p, q)
        np.testing.assert_array_equal(g, h)
    other.grads[0][...] = 3
    assert fastopt.grad_norm(other) == pytest.approx(np.sqrt(9 * 15 + other.numel - 15))
    before = buf.arena.copy()
    fastopt.SGD(other, lr=0.5).step()
    np.testing.assert_array_equal(other.params[0], (buf.params[0].astype(np.float64) - 1.5).astype(dtype))
    np.testing.assert_array_equal(buf.arena, before)  # the original is untouched


def test_a_deepcopy_of_a_buffer_with_its_views_keeps_them_views():
    """A container holding the buffer and then its views (a model's weights): the copy's views
    are the copied buffer's; views met before their buffer would be cut off: refused."""
    buf = ParamBuffer(_model(np.float32))
    held = copy.deepcopy({"buf": buf, "w": buf.params[1], "g": buf.grads[1]})
    assert held["w"] is held["buf"].params[1] and held["g"] is held["buf"].grads[1]
    with pytest.raises(TypeError, match="before the buffer itself"):
        copy.deepcopy({"w": buf.params[1], "buf": buf})
