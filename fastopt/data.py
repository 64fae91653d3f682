"""Data sets for the training scripts, and a minibatch iterator.

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
import gzip
import os
import zipfile

import numpy as np

from .nn._array import array_module

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


def _read_bytes(path):
    """The file's bytes, un-gzipped when it starts with the gzip magic (whatever its name)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file")
    with open(path, "rb") as f:
        data = f.read()
    if data[:2] == GZIP_MAGIC:
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as e:  # EOFError: the gzip stream itself is cut short
            raise DataError(f"{path}: broken gzip data ({e})") from None
    return data


def read_idx(path, magic=None):
    """Parse one IDX file (raw or gzipped, told apart by the bytes 1f 8b).

    Layout: a big-endian 32-bit magic ``0x0000TTDD`` (TT the type code, see ``IDX_DTYPES``;
    DD the number of dimensions), DD big-endian 32-bit sizes, then the data, row-major.
    Returns the data with its own dtype (native byte order) and shape. ``magic``, if given,
    is the magic number the file must have (e.g. ``IMAGES_MAGIC``).
    """
    data = _read_bytes(path)
    if len(data) < 4:
        raise DataError(f"{path}: truncated header (expected at least 4 bytes, got {len(data)})")
    found = int.from_bytes(data[:4], "big")
    code, ndim = data[2], data[3]
    if data[:2] != b"\0\0" or code not in IDX_DTYPES:
        raise DataError(f"{path}: wrong magic number 0x{found:08x}; not an IDX file "
                        f"(expected 0x0000TTDD with type code TT in {sorted(IDX_DTYPES)})")
    if magic is not None and found != magic:
        raise DataError(f"{path}: wrong magic number 0x{found:08x}, expected 0x{magic:08x}")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{path}: truncated header (expected {header} bytes, got {len(data)})")
    shape = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(IDX_DTYPES[code])
    expected = header + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) < expected:
        raise DataError(f"{path}: truncated (expected {expected} bytes for shape {shape}, "
                        f"got {len(data)})")
    if len(data) > expected:
        raise DataError(f"{path}: {len(data) - expected} bytes of trailing garbage "
                        f"(expected {expected} bytes for shape {shape}, got {len(data)})")
    array = np.frombuffer(data, dtype, offset=header).reshape(shape)
    return array.astype(dtype.newbyteorder("="))  # a writeable copy in native byte order


def _images(x, source, dtype, flatten):
    """(N, H, W) or (N, 1, H, W) pixels -> (N, 1, H, W) or (N, H*W) in [0, 1]."""
    if x.ndim == 3:
        x = x[:, None]
    if x.ndim != 4 or x.shape[1] != 1:
        raise DataError(f"{source}: images must have shape (N, H, W) or (N, 1, H, W), got {x.shape}")
    if np.issubdtype(x.dtype, np.integer):
        x = x.astype(dtype) / dtype.type(255)
    else:
        x = x.astype(dtype)
        if x.size and not (0 <= x.min() and x.max() <= 1):
            raise DataError(f"{source}: float images must lie in [0, 1], "
                            f"got values in [{x.min()}, {x.max()}]")
    return x.reshape(len(x), -1) if flatten else x


def _labels(y, source, count):
    """Class labels as int64; a class index must be an integer >= 0 (a negative one would
    index the logits from the end, and text or floats are no class index)."""
    if y.ndim != 1 or len(y) != count:
        raise DataError(f"{source}: label/image count mismatch "
                        f"({len(y) if y.ndim else 0} labels of shape {y.shape} for {count} images)")
    if not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{source}: labels must be integer class indices, got dtype {y.dtype}")
    if y.size and y.min() < 0:
        raise DataError(f"{source}: labels must be >= 0, got {y.min()}")
    return y.astype(np.int64)


def _npz_array(npz, key, path):
    try:
        return npz[key]
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:  # ValueError: an object (pickled) array
        raise DataError(f"{path}[{key}]: unreadable array ({e})") from None


def _mnist_file(directory, name):
    for candidate in (name, name.replace("-idx", ".idx")):
        for suffix in ("", ".gz"):
            path = os.path.join(directory, candidate + suffix)
            if os.path.isfile(path):
                return path
    raise DataError(f"{os.path.join(directory, name)}: no such file (nor with .gz)")


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
        out = []
        for split, (images, labels) in MNIST_FILES.items():
            x_path, y_path = _mnist_file(path, images), _mnist_file(path, labels)
            x = _images(read_idx(x_path, IMAGES_MAGIC), x_path, dtype, flatten)
            out += [x, _labels(read_idx(y_path, LABELS_MAGIC), y_path, len(x))]
        return tuple(out)
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file or directory")
    try:
        npz = np.load(path, allow_pickle=False)
    except Exception as e:  # zipfile, pickle and format errors all mean "not our file"
        raise DataError(f"{path}: not a readable .npz file ({e})") from None
    with npz:
        missing = [k for k in NPZ_KEYS if k not in npz.files]
        if missing:
            raise DataError(f"{path}: missing npz key(s) {', '.join(missing)} "
                            f"(has {', '.join(npz.files) or 'none'})")
        out = []
        for split in ("train", "test"):
            source = f"{path}[x_{split}]"
            x = _images(_npz_array(npz, f"x_{split}", path), source, dtype, flatten)
            out += [x, _labels(_npz_array(npz, f"y_{split}", path), f"{path}[y_{split}]", len(x))]
    return tuple(out)


def stratified_split(y, test_fraction, rng):
    """(train_idx, test_idx): within each class, a ``rng`` shuffle puts
    ``round(test_fraction * class_size)`` samples in the test set. Both come shuffled."""
    train, test = [], []
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        n_test = int(round(test_fraction * len(idx)))
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
