"""AdamW at 1e7 parameters in each storage format (issue 13): float32; bfloat16 and float16
params, grads and state; float32 params with bfloat16 state; bfloat16 params with float32
master weights; bfloat16 with stochastic rounding; against torch.optim.AdamW(fused=True) on
the same tensors (bf16 and fp32) and each format's own same-traffic roof.

Two ways to run it: ``pytest benchmarks/test_precision.py`` (pytest-benchmark, the table at
the end), and ``python benchmarks/test_precision.py [--blocks 9]``, which alternates the
implementations block by block and reports the median and quartiles of the per-block
ratios: this VM's bandwidth drifts, and only ratios taken side by side are trusted
(``--model``: the 195-tensor model of test_models.py through ``fastopt.AdamW`` in each
format, 8-bit state too, against torch fused on the same tensors). The second also runs the
quality check (``--quality``): 2,000 AdamW steps on an ill-conditioned
quadratic in each format, the distance to the float32 iterate. (8-bit state against torchao
and bitsandbytes: test_state8bit.py.)"""
import statistics
import sys
import time

import ml_dtypes
import numpy as np
import pytest

from fastopt.kernels import _formats
from fastopt.kernels._dispatch import PARALLEL_THRESHOLD
from fastopt.kernels._rule import Rule, State
from fastopt.kernels.adam import adamw_

N = 10 ** 7
BF16, F16, F32 = np.dtype(ml_dtypes.bfloat16), np.dtype(np.float16), np.dtype(np.float32)

# name -> (param dtype, state dtype, master weights, stochastic rounding)
FORMATS = {
    "fp32": (F32, F32, False, False),
    "bf16": (BF16, BF16, False, False),
    "fp16": (F16, F16, False, False),
    "fp32+bf16 state": (F32, BF16, False, False),
    "bf16+fp32 master": (BF16, BF16, True, False),
    "bf16 sr": (BF16, BF16, False, True),
}


def bytes_per_param(name):
    """Read p, g, m, v (and the master), write p, m, v (and the master)."""
    param, state, master, _ = FORMATS[name]
    return 2 * param.itemsize + param.itemsize + 4 * state.itemsize + (8 if master else 0)


def roof_math(p, g, m, v):
    return p + g, m + g, v + g


# the same traffic as an Adam step in any format (the loads and stores of the engine's seam), trivial math
ROOF = Rule("roof_adam", roof_math, lambda h, step, lr: {}, states=[State("m"), State("v")]).kernels


def fastopt_step(name, n=N):
    param, state, master, sr = FORMATS[name]
    rng = np.random.default_rng(0)
    p = rng.standard_normal(n).astype(param)
    g = rng.standard_normal(n).astype(param)
    m, v = np.zeros(n, state), np.zeros(n, state)
    copy = p.astype(np.float32) if master else None
    step = [0]
    # the in-place call with the engine's options: its checks are a few microseconds at 1e7
    from fastopt.kernels import _dispatch
    from fastopt.kernels.adam import ADAM

    def run():
        step[0] += 1
        values = ADAM.scalars_at({**ADAM.defaults, "decoupled_weight_decay": True, "weight_decay": 1e-2},
                                 step[0], 1e-3)
        key = _formats.rounding_key(0, step[0]) if sr else None
        _dispatch.launch(ADAM.kernels, p, g, [m, v, None], values, master=copy, key=key)
    return run


def roof_step(name, n=N):
    param, state, master, _ = FORMATS[name]
    p, g = np.zeros(n, param), np.zeros(n, param)
    m, v = np.zeros(n, state), np.zeros(n, state)
    copy = np.zeros(n, np.float32) if master else None
    kernel = ROOF.cpu(parallel=n >= PARALLEL_THRESHOLD)
    arrays = [_formats.kernel_view(a) for a in (p, g, m, v, copy)]
    c = (np.float32(1), None)
    return lambda: kernel(*arrays, c)


def torch_step(dtype, n=N):
    import numba
    import torch
    torch.set_num_threads(numba.get_num_threads())
    rng = np.random.default_rng(0)
    tp = torch.from_numpy(rng.standard_normal(n).astype(np.float32)).to(dtype)
    tp.grad = torch.from_numpy(rng.standard_normal(n).astype(np.float32)).to(dtype)
    opt = torch.optim.AdamW([tp], lr=1e-3, fused=True)
    return opt.step


