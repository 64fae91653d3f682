"""Serial vs parallel CPU Adam by size: where the thread pool starts to pay
(fastopt._dispatch.PARALLEL_THRESHOLD, settable with FASTOPT_PARALLEL_THRESHOLD)."""
import numpy as np
import pytest

from fastopt._dispatch import cast_scalars
from fastopt.kernels import adam

SIZES = [2**k for k in range(10, 21, 2)]


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("parallel", [False, True], ids=["serial", "parallel"])
def test_adam_threshold(record, n, parallel):
    p, g, m, v = (np.ones(n, np.float32) for _ in range(4))
    c = cast_scalars(adam.scalars(step=1, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                                  amsgrad=False, maximize=False), p.dtype)
    kernel = adam.KERNELS.cpu(parallel)
    record("adam-thr", n, "fastopt" if parallel else "serial", lambda: kernel(p, g, m, v, None, c),
           28 * n, 2000 if n < 2**18 else 200)
