"""What every run of the application sets up the same way, written once for ``train``,
``compare`` and the full-batch runs: the device, the thread pools, the data set (standardized
with the training split's statistics), and models built from the seed with their optimizers.

    device, data = open_run(cfg, log)                 # logs the device; data on the host
    model, opt, ema = build(cfg, data, device, steps_per_epoch(cfg, data))
"""
import contextlib
import os
from dataclasses import dataclass

import numpy as np

from ..preprocessing import Standardize
from .config import UsageError
from .data import DataError, load_digits, load_mnist
from .recipes import build_model, make_optimizer, storage_dtype

DIGITS_SPLIT_SEED = 0  # one fixed train/test split: runs with different --seed see the same test set


# -- device and threads -------------------------------------------------------------------------
def resolve_device(requested):
    """``(device, description)``: "auto" is "cuda" when CuPy imports and sees a GPU, else "cpu"."""
    if requested not in ("auto", "cpu", "cuda"):
        raise UsageError(f"--device must be auto, cpu or cuda, got {requested!r}")
    if requested == "cpu":
        return "cpu", "cpu (as asked)"
    try:
        import cupy
        count = cupy.cuda.runtime.getDeviceCount()
    except ImportError:
        why = "CuPy is not installed"
    except Exception as e:  # no driver, no device: CuPy raises its own runtime errors
        why = f"CuPy sees no GPU ({type(e).__name__})"
    else:
        if count > 0:
            name = cupy.cuda.runtime.getDeviceProperties(0)["name"]
            name = name.decode() if isinstance(name, bytes) else name
            return "cuda", f"cuda ({name}, CuPy {cupy.__version__}{', auto' if requested == 'auto' else ''})"
        why = "CuPy sees no GPU"
    if requested == "cuda":
        raise UsageError(f"--device cuda: {why} (in the fastopt checkout, on a machine with a GPU: "
                         'pip install -e ".[cuda]")')
    return "cpu", f"cpu (auto: {why})"


@contextlib.contextmanager
def kernel_threads(n):
    """Run fastopt's CPU kernels on ``n`` Numba threads inside the block (at most Numba's pool).

    Why not all cores: in training, NumPy's BLAS (the matrix products) keeps its own threads,
    which spin between calls. Two spinning pools on the same cores made whole epochs many times
    slower on a 2-core machine (28x28 inputs, where the optimizer's kernels go parallel; the
    README's "Threads" table has the figures);
    one kernel thread costs little, the update being a small share of a step."""
    import numba
    before = numba.get_num_threads()
    numba.set_num_threads(max(1, min(int(n), numba.config.NUMBA_NUM_THREADS)))
    try:
        yield
    finally:
        numba.set_num_threads(before)


@contextlib.contextmanager
def thread_limits(n):
    """NumPy's BLAS (through threadpoolctl) and fastopt's Numba kernels both on ``n`` threads
    inside the block, chosen together: each pool alone would take every core, and pools
    that spin on the same cores slow each other down many times over."""
    from threadpoolctl import threadpool_limits
    with kernel_threads(n), threadpool_limits(limits=max(1, int(n)), user_api="blas"):
        yield


# -- data -----------------------------------------------------------------------------------------
@dataclass
class Dataset:
    name: str
    x_train: object
    y_train: object
    x_test: object
    y_test: object
    n_classes: int

    @property
    def in_shape(self):
        return tuple(self.x_train.shape[1:])

    def to(self, device):
        """The same data on ``device`` (one transfer per array)."""
        if device == "cpu":
            return self
        import cupy
        arrays = [cupy.asarray(a) for a in (self.x_train, self.y_train, self.x_test, self.y_test)]
        return Dataset(self.name, *arrays, self.n_classes)


def load_dataset(path=None, limit=None, dtype=np.float32):
    """The digits (``path`` None) or MNIST from ``path``, images (N, 1, H, W) standardized per
    channel with the training split's mean and std, at most ``limit`` examples per split."""
    if path is None:
        name, (xtr, ytr, xte, yte) = "digits", load_digits(seed=DIGITS_SPLIT_SEED, dtype=dtype)
    else:
        name, (xtr, ytr, xte, yte) = f"mnist:{path}", load_mnist(os.path.expanduser(path), dtype=dtype)
    if limit is not None:
        xtr, ytr, xte, yte = xtr[:limit], ytr[:limit], xte[:limit], yte[:limit]
    if len(xtr) == 0 or len(xte) == 0:
        raise DataError(f"{path or 'digits'}: the train or test split is empty")
    scaler = Standardize(axis=(0, 2, 3)).fit(xtr)
    xtr, xte = scaler.transform(xtr).astype(dtype, copy=False), scaler.transform(xte).astype(dtype, copy=False)
    n_classes = int(max(ytr.max(), yte.max())) + 1
    return Dataset(name, np.ascontiguousarray(xtr), ytr, np.ascontiguousarray(xte), yte, n_classes)


# -- a run --------------------------------------------------------------------------------------
def open_run(cfg, log):
    """``(device, data)`` of a run: the device chosen (and logged) and the data set loaded on
    the host in ``cfg.dtype`` (``data.to(device)`` once every setting has been checked)."""
    device, about = resolve_device(cfg.device)
    log(f"device: {about}")
    return device, load_dataset(cfg.data, cfg.limit, np.dtype(cfg.dtype))


def describe_data(data):
    return (f"{data.name}, {len(data.x_train):,} train / {len(data.x_test):,} test images of shape {data.in_shape}, "
            f"{data.n_classes} classes")


def steps_per_epoch(cfg, data):
    return -(-len(data.x_train) // cfg.batch_size)


def build(cfg, data, device, steps, name=None, strict=True):
    """``(model, optimizer, ema)``: model ``cfg.model`` for ``data`` with the initial weights
    of ``cfg.seed`` (every call: the same weights), and optimizer ``name`` (default
    ``cfg.optimizer``) over it, its schedule laid over ``cfg.epochs`` epochs of ``steps``."""
    model = build_model(cfg.model, data.in_shape, data.n_classes, np.dtype(cfg.dtype), device, cfg.seed,
                        storage_dtype(cfg))
    opt, ema = make_optimizer(cfg, model, steps, name=name, strict=strict)
    return model, opt, ema
