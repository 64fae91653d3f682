"""Backends for the tests: "cpu" always; "cuda" on a real GPU, or on Numba's CUDA simulator.

The simulator is chosen when Numba is imported (NUMBA_ENABLE_CUDASIM=1), so it is a
per-process choice: a plain `pytest` run executes the CPU tests in this process, and
`tests/test_cuda_simulator.py` runs every `cuda`-marked test again in a child process with
the simulator on, and fails with the child's report if any of them fails.
"""
import os

import numpy as np
import pytest

SIMULATOR = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"


def _gpu_present():
    try:
        from numba import cuda
        return cuda.is_available()
    except Exception:
        return False


CUDA = SIMULATOR or _gpu_present()


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: runs on a CUDA device (a real GPU or the simulator)")


def pytest_collection_modifyitems(config, items):
    if CUDA:
        return
    skip = pytest.mark.skip(reason="no GPU here: test_cuda_simulator.py runs this on the CUDA simulator")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


BACKENDS = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


def to_backend(x, backend):
    if backend == "cpu":
        return np.array(x)
    from numba import cuda
    return cuda.to_device(np.ascontiguousarray(x))


def to_host(x):
    return x if isinstance(x, np.ndarray) else x.copy_to_host()
