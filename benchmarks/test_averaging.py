"""Weight averaging at 1e5 and 1e7 float32 parameters: ``EMA.update()`` and
``PolyakAverage.update()`` on a ParamBuffer (one fused pass, 12 B per parameter) vs the best
in-place NumPy form (three passes through a preallocated temporary), torch's
``_foreach_lerp_`` (what ``torch.optim.swa_utils.get_ema_multi_avg_fn`` runs), and the roof
kernel moving the same 12 B per parameter. Run: ``pytest benchmarks/test_averaging.py``."""
import numpy as np
import pytest

import fastopt
from fastopt.averaging import EMA, PolyakAverage
from fastopt.kernels import _dispatch
from test_rules import ROOF

SIZES = [10**5, 10**7]
DECAY = 0.999
ROUNDS = {10**5: 200, 10**7: 10}


@pytest.mark.parametrize("n", SIZES, ids=lambda n: f"{n:.0e}")
@pytest.mark.parametrize("impl", ["fastopt", "roof", "numpy", "torch_foreach"])
@pytest.mark.parametrize("rule", ["ema", "polyak"])
def test_update(record, rule, impl, n):
    rng = np.random.default_rng(0)
    buf = fastopt.ParamBuffer([rng.standard_normal(n).astype(np.float32)])
    p = buf.params[0]
    nbytes = 12 * n  # read the average and the params, write the average
    if impl == "fastopt":
        run = (EMA(buf, decay=DECAY) if rule == "ema" else PolyakAverage(buf)).update
    elif impl == "roof":
        kernel = ROOF.cpu(parallel=buf.arena.size >= _dispatch.PARALLEL_THRESHOLD)
        avg = buf.arena.copy()
        one = np.float32(1)

        def run():
            kernel(avg, buf.arena, None, None, None, None, (one, None))
    elif impl == "numpy":
        avg, tmp = p.copy(), np.empty_like(p)
        t = [0]
        if rule == "ema":
            d, e = np.float32(DECAY), np.float32(1 - DECAY)

            def run():  # avg = d * avg + e * p, without allocating
                np.multiply(p, e, out=tmp)
                np.multiply(avg, d, out=avg)
                np.add(avg, tmp, out=avg)
        else:
            def run():  # avg += (p - avg) / (t + 1)
                t[0] += 1
                np.subtract(p, avg, out=tmp)
                np.multiply(tmp, np.float32(1 / (t[0] + 1)), out=tmp)
                np.add(avg, tmp, out=avg)
    else:
        torch = pytest.importorskip("torch", reason="torch not installed")
        import numba
        torch.set_num_threads(numba.get_num_threads())
        tp, tavg = [torch.from_numpy(p)], [torch.from_numpy(p.copy())]
        t = [0]

        def run():
            t[0] += 1
            torch._foreach_lerp_(tavg, tp, 1 - DECAY if rule == "ema" else 1 / (t[0] + 1))
    record(rule, n, impl, run, nbytes, ROUNDS[n] if impl != "numpy" else max(3, ROUNDS[n] // 4))
