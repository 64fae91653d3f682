"""Global-norm clipping + Adam on the ~200-tensor, 1e7-param model, fp32, same run:
fastopt fused (one reduction pass, then the update with the clip factor inside the kernel),
fastopt clip_grad_norm_ then Adam (a separate scaling pass), torch clip_grad_norm_ + fused
Adam, and a roof kernel moving the fused step's bytes (read p, g twice, m, v; write p, m, v)."""
import numpy as np
import pytest

import fastopt
from fastopt.kernels import _dispatch
from test_models import MODELS, _arrays
from test_rules import ROOF

MAX_NORM = 1.0


@pytest.mark.parametrize("impl", ["fastopt", "separate", "roof", "torch_fused"])
def test_clip_then_adam(record, impl):
    shapes = MODELS["model-200"]
    n = sum(int(np.prod(s)) for s in shapes)
    nbytes = 4 * n * 8
    if impl == "torch_fused":
        torch = pytest.importorskip("torch", reason="torch not installed")
        import numba
        torch.set_num_threads(numba.get_num_threads())
        params = [torch.from_numpy(a) for a in _arrays(shapes, 0)]
        for p, g in zip(params, _arrays(shapes, 1)):
            p.grad = torch.from_numpy(g)
        opt = torch.optim.Adam(params, lr=1e-3, fused=True)

        def run():
            torch.nn.utils.clip_grad_norm_(params, MAX_NORM)
            opt.step()
    else:
        buf = fastopt.ParamBuffer(_arrays(shapes, 0))
        for g, a in zip(buf.grads, _arrays(shapes, 1)):
            g[...] = a
        if impl == "fastopt":
            run = fastopt.Adam(buf, lr=1e-3, max_grad_norm=MAX_NORM).step
        elif impl == "separate":
            opt = fastopt.Adam(buf, lr=1e-3, nonfinite="propagate")

            def run():
                fastopt.clip_grad_norm_(buf, MAX_NORM)
                opt.step()
        else:
            from fastopt.clip import NormPlan
            kernel = ROOF.cpu(parallel=buf.arena.size >= _dispatch.PARALLEL_THRESHOLD)
            m, v = np.zeros_like(buf.arena), np.zeros_like(buf.arena)
            norms = NormPlan([buf.grad_arena])  # the read of g the guard needs
            one = np.float32(1)

            def run():
                norms.norm()
                kernel(buf.arena, buf.grad_arena, m, v, None, None, (one, None))
    record("clip+adam", n, impl, run, nbytes, 10)
