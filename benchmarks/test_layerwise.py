"""LAMB and LARS steps, fp32, on the transformer-like model of ``test_models.py`` (~200
tensors, ~1e7 params): fastopt on a ParamBuffer (two passes per step), on the buffer split
in two param groups (matrices adapted and decayed, vectors not), on separate arrays; against
the rules' NumPy references (tensor by tensor, as a framework-free user would write them)
and, for LAMB, a roof: the project's trivial-arithmetic kernel run twice so as to move the
same bytes as the two passes. ``nonfinite="propagate"`` keeps the guard's extra read of the
gradients (4 B per param) out of the figures. Run: ``pytest benchmarks/test_layerwise.py``."""
import numpy as np
import pytest

import fastopt
from fastopt.kernels import _dispatch
from fastopt.kernels.lamb import lamb_reference
from fastopt.kernels.lars import lars_reference
from fastopt.layerwise import LAMB, LARS
from test_models import transformer_shapes
from test_rules import ROOF

SHAPES = transformer_shapes()
N = sum(int(np.prod(s)) for s in SHAPES)
ROUNDS = {"numpy": 3}  # others: 20
# bytes per param: LAMB pass 1 reads p, g, m, v and writes m, v; pass 2 reads p, m, v and
# writes p. LARS (momentum): the norms read p, g; the update reads p, g, buf, writes p, buf.
WORDS = {"lamb": 10, "lars": 7}
HP = {"lamb": dict(lr=1e-3, weight_decay=0.01), "lars": dict(lr=0.1, momentum=0.9, weight_decay=1e-4)}


def _arrays(seed):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(s).astype(np.float32) for s in SHAPES]


def _buffer():
    buf = fastopt.ParamBuffer(_arrays(0))
    for g, a in zip(buf.grads, _arrays(1)):
        g[...] = a
    return buf


@pytest.mark.parametrize("impl", ["fastopt", "groups", "lists", "numpy", "roof"])
@pytest.mark.parametrize("rule", ["lamb", "lars"])
def test_step(record, rule, impl):
    cls, hp = {"lamb": LAMB, "lars": LARS}[rule], HP[rule]
    if impl in ("fastopt", "groups"):
        buf = _buffer()
        if impl == "fastopt":
            opt = cls(buf, nonfinite="propagate", **hp)
        else:
            no_adapt = dict(layer_adaptation=False) if rule == "lamb" else {}
            opt = cls([{"params": [p for p in buf.params if p.ndim > 1]},
                       {"params": [p for p in buf.params if p.ndim == 1], "weight_decay": 0.0, **no_adapt}],
                      nonfinite="propagate", **hp)
        run = opt.step
    elif impl == "lists":
        params, grads = _arrays(0), _arrays(1)
        opt = cls(params, nonfinite="propagate", **hp)

        def run():
            opt.step(grads)
    elif impl == "numpy":
        params, grads = _arrays(0), _arrays(1)
        states = [[np.zeros_like(p) for p in params] for _ in ({"lamb": 2, "lars": 1}[rule] * [0])]
        reference = {"lamb": lamb_reference, "lars": lars_reference}[rule]
        step = [0]

        def run():
            step[0] += 1
            reference(params, grads, *states, step=step[0], **hp)
    else:
        if rule != "lamb":
            pytest.skip("the roof is for LAMB (LARS's first pass is a reduction: no write to match)")
        buf = _buffer()
        kernel = ROOF.cpu(parallel=buf.arena.size >= _dispatch.PARALLEL_THRESHOLD)
        m, v = np.zeros_like(buf.arena), np.zeros_like(buf.arena)
        one = np.float32(1)

        def run():
            kernel(buf.arena, buf.grad_arena, m, v, None, (one, one))  # 7 words, as pass 1 + p written
            kernel(buf.arena, buf.grad_arena, None, None, None, (one, one))  # 3 words
    record(f"{rule}-200", N, impl, run, 4 * N * WORDS[rule], ROUNDS.get(impl, 20))
