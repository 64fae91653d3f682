"""Data sets for the training application, and a minibatch iterator.

Every loader returns ``(x_train, y_train, x_test, y_test)``: images as (N, 1, H, W) in
``dtype`` with pixels scaled to [0, 1], labels as int64. ``flatten=True`` gives the images
as (N, H*W) instead, the input of an MLP (same as ``x.reshape(len(x), -1)``).

    load_digits()      scikit-learn's bundled 8x8 digits (1,797 images, no download),
                       pixel / 16, split by class with a fixed seed
    load_mnist(path)   MNIST from its four IDX files (raw or gzipped) or Keras' mnist.npz,
                       pixel / 255
    read_idx(path)     one IDX file as an array of its own dtype and shape
    batches(...)       shuffled minibatches of NumPy or CuPy arrays

Bad files raise :class:`DataError` (a ValueError) with one line naming the file.
"""
import codecs
import gzip
import math
import os
import zipfile
import zlib

import numpy as np

from ..nn._array import array_module

# IDX type code -> big-endian dtype of the data (http://yann.lecun.com/exdb/mnist/)
IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
IMAGES_MAGIC = 0x00000803  # ubyte, 3 dims (count, rows, columns)
LABELS_MAGIC = 0x00000801  # ubyte, 1 dim (count)
GZIP_MAGIC = b"\x1f\x8b"

# split -> (images, labels); each file may also end in .gz, and some mirrors write
# "train-images.idx3-ubyte" with a dot
MNIST_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
               "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")


class DataError(ValueError):
    """A data file is missing or malformed; the message names the file and the fault."""


CHUNK = 1 << 20  # bytes per read: a file is read in pieces, never by one read of a size its header claims
# no MNIST-format array comes near this; a header that declares more is corrupt, not data
MAX_ARRAY_BYTES = 1 << 36
MAX_TRAILING = CHUNK  # trailing garbage is counted up to here, then reported as "more than"
# one logit per class: a label of 10**12 would make a 10**12-wide last layer
MAX_CLASSES = 1 << 16
INT64_MAX = np.iinfo(np.int64).max
ZIP_MAGIC = b"PK"
NPY_MAGIC = b"\x93NUMPY"
DATA_HINT = ("--data takes a folder holding the four MNIST IDX files (raw or .gz) or an .npz with "
             "x_train, y_train, x_test, y_test")