def check_adamw_is_the_benchmarked_step():
    """The benchmark drives the engine directly; it is adamw_'s step (same bits)."""
    p = np.linspace(-1, 1, 1001).astype(BF16)
    g, m, v = np.ones(1001, BF16), np.zeros(1001, BF16), np.zeros(1001, BF16)
    q, h, mm, vv = p.copy(), g.copy(), m.copy(), v.copy()
    adamw_(p, g, m, v, step=1)
    from fastopt.kernels import _dispatch
    from fastopt.kernels.adam import ADAM
    values = ADAM.scalars_at({**ADAM.defaults, "decoupled_weight_decay": True, "weight_decay": 1e-2}, 1, 1e-3)
    _dispatch.launch(ADAM.kernels, q, h, [mm, vv, None], values)
    assert np.array_equal(p.view(np.uint16), q.view(np.uint16))


@pytest.mark.parametrize("impl", ["fastopt", "roof", "torch_fused_bf16", "torch_fused_fp32"])
@pytest.mark.parametrize("name", list(FORMATS))
def test_adamw_formats(record, name, impl):
    nbytes = N * bytes_per_param(name)
    if impl == "fastopt":
        check_adamw_is_the_benchmarked_step()
        run = fastopt_step(name)
    else:
        run = roof_step(name) if impl == "roof" else torch_peer(impl, name, torch_step)
    run()
    record(f"adamw {name}", N, impl, run, nbytes, 10)


def torch_peer(impl, name, make):
    """``make(torch dtype)`` for a torch row (``impl`` ends with bf16 or fp32), beside the bf16 row only."""
    torch = pytest.importorskip("torch", reason="torch not installed")
    if name != "bf16":
        pytest.skip("torch rows sit beside the bf16 row")
    return make(torch.bfloat16 if impl.endswith("bf16") else torch.float32)


# -- the 195-tensor model (benchmarks/test_models.py) in each format, through the optimizer class --
MODEL_FORMATS = {name: dict(params=param, state_dtype=None if state == param else state.name,
                            master_weights=master, stochastic_rounding=sr)
                 for name, (param, state, master, sr) in FORMATS.items()}
MODEL_FORMATS["fp32+8-bit state"] = dict(params=F32, state_bits=8)
MODEL_FORMATS["bf16+fp32 master+8-bit state"] = dict(params=BF16, master_weights=True, state_bits=8)


def model_step(name):
    """fastopt.AdamW over the 195-tensor model's ParamBuffer in format ``name``: one launch per step."""
    import fastopt
    from test_models import UNGUARDED, _arrays, transformer_shapes
    options = dict(MODEL_FORMATS[name])
    dtype = options.pop("params")
    shapes = transformer_shapes()
    buf = fastopt.ParamBuffer([a.astype(dtype) for a in _arrays(shapes, 0)])
    for g, a in zip(buf.grads, _arrays(shapes, 1)):
        g[...] = a.astype(dtype)
    opt = fastopt.AdamW(buf, lr=1e-3, **UNGUARDED, **options)
    return opt.step


def model_torch_step(dtype):
    """torch.optim.AdamW(fused=True) over the same tensors (torch's multi-tensor apply)."""
    import numba
    import torch

    from test_models import _arrays, transformer_shapes
    torch.set_num_threads(numba.get_num_threads())
    shapes = transformer_shapes()
    params = [torch.from_numpy(a).to(dtype) for a in _arrays(shapes, 0)]
    for p, g in zip(params, _arrays(shapes, 1)):
        p.grad = torch.from_numpy(g).to(dtype)
    return torch.optim.AdamW(params, lr=1e-3, fused=True).step


@pytest.mark.parametrize("impl", ["fastopt", "torch_fused_bf16", "torch_fused_fp32"])
@pytest.mark.parametrize("name", list(MODEL_FORMATS))
def test_model_200_formats(record, name, impl):
    from test_models import transformer_shapes
    n = sum(int(np.prod(s)) for s in transformer_shapes())
    run = model_step(name) if impl == "fastopt" else torch_peer(impl, name, model_torch_step)
    run()
    record(f"model-200 adamw {name}", n, impl, run, 0, 10)


# -- quality: a long horizon on an ill-conditioned quadratic ------------------------------

