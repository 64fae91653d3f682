"""Serial vs parallel CPU Adam by size: where the thread pool starts to pay
(fastopt.kernels._dispatch.PARALLEL_THRESHOLD, settable with FASTOPT_PARALLEL_THRESHOLD)."""
import numpy as np
import pytest

from fastopt.kernels import adam

SIZES = [2**k for k in range(10, 21, 2)]


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("parallel", [False, True], ids=["serial", "parallel"])
def test_adam_threshold(record, n, parallel):
    p, g, m, v = (np.ones(n, np.float32) for _ in range(4))
    c = adam.ADAM.kernel_scalars(adam.ADAM.defaults, 1, 1e-3, p.dtype)
    kernel = adam.ADAM.kernels.cpu(parallel)
    record("adam-thr", n, "fastopt" if parallel else "serial", lambda: kernel(p, g, m, v, None, None, c),
           28 * n, 2000 if n < 2**18 else 200)