def _open(path):
    """The file opened for reading, through gzip when it starts with the gzip magic (whatever its
    name); read it with :func:`_read` so that every failure is a DataError."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file")
    with open(path, "rb") as f:
        gz = f.read(2) == GZIP_MAGIC
    return gzip.open(path, "rb") if gz else open(path, "rb")


def _read(f, n, path):
    """Up to ``n`` bytes of ``f`` (fewer at its end) in a bytearray, read in CHUNKs: the memory
    grows with the bytes really there, not with a size a header declares."""
    buf = bytearray()
    try:
        while len(buf) < n:
            chunk = f.read(min(CHUNK, n - len(buf)))
            if not chunk:
                break
            buf += chunk
    except (OSError, EOFError, zlib.error) as e:  # EOFError: the gzip stream itself is cut short
        raise DataError(f"{path}: broken gzip data ({e})") from None
    return buf


def _trailing(f, path):
    """The bytes left in ``f``, counted without keeping them; above MAX_TRAILING, the words
    "more than MAX_TRAILING" (a gzip bomb is not decompressed to the end)."""
    left = len(_read(f, MAX_TRAILING + 1, path))
    return f"more than {MAX_TRAILING:,}" if left > MAX_TRAILING else f"{left}"


def read_idx(path, magic=None):
    """Parse one IDX file (raw or gzipped, told apart by the bytes 1f 8b).

    Layout: a big-endian 32-bit magic ``0x0000TTDD`` (TT the type code, see ``IDX_DTYPES``;
    DD the number of dimensions), DD big-endian 32-bit sizes, then the data, row-major.
    Returns the data with its own dtype (native byte order) and shape. ``magic``, if given,
    is the magic number the file must have (e.g. ``IMAGES_MAGIC``). The declared size is
    checked against MAX_ARRAY_BYTES and against the bytes really in the (decompressed) file
    before the data is kept: memory stays near the data's real size.
    """
    with _open(path) as f:
        head = _read(f, 4, path)
        if len(head) < 4:
            raise DataError(f"{path}: truncated header (expected at least 4 bytes, got {len(head)})")
        found = int.from_bytes(head, "big")
        code, ndim = head[2], head[3]
        if head[:2] != b"\0\0" or code not in IDX_DTYPES:
            raise DataError(f"{path}: wrong magic number 0x{found:08x}; not an IDX file "
                            f"(expected 0x0000TTDD with type code TT in {sorted(IDX_DTYPES)})")
        if magic is not None and found != magic:
            raise DataError(f"{path}: wrong magic number 0x{found:08x}, expected 0x{magic:08x}")
        header = 4 + 4 * ndim
        dims = _read(f, 4 * ndim, path)
        if len(dims) < 4 * ndim:
            raise DataError(f"{path}: truncated header (expected {header} bytes, got {4 + len(dims)})")
        shape = tuple(int.from_bytes(dims[4 * i:4 + 4 * i], "big") for i in range(ndim))
        dtype = np.dtype(IDX_DTYPES[code])
        nbytes = _declared_bytes(shape, dtype, path)
        data = _read(f, nbytes, path)
        if len(data) < nbytes:
            raise DataError(f"{path}: truncated (expected {header + nbytes} bytes for shape {shape}, "
                            f"got {header + len(data)})")
        extra = _trailing(f, path)
        if extra != "0":
            raise DataError(f"{path}: {extra} bytes of trailing garbage (expected {header + nbytes} bytes "
                            f"for shape {shape})")
    # the bytearray is ours and writeable: swap it in place instead of copying it
    array = np.frombuffer(data, dtype).reshape(shape)
    if not dtype.isnative:
        array = array.byteswap(inplace=True).view(dtype.newbyteorder("="))
    return array


def _declared_bytes(shape, dtype, source):
    """The bytes an array of ``shape`` and ``dtype`` needs (exact: Python integers), refused
    when the header's numbers cannot describe real data."""
    count = math.prod(shape)
    if count > INT64_MAX:
        raise DataError(f"{source}: the header's dimensions {shape} overflow int64 (product {count:.3e}): "
                        "a corrupt header")
    nbytes = count * dtype.itemsize
    if nbytes > MAX_ARRAY_BYTES:
        raise DataError(f"{source}: the header declares shape {shape} of {dtype.name}, {nbytes:,} bytes, "
                        f"more than the {MAX_ARRAY_BYTES:,} bytes fastopt accepts per array")
    return nbytes


def _images(x, source, dtype, flatten):
    """(N, H, W) or (N, 1, H, W) pixels -> (N, 1, H, W) or (N, H*W) in [0, 1]."""
    _check_image_dtype(x.dtype, source)
    if x.ndim == 3:
        x = x[:, None]
    if x.ndim != 4 or x.shape[1] != 1:
        raise DataError(f"{source}: images must have shape (N, H, W) or (N, 1, H, W), got {x.shape}")
    if 0 in x.shape[2:]:
        raise DataError(f"{source}: images of {x.shape[2]}x{x.shape[3]} pixels (shape {x.shape}); "
                        "an image needs at least 1x1")
    if np.issubdtype(x.dtype, np.integer):
        x = x.astype(dtype) / dtype.type(255)
    else:
        x = x.astype(dtype)
        if x.size and not (x.min() >= 0 and x.max() <= 1):
            raise DataError(f"{source}: float images must lie in [0, 1], "
                            f"got values in [{x.min()}, {x.max()}]")
    return x.reshape(len(x), -1) if flatten else x


def _check_image_dtype(dtype, source):
    if dtype.kind not in "uif":  # text, bytes, booleans, dates: no pixels
        raise DataError(f"{source}: images must be numbers (integer pixels 0-255 or floats in [0, 1]), "
                        f"got dtype {dtype}")


def _check_label_dtype(dtype, source):
    if dtype.kind not in "ui":
        raise DataError(f"{source}: labels must be integer class indices, got dtype {dtype}")


def _labels(y, source, count):
    """Class labels as int64; a class index must be an integer in [0, MAX_CLASSES) (a negative
    one would index the logits from the end, a huge one would size the last layer; text or
    floats are no class index). Checked in the file's own dtype: uint64 2**63 is no -2**63."""
    if y.ndim != 1 or len(y) != count:
        raise DataError(f"{source}: label/image count mismatch "
                        f"({len(y) if y.ndim else 0} labels of shape {y.shape} for {count} images)")
    _check_label_dtype(y.dtype, source)
    if y.size and y.min() < 0:
        raise DataError(f"{source}: labels must be >= 0, got {y.min()}")
    if y.size and y.max() >= MAX_CLASSES:
        raise DataError(f"{source}: labels must be < {MAX_CLASSES:,} (one model output per class), "
                        f"got {y.max()}")
    return y.astype(np.int64)


