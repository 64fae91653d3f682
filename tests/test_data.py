"""Data loaders: IDX and npz round-trips through files written here, every malformed-file
case, the digits split, and the minibatch iterator."""
import gzip

import numpy as np
import pytest

from fastopt.app import data as D


def idx_bytes(array, code=0x08):
    """An IDX file for ``array``, written from the format's definition."""
    dtype = np.dtype(D.IDX_DTYPES[code])
    header = bytes([0, 0, code, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    return header + np.ascontiguousarray(array, dtype).tobytes()


def write(path, payload, gz=False):
    path.write_bytes(gzip.compress(payload) if gz else payload)
    return path


def fake_mnist(rng, n_train=7, n_test=5, size=28):
    x = [rng.integers(0, 256, (n, size, size), dtype=np.uint8) for n in (n_train, n_test)]
    y = [rng.integers(0, 10, n, dtype=np.uint8) for n in (n_train, n_test)]
    return x[0], y[0], x[1], y[1]


def write_mnist_dir(directory, arrays, gz):
    for name, a in zip(("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                        "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"), arrays, strict=True):
        write(directory / (name + (".gz" if gz else "")), idx_bytes(a), gz)
    return directory


# (type code, array): every IDX dtype, values that need the full range of each
IDX_CASES = [
    (0x08, np.arange(24, dtype=np.uint8).reshape(2, 3, 4) * 10),
    (0x09, np.array([-128, -1, 0, 127], np.int8)),
    (0x0B, np.array([[-32768, 258], [7, 32767]], np.int16)),
    (0x0C, np.array([-2 ** 31, 1, 2 ** 31 - 1], np.int32)),
    (0x0D, np.array([[1.5, -2.25e10], [np.pi, 0.0]], np.float32)),
    (0x0E, np.array([np.e, -1e300, 5e-324], np.float64)),
    (0x08, np.zeros((0, 28, 28), np.uint8)),
]


@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gzip"])
@pytest.mark.parametrize("code,array", IDX_CASES, ids=[f"{c:#04x}-{a.shape}" for c, a in IDX_CASES])
def test_read_idx_round_trip(tmp_path, code, array, gz):
    # the name says nothing about compression: gzip is told by its magic bytes
    path = write(tmp_path / "file.idx", idx_bytes(array, code), gz)
    got = D.read_idx(path)
    assert got.shape == array.shape and got.dtype == array.dtype.newbyteorder("=")
    np.testing.assert_array_equal(got, array)
    got[...] = 0  # writeable, not a view of the file's bytes


LABELS = idx_bytes(np.arange(10, dtype=np.uint8))

# (file content, magic read_idx must check or None, the message's key words)
BAD_IDX = [
    (b"\0\0\x08", None, r"truncated header \(expected at least 4 bytes, got 3\)"),
    (b"\x01\0\x08\x01" + LABELS[4:], None, "wrong magic number 0x01000801"),
    (b"\0\0\x07\x01" + LABELS[4:], None, "wrong magic number 0x00000701"),
    (LABELS, D.IMAGES_MAGIC, "wrong magic number 0x00000801, expected 0x00000803"),
    (LABELS[:6], None, r"truncated header \(expected 8 bytes, got 6\)"),
    (LABELS[:-3], None, r"truncated \(expected 18 bytes for shape \(10,\), got 15\)"),
    (LABELS + b"xyz", None, "3 bytes of trailing garbage"),
]


@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gzip"])
@pytest.mark.parametrize("content,magic,message", BAD_IDX, ids=[m[:24] for _, _, m in BAD_IDX])
def test_read_idx_rejects_bad_files(tmp_path, content, magic, message, gz):
    path = write(tmp_path / "bad-idx1-ubyte", content, gz)
    with pytest.raises(D.DataError, match=message) as e:
        D.read_idx(path, magic)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_read_idx_refuses_dimensions_that_overflow(tmp_path):
    header = bytes([0, 0, 0x08, 3]) + (2 ** 32 - 1).to_bytes(4, "big") * 3
    path = write(tmp_path / "huge-idx3-ubyte", header + bytes(100))
    with pytest.raises(D.DataError, match=r"dimensions \(4294967295, 4294967295, 4294967295\) overflow int64"):
        D.read_idx(path, D.IMAGES_MAGIC)
    # fits int64 but no data set: refused before any read of that size
    path = write(tmp_path / "big-idx3-ubyte", bytes([0, 0, 0x0E, 2]) + (2 ** 20).to_bytes(4, "big") * 2)
    with pytest.raises(D.DataError, match="more than the 68,719,476,736 bytes fastopt accepts per array"):
        D.read_idx(path)


def _peak_bytes(fn):
    """(what ``fn()`` raised, the peak of Python and NumPy allocations while it ran)."""
    import tracemalloc
    tracemalloc.start()
    try:
        with pytest.raises(D.DataError) as e:
            fn()
        return str(e.value), tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_a_gzip_bomb_is_refused_without_decompressing_it(tmp_path):
    """A small .gz whose stream holds far more than its header declares: read up to the declared
    size and a bounded look beyond, never the whole stream (it used to be decompressed first)."""
    path = tmp_path / "bomb-idx1-ubyte.gz"
    with gzip.open(path, "wb") as f:
        f.write(LABELS)
        for _ in range(64):
            f.write(bytes(1 << 20))  # 64 MiB of zeros: a 64 KiB file
    assert path.stat().st_size < 1 << 17
    message, peak = _peak_bytes(lambda: D.read_idx(path))
    assert "more than 1,048,576 bytes of trailing garbage" in message
    assert peak < 8 << 20, peak


def test_an_npz_header_that_overstates_its_data_allocates_nothing(tmp_path):
    """An .npy member declaring (100000, 28, 28) uint8 (78 MB) over 784 bytes of data: refused
    from the header and the member's real size, before the array is allocated."""
    import io
    import zipfile
    member = io.BytesIO()
    np.lib.format.write_array_header_1_0(member, {"descr": "|u1", "fortran_order": False, "shape": (100000, 28, 28)})
    member.write(bytes(784))
    arrays = dict(zip(D.NPZ_KEYS, fake_mnist(np.random.default_rng(4))))
    path = tmp_path / "m.npz"
    np.savez(path, **arrays)
    with zipfile.ZipFile(path, "w") as z:  # rewrite with the forged x_train
        for key, a in arrays.items():
            if key == "x_train":
                z.writestr("x_train.npy", member.getvalue())
            else:
                buf = io.BytesIO()
                np.save(buf, a)
                z.writestr(f"{key}.npy", buf.getvalue())
    message, peak = _peak_bytes(lambda: D.load_mnist(path))
    assert "m.npz[x_train]: the header declares shape (100000, 28, 28) of uint8, 78,400,000 bytes, " \
           "but the member holds 784 bytes of data" in message
    assert peak < 8 << 20, peak


def test_only_the_four_npz_keys_are_read(tmp_path):
    arrays = dict(zip(D.NPZ_KEYS, fake_mnist(np.random.default_rng(5))))
    np.savez(tmp_path / "m.npz", **arrays, extra=np.arange(3).astype(object))  # would need pickle
    got = D.load_mnist(tmp_path / "m.npz", dtype=np.float64)
    np.testing.assert_array_equal(got[1], arrays["y_train"])


@pytest.mark.parametrize("content,what", [
    (b"0,1,2\n3,4,5\n", "not a readable .npz file: it is a text file"),
    (gzip.compress(LABELS), "not a readable .npz file: it is gzip data (a single .gz file?"),
    (LABELS, "not a readable .npz file: it is an IDX file"),
    (b"", "not a readable .npz file: it is empty"),
    (b"\x00\xff\xfe\x01garbage", "not a readable .npz file: it starts with the bytes 00 ff fe 01"),
], ids=["text", "gzip", "idx", "empty", "binary"])
def test_a_file_that_is_no_npz_is_named_for_what_it_is(tmp_path, content, what):
    path = write(tmp_path / "data.bin", content)
    with pytest.raises(D.DataError, match="--data takes a folder") as e:
        D.load_mnist(path)
    assert what in str(e.value) and "pickle" not in str(e.value)


def test_a_npy_file_is_named_for_what_it_is(tmp_path):
    np.save(tmp_path / "x.npy", np.zeros((2, 28, 28), np.uint8))
    with pytest.raises(D.DataError, match=r"x.npy: not a readable .npz file: it is a .npy file"):
        D.load_mnist(tmp_path / "x.npy")


def test_read_idx_rejects_missing_file_and_broken_gzip(tmp_path):
    with pytest.raises(D.DataError, match="no such file"):
        D.read_idx(tmp_path / "absent")
    cut = write(tmp_path / "cut.gz", gzip.compress(LABELS)[:-8])
    with pytest.raises(D.DataError, match="broken gzip data"):
        D.read_idx(cut)


@pytest.mark.parametrize("flatten", [False, True])
@pytest.mark.parametrize("source", ["idx", "idx.gz", "npz"])
def test_load_mnist_round_trip(tmp_path, source, flatten):
    arrays = fake_mnist(np.random.default_rng(1))
    if source == "npz":
        path = tmp_path / "mnist.npz"
        np.savez(path, **dict(zip(D.NPZ_KEYS, arrays)))
    else:
        path = write_mnist_dir(tmp_path, arrays, gz=source.endswith("gz"))
    got = D.load_mnist(path, dtype=np.float64, flatten=flatten)
    for image_or_label, (g, a) in enumerate(zip(got, arrays)):
        if image_or_label % 2 == 0:
            assert g.dtype == np.float64
            assert g.shape == ((len(a), 784) if flatten else (len(a), 1, 28, 28))
            np.testing.assert_allclose(g.reshape(a.shape), a / 255.0, rtol=1e-15)
        else:
            assert g.dtype == np.int64
            np.testing.assert_array_equal(g, a)


def test_load_mnist_default_dtype_and_range(tmp_path):
    x_train = D.load_mnist(write_mnist_dir(tmp_path, fake_mnist(np.random.default_rng(2)), gz=True))[0]
    assert x_train.dtype == np.float32 and x_train.min() >= 0 and x_train.max() <= 1


def _short_labels(tmp_path, arrays):
    """Training labels one short of the images."""
    d = write_mnist_dir(tmp_path, arrays, gz=False)
    write(d / "train-labels-idx1-ubyte", idx_bytes(arrays[1][:-1]))
    return d


def _images_as_labels(tmp_path, arrays):
    d = write_mnist_dir(tmp_path, arrays, gz=False)
    write(d / "t10k-images-idx3-ubyte", idx_bytes(arrays[3]))
    return d


def _missing_file(tmp_path, arrays):
    d = write_mnist_dir(tmp_path, arrays, gz=True)
    (d / "t10k-labels-idx1-ubyte.gz").unlink()
    return d


def _npz(**overrides):
    def make(tmp_path, arrays):
        content = dict(zip(D.NPZ_KEYS, arrays))
        content.update(overrides)
        content = {k: v for k, v in content.items() if v is not None}
        np.savez(tmp_path / "m.npz", **content)
        return tmp_path / "m.npz"
    return make


# (how to spoil a data set, the message's key words)
BAD_MNIST = [
    (lambda tmp_path, arrays: tmp_path / "nowhere", "no such file or directory"),
    (_missing_file, r"t10k-labels-idx1-ubyte: no such file \(nor with .gz\)"),
    (_short_labels, r"label/image count mismatch \(5 labels of shape \(5,\) for 6 images\)"),
    (_images_as_labels, "wrong magic number 0x00000801, expected 0x00000803"),
    (_npz(y_test=None), "missing npz key"),
    (_npz(y_train=np.zeros(3, np.uint8)), "label/image count mismatch"),
    (_npz(x_test=np.zeros((5, 784), np.uint8)), r"images must have shape \(N, H, W\)"),
    (_npz(x_test=np.full((5, 28, 28), 255.0)), r"float images must lie in \[0, 1\]"),
    (lambda tmp_path, arrays: write(tmp_path / "m.npz", b"not a zip"), "not a readable .npz"),
    (_npz(y_train=np.array([0, 1, -1, 2, 3, 4])), r"m.npz\[y_train\]: labels must be >= 0, got -1"),
    (_npz(y_test=np.array(list("01234"))), r"\[y_test\]: labels must be integer class indices, got dtype <U1"),
    (_npz(y_test=np.arange(5.0)), "labels must be integer class indices, got dtype float64"),
    (_npz(y_test=np.arange(5).astype(object)), r"m.npz\[y_test\]: unreadable array \(Object arrays"),
    (_npz(x_train=np.zeros((6, 28, 0), np.uint8)), r"m.npz\[x_train\]: images of 28x0 pixels"),
    (_npz(x_test=np.full((5, 28, 28), "7")), r"m.npz\[x_test\]: images must be numbers.*got dtype <U1"),
    (_npz(x_test=np.zeros((5, 20, 20), np.uint8)),
     r"m.npz\[x_train\] has 28x28 images but .*m.npz\[x_test\] has 20x20"),
    (_npz(y_train=np.array([0, 1, 2, 10 ** 12, 3, 4])),
     r"m.npz\[y_train\]: labels must be < 65,536 .*got 1000000000000"),
    (_npz(y_test=np.array([0, 1, 2, 2 ** 63, 3], np.uint64)), r"labels must be < 65,536 .*got 9223372036854775808"),
    (lambda tmp_path, arrays: _idx_dir_with(tmp_path, arrays, 0, np.zeros((6, 28, 0), np.uint8)),
     r"train-images-idx3-ubyte: images of 28x0 pixels"),
    (lambda tmp_path, arrays: _idx_dir_with(tmp_path, arrays, 2, np.zeros((5, 20, 20), np.uint8)),
     r"train-images-idx3-ubyte has 28x28 images but .*t10k-images-idx3-ubyte has 20x20"),
    (lambda tmp_path, arrays: _idx_dir_with(tmp_path, arrays, 1, np.array([1, 2, 3, 4, 5, 10 ** 6], np.int32)),
     r"train-labels-idx1-ubyte: wrong magic number 0x00000c01"),
]


def _idx_dir_with(tmp_path, arrays, index, replacement):
    """An IDX folder whose ``index``-th file (x_train, y_train, x_test, y_test) holds ``replacement``."""
    arrays = list(arrays)
    code = {np.dtype(np.uint8): 0x08, np.dtype(np.int32): 0x0C}[replacement.dtype]
    d = write_mnist_dir(tmp_path, arrays, gz=False)
    name = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
            "t10k-labels-idx1-ubyte")[index]
    write(d / name, idx_bytes(replacement, code))
    return d


@pytest.mark.parametrize("spoil,message", BAD_MNIST, ids=[m[:30] for _, m in BAD_MNIST])
def test_load_mnist_rejects_bad_data(tmp_path, spoil, message):
    path = spoil(tmp_path, fake_mnist(np.random.default_rng(3), n_train=6, n_test=5))
    with pytest.raises(D.DataError, match=message) as e:
        D.load_mnist(path)
    assert "\n" not in str(e.value)


def test_data_error_is_a_value_error():
    assert issubclass(D.DataError, ValueError)


@pytest.mark.parametrize("test_fraction,seed", [(0.2, 0), (0.2, 1), (0.5, 7)])
def test_digits_split(test_fraction, seed):
    x_tr, y_tr, x_te, y_te = D.load_digits(test_fraction, seed)
    assert x_tr.shape[1:] == (1, 8, 8) and x_tr.dtype == np.float32 and y_tr.dtype == np.int64
    assert len(x_tr) + len(x_te) == 1797
    assert len(x_te) == pytest.approx(test_fraction * 1797, abs=10)  # rounding per class
    assert x_tr.min() >= 0 and x_tr.max() <= 1 and x_tr.max() == 1  # pixel 16 -> 1
    # disjoint: no image of the test set appears in the training set (the digits have no duplicates)
    train_rows = {row.tobytes() for row in x_tr.reshape(len(x_tr), -1)}
    assert len(train_rows) == len(x_tr)
    assert not any(row.tobytes() in train_rows for row in x_te.reshape(len(x_te), -1))
    # stratified: every class keeps its share in the test set
    counts = np.bincount(np.concatenate([y_tr, y_te]), minlength=10)
    np.testing.assert_allclose(np.bincount(y_te, minlength=10), test_fraction * counts, atol=0.5)
    again = D.load_digits(test_fraction, seed)
    for a, b in zip((x_tr, y_tr, x_te, y_te), again):
        np.testing.assert_array_equal(a, b)


def test_digits_seed_changes_split_and_flatten_matches_reshape():
    a, b = D.load_digits(seed=0), D.load_digits(seed=1)
    assert not np.array_equal(a[1], b[1])
    flat = D.load_digits(seed=0, dtype=np.float64, flatten=True)
    assert flat[0].shape == (len(a[0]), 64) and flat[0].dtype == np.float64
    np.testing.assert_allclose(flat[0], a[0].reshape(len(a[0]), -1), rtol=1e-7)


@pytest.mark.parametrize("fraction", [0, 1, -0.1, 1.5])
def test_digits_rejects_bad_fraction(fraction):
    with pytest.raises(ValueError, match="test_fraction"):
        D.load_digits(fraction)


@pytest.mark.parametrize("n,batch_size,drop_last", [(10, 3, False), (10, 3, True), (9, 3, False),
                                                    (5, 8, False), (5, 8, True), (1, 1, False)])
def test_batches_cover_a_permutation(n, batch_size, drop_last):
    x = np.arange(n * 2, dtype=np.float32).reshape(n, 2)
    y = np.arange(n) * 10
    got = list(D.batches(x, y, batch_size, np.random.default_rng(0), drop_last=drop_last))
    sizes = [len(bx) for bx, _ in got]
    full, rest = divmod(n, batch_size)
    assert sizes == [batch_size] * full + ([rest] if rest and not drop_last else [])
    seen = np.concatenate([by for _, by in got]) // 10 if got else np.array([], int)
    for bx, by in got:
        np.testing.assert_array_equal(bx, x[by // 10])  # pairs stay together
    assert len(set(seen)) == len(seen)  # no sample twice in an epoch
    if not drop_last:
        assert sorted(seen) == list(range(n))


def test_batches_shuffle_by_rng():
    x, y = np.zeros((50, 1)), np.arange(50)
    def order(seed):
        return np.concatenate([b for _, b in D.batches(x, y, 7, seed)])
    np.testing.assert_array_equal(order(3), order(3))
    assert not np.array_equal(order(3), order(4))
    assert not np.array_equal(order(3), y)


@pytest.mark.parametrize("x,y,batch_size,message", [
    (np.zeros((4, 2)), np.zeros(3), 2, "same length"),
    (np.zeros((4, 2)), np.zeros(4), 0, "batch_size"),
    (np.zeros((4, 2)), np.zeros(4), 2.0, "batch_size"),
    (np.zeros((4, 2)), np.zeros(4), True, "batch_size"),
])
def test_batches_reject_bad_arguments(x, y, batch_size, message):
    with pytest.raises(ValueError, match=message):
        next(D.batches(x, y, batch_size, 0))


def test_batches_keep_cupy_arrays_on_the_gpu():
    cupy = pytest.importorskip("cupy")
    x, y = cupy.arange(20).reshape(10, 2), cupy.arange(10)
    got = list(D.batches(x, y, 4, 0))
    assert all(isinstance(bx, cupy.ndarray) and isinstance(by, cupy.ndarray) for bx, by in got)
    assert sorted(cupy.asnumpy(cupy.concatenate([by for _, by in got])).tolist()) == list(range(10))
