"""CPU kernels are cached on disk: a second process compiles nothing (the element-wise
update, the norm pass of the guard and clipping, LAMB's layer passes). Numba would key a
generated kernel's cache on a pickle of its closure and compile anew in every process; the
engine keys it on the rule's sources instead (``_engine._enable_cache``)."""
import json
import os
import subprocess
import sys

SCRIPT = """
import json
import numpy as np
import fastopt
from fastopt.kernels import RULES, _reduce, lamb
buf = fastopt.ParamBuffer([np.ones(100, np.float32), np.ones(7, np.float32)])
buf.grad_arena[:] = 0.5
fastopt.Adam(buf, max_grad_norm=1.0).step()
fastopt.LAMB([np.ones(9)], lr=1e-3).step([np.full(9, 0.5)])
kernels = {"adam": RULES["adam"][0].kernels.cpu(False),
           "norm": _reduce.NORM[_reduce.SQUARES].layers_cpu(False),
           "lamb": lamb.LAMB.kernels.layers_cpu(False), "lamb_first": lamb.LAMB.first_kernels.layers_cpu(False)}
print(json.dumps({k: [sum(d.stats.cache_hits.values()), sum(d.stats.cache_misses.values())]
                  for k, d in kernels.items()}))
"""


def test_a_second_process_compiles_nothing(tmp_path):
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path), "NUMBA_ENABLE_CUDASIM": "0"}
    runs = []
    for _ in range(2):
        out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=600)
        assert out.returncode == 0, out.stderr
        runs.append(json.loads(out.stdout.splitlines()[-1]))
    first, second = runs
    assert all(misses >= 1 for _, misses in first.values()), first  # the first one compiled each
    assert all(hits >= 1 and misses == 0 for hits, misses in second.values()), second