def _mnist_file(directory, name):
    for candidate in (name, name.replace("-idx", ".idx")):
        for suffix in ("", ".gz"):
            path = os.path.join(directory, candidate + suffix)
            if os.path.isfile(path):
                return path
    raise DataError(f"{os.path.join(directory, name)}: no such file (nor with .gz)")


def _same_image_size(x_train, x_test, train_source, test_source):
    """One model sees both splits: their images must have one size (found now, not after an epoch)."""
    a, b = x_train.shape[1:], x_test.shape[1:]
    if a != b:
        raise DataError(f"{train_source} has {_size(a)} images but {test_source} has {_size(b)}; "
                        "the training and test images must have one size")


def _size(shape):
    return "x".join(map(str, shape[-2:]))


def load_mnist(path, dtype=np.float32, flatten=False):
    """MNIST (or any data set in its format, e.g. Fashion-MNIST) as
    ``(x_train, y_train, x_test, y_test)``: images (N, 1, 28, 28) = pixel / 255 in ``dtype``
    ((N, 784) with ``flatten``), labels int64.

    ``path`` is a directory holding the four IDX files (``MNIST_FILES``, each may end in
    .gz) or an .npz file with the keys ``x_train, y_train, x_test, y_test`` (Keras'
    mnist.npz: uint8 images (N, 28, 28)).
    """
    path, dtype = os.fspath(path), np.dtype(dtype)
    if os.path.isdir(path):
        out, sources = [], []
        for images, labels in MNIST_FILES.values():
            x_path, y_path = _mnist_file(path, images), _mnist_file(path, labels)
            x = _images(read_idx(x_path, IMAGES_MAGIC), x_path, dtype, False)
            out += [x, _labels(read_idx(y_path, LABELS_MAGIC), y_path, len(x))]
            sources.append(x_path)
        _same_image_size(out[0], out[2], *sources)
    elif os.path.isfile(path):
        out = _load_npz(path, dtype)
    else:
        raise DataError(f"{path}: no such file or directory")
    if flatten:
        out[0], out[2] = out[0].reshape(len(out[0]), -1), out[2].reshape(len(out[2]), -1)
    return tuple(out)


def _load_npz(path, dtype):
    """[x_train, y_train, x_test, y_test] from an .npz; only those four members are read, each
    after its .npy header has been checked against the member's real size."""
    with open_npz(path, DATA_HINT) as archive:
        members = npz_members(archive)
        missing = [k for k in NPZ_KEYS if k not in members]
        if missing:
            raise DataError(f"{path}: missing npz key(s) {', '.join(missing)} "
                            f"(has {', '.join(members) or 'none'})")
        out = []
        for split in ("train", "test"):
            x_source, y_source = f"{path}[x_{split}]", f"{path}[y_{split}]"
            x = npz_array(archive, members[f"x_{split}"], x_source, _check_image_dtype)
            x = _images(x, x_source, dtype, False)
            y = npz_array(archive, members[f"y_{split}"], y_source, _check_label_dtype)
            out += [x, _labels(y, y_source, len(x))]
    _same_image_size(out[0], out[2], f"{path}[x_train]", f"{path}[x_test]")
    return out