def quality(steps=2000, n=4096, lr=1e-3, weight_decay=0.1):
    """0.5 * sum(d_i * x_i**2), d from 1e-2 to 1e2: each format's AdamW iterate, its distance
    to float32's (relative, in the 2-norm), and how far weight decay pulled the
    weights of the flattest coordinates (where the gradient is tiny, the decay is what moves them)."""
    import fastopt
    d = np.logspace(-2, 2, n)
    x0 = np.random.default_rng(0).standard_normal(n) + 2.0
    out = {}
    for name, (param, state, master, sr) in FORMATS.items():
        buf = fastopt.ParamBuffer([x0.astype(param)])
        opt = fastopt.AdamW(buf, lr=lr, weight_decay=weight_decay, nonfinite="propagate",
                            state_dtype=None if state == param else state.name, master_weights=master,
                            stochastic_rounding=sr)
        for _ in range(steps):
            x = (opt.masters[:n] if opt.masters is not None else buf.params[0]).astype(np.float64)
            buf.grads[0][...] = (d * x).astype(param)
            opt.step()
        out[name] = (opt.masters[:n] if master else buf.params[0]).astype(np.float64)
    ref = out["fp32"]
    flat = slice(0, n // 16)
    return {name: (np.linalg.norm(x - ref) / np.linalg.norm(ref), x[flat].mean(), ref[flat].mean())
            for name, x in out.items()}


def _quartiles(xs):
    q = statistics.quantiles(xs, n=4) if len(xs) > 1 else [xs[0]] * 3
    return q[0], statistics.median(xs), q[2]


def alternate(impls, blocks):
    """Seconds per step of each implementation, one median of 3 per block, every
    implementation once per block in a rotated order."""
    for fn in impls.values():
        fn()
    names = list(impls)
    times = {k: [] for k in names}
    for b in range(blocks):
        for k in names[b % len(names):] + names[:b % len(names)]:
            ts = []
            for _ in range(3):
                t = time.perf_counter()
                impls[k]()
                ts.append(time.perf_counter() - t)
            times[k].append(statistics.median(ts))
    return times


def _ratio(times, peer, name):
    q = _quartiles([r / t for r, t in zip(times[peer], times[name])])
    return f"{q[1]:.2f} ({q[0]:.2f}-{q[2]:.2f})"


def main(argv):
    blocks = int(argv[argv.index("--blocks") + 1]) if "--blocks" in argv else 9
    import torch
    if "--model" in argv:  # the 195-tensor model, through fastopt.AdamW, per format
        impls = {name: model_step(name) for name in MODEL_FORMATS}
        impls["torch bf16"], impls["torch fp32"] = model_torch_step(torch.bfloat16), model_torch_step(torch.float32)
        times = alternate(impls, blocks)
        print(f"AdamW on the 195-tensor model (1.0e7 params), {blocks} blocks; per-block ratios: median (quartiles)")
        for name in MODEL_FORMATS:
            lo, med, hi = _quartiles(times[name])
            print(f"  {name:<30} {1e3 * med:7.2f} ms ({1e3 * lo:.2f}-{1e3 * hi:.2f})"
                  f"  torch bf16/this {_ratio(times, 'torch bf16', name)}"
                  f"  torch fp32/this {_ratio(times, 'torch fp32', name)}")
        return
    impls = {name: fastopt_step(name) for name in FORMATS}
    impls.update({f"roof {name}": roof_step(name) for name in FORMATS})
    impls["torch bf16"] = torch_step(torch.bfloat16)
    impls["torch fp32"] = torch_step(torch.float32)
    times = alternate(impls, blocks)
    print(f"AdamW, {N:.0e} params, {blocks} blocks; per-block ratios: median (quartiles)")
    for name in FORMATS:
        lo, med, hi = _quartiles(times[name])
        print(f"  {name:<18} {bytes_per_param(name):>3} B/param {1e3 * med:7.2f} ms ({1e3 * lo:.2f}-{1e3 * hi:.2f})"
              f"  roof/this {_ratio(times, f'roof {name}', name)}"
              f"  torch bf16/this {_ratio(times, 'torch bf16', name)}"
              f"  torch fp32/this {_ratio(times, 'torch fp32', name)}")
    if "--quality" in argv:
        print("quality: AdamW lr=1e-3, weight_decay=0.1, 2000 steps on 0.5*sum(d*x^2), d in [1e-2, 1e2]")
        for name, (dist, flat, ref) in quality().items():
            print(f"  {name:<18} distance to fp32 {dist:.2e}   mean of the flattest 1/16: {flat:.4f} (fp32 {ref:.4f})")


if __name__ == "__main__":
    main(sys.argv[1:])
