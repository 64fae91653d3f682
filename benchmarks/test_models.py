"""Whole-model Adam steps, fp32: a transformer-like model of ~200 tensors totalling 1e7
params, and a tiny MLP of ~1.2e3 params in 6 tensors. fastopt on a ParamBuffer (one
launch per step), on a ParamBuffer split in two param groups (decay / no decay), and on
separate arrays, against torch.optim.Adam (fused and foreach) on the same tensors and a
roof kernel moving the same bytes over the arena. The table prints at the end of the run."""
import numpy as np
import pytest

import fastopt
from fastopt.kernels import _dispatch
from test_rules import ROOF


def transformer_shapes(layers=16, width=224, vocab=1000):
    shapes = [(vocab, width)]
    for _ in range(layers):
        shapes += [(width, 3 * width), (3 * width,), (width, width), (width,), (width,), (width,),
                   (width, 4 * width), (4 * width,), (4 * width, width), (width,), (width,), (width,)]
    return [*shapes, (width,), (width,)]


MODELS = {
    "model-200": transformer_shapes(),
    "model-tiny": [(16, 32), (32,), (32, 16), (16,), (16, 8), (8,)],
}
ROUNDS = {"model-200": 10, "model-tiny": 2000}
UNGUARDED = dict(nonfinite="propagate")  # what torch does: no check pass


def _arrays(shapes, seed):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(s).astype(np.float32) for s in shapes]


@pytest.mark.parametrize("impl", ["fastopt", "guarded", "groups", "lists", "roof", "torch_fused", "torch_foreach"])
@pytest.mark.parametrize("model", list(MODELS))
def test_adam_step(record, model, impl):
    shapes = MODELS[model]
    n = sum(int(np.prod(s)) for s in shapes)
    nbytes = 4 * n * 7  # read p, g, m, v; write p, m, v
    if impl in ("fastopt", "guarded", "groups", "roof"):
        buf = fastopt.ParamBuffer(_arrays(shapes, 0))
        for g, a in zip(buf.grads, _arrays(shapes, 1)):
            g[...] = a
        if impl == "roof":
            kernel = ROOF.cpu(parallel=buf.arena.size >= _dispatch.PARALLEL_THRESHOLD)
            m, v = np.zeros_like(buf.arena), np.zeros_like(buf.arena)
            one = np.float32(1)

            def run():
                kernel(buf.arena, buf.grad_arena, m, v, None, None, (one, None))
        else:
            if impl in ("fastopt", "guarded"):
                # "fastopt" has torch's semantics; "guarded" is the default, with the inf/NaN check pass
                opt = fastopt.Adam(buf, lr=1e-3, **({} if impl == "guarded" else UNGUARDED))
            else:  # no weight decay on vectors (biases, norms), as users configure it
                matrices = [p for p in buf.params if p.ndim > 1]
                vectors = [p for p in buf.params if p.ndim == 1]
                opt = fastopt.AdamW([{"params": matrices}, {"params": vectors, "weight_decay": 0.0}], lr=1e-3,
                                    **UNGUARDED)
            run = opt.step
            run()
            launches = opt.launches
            run()
            assert opt.launches - launches == len(opt.param_groups)  # one launch per group per step
    elif impl == "lists":
        params, grads = _arrays(shapes, 0), _arrays(shapes, 1)
        opt = fastopt.Adam(params, lr=1e-3, **UNGUARDED)

        def run():
            opt.step(grads)
    else:
        torch = pytest.importorskip("torch", reason="torch not installed")
        import numba
        torch.set_num_threads(numba.get_num_threads())
        params = [torch.from_numpy(a) for a in _arrays(shapes, 0)]
        for p, g in zip(params, _arrays(shapes, 1)):
            p.grad = torch.from_numpy(g)
        opt = torch.optim.Adam(params, lr=1e-3, **{impl.split("_")[1]: True})
        run = opt.step
    record(model, n, impl, run, nbytes, ROUNDS[model])