def open_npz(path, hint):
    """``path`` as an open zipfile.ZipFile, or a DataError saying what the file is instead
    (text, gzip, a .npy...) and ``hint``: what was expected."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            head = f.read(512)
    except OSError as e:
        raise DataError(f"{path}: unreadable ({e.strerror or e})") from None
    if not head.startswith(ZIP_MAGIC):
        raise DataError(f"{path}: not a readable .npz file: {_what_file(head)} ({hint})")
    try:
        return zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
        raise DataError(f"{path}: not a readable .npz file (a broken zip archive: {e}) ({hint})") from None


def npz_members(archive):
    """Array name -> zip member name (numpy.savez stores array ``a`` as ``a.npy``)."""
    return {name.removesuffix(".npy"): name for name in archive.namelist()}


# .npy format version -> its header reader (3.0 is 2.0 with UTF-8 field names)
NPY_HEADERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0,
               (3, 0): np.lib.format.read_array_header_2_0}
ARCHIVE_ERRORS = (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error)


def npz_array(archive, member, source, check_dtype=None):
    """One array of the archive. Its header's dtype goes to ``check_dtype`` and its declared
    size is compared with the member's uncompressed size before anything is allocated."""
    info = archive.getinfo(member)
    try:
        with archive.open(info) as f:
            version = np.lib.format.read_magic(f)
            if version not in NPY_HEADERS:
                raise ValueError(f"unknown .npy format version {version}")
            shape, _, dtype = NPY_HEADERS[version](f)
            data_bytes = info.file_size - f.tell()
    except ARCHIVE_ERRORS as e:
        raise DataError(f"{source}: unreadable array ({e})") from None
    if dtype.hasobject:
        raise DataError(f"{source}: unreadable array (Object arrays need pickle, which fastopt never loads: "
                        "save numbers)")
    if check_dtype is not None:
        check_dtype(dtype, source)
    nbytes = _declared_bytes(shape, dtype, source)
    if nbytes != data_bytes:
        raise DataError(f"{source}: the header declares shape {shape} of {dtype}, {nbytes:,} bytes, "
                        f"but the member holds {data_bytes:,} bytes of data")
    try:
        with archive.open(info) as f:
            return np.lib.format.read_array(f, allow_pickle=False)
    except ARCHIVE_ERRORS as e:
        raise DataError(f"{source}: unreadable array ({e})") from None


def _what_file(head):
    """What a file that is no .npz is, from its first bytes (for the error message)."""
    if head.startswith(GZIP_MAGIC):
        return "it is gzip data (a single .gz file? for IDX files, name the folder that holds all four)"
    if head.startswith(NPY_MAGIC):
        return "it is a .npy file (one array; save the four with numpy.savez)"
    if len(head) >= 4 and head[:2] == b"\0\0" and head[2] in IDX_DTYPES:
        return "it is an IDX file (name the folder that holds all four)"
    if not head:
        return "it is empty"
    try:  # incremental: the 512 bytes may end inside a character
        text = codecs.getincrementaldecoder("utf-8")().decode(head)
    except UnicodeDecodeError:
        text = None
    if text is not None and all(c.isprintable() or c in "\t\r\n" for c in text):
        return "it is a text file"
    return f"it starts with the bytes {head[:8].hex(' ')}, not a zip archive's PK"


def stratified_split(y, test_fraction, rng):
    """(train_idx, test_idx): within each class, a ``rng`` shuffle puts
    ``round(test_fraction * class_size)`` samples in the test set. Both come shuffled."""
    train, test = [], []
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        n_test = round(test_fraction * len(idx))
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return rng.permutation(np.concatenate(train)), rng.permutation(np.concatenate(test))


def load_digits(test_fraction=0.2, seed=0, dtype=np.float32, flatten=False):
    """scikit-learn's 8x8 digits (1,797 images, bundled: no download) as
    ``(x_train, y_train, x_test, y_test)``: images (N, 1, 8, 8) = pixel / 16 in ``dtype``
    ((N, 64) with ``flatten``), labels int64. The split is stratified by class and fixed
    by ``seed``; train and test are disjoint."""
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
    from sklearn.datasets import load_digits as sklearn_digits

    digits = sklearn_digits()
    dtype = np.dtype(dtype)
    x = (digits.images / 16.0).astype(dtype)[:, None]  # pixels are integers 0..16
    if flatten:
        x = x.reshape(len(x), -1)
    y = digits.target.astype(np.int64)
    train, test = stratified_split(y, test_fraction, np.random.default_rng(seed))
    return x[train], y[train], x[test], y[test]


def batches(x, y, batch_size, rng=None, drop_last=False):
    """Yield ``(x[idx], y[idx])`` for consecutive ``batch_size`` slices of one random
    permutation of the samples: one epoch. The permutation comes from ``rng`` (a
    ``np.random.Generator``, or a seed) on the host and is moved to the arrays' module,
    so CuPy arrays stay on the GPU. The last batch is smaller unless ``drop_last``."""
    if len(x) != len(y):
        raise ValueError(f"x and y must have the same length, got {len(x)} and {len(y)}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if not isinstance(rng, np.random.Generator):
        rng = np.random.default_rng(rng)
    xp = array_module(x)
    order = xp.asarray(rng.permutation(len(x)))
    stop = len(x) - len(x) % batch_size if drop_last else len(x)
    for start in range(0, stop, batch_size):
        idx = order[start:start + batch_size]
        yield x[idx], y[idx]
