"""GPU benchmarks (issue 15, item 5): fastopt against torch.optim's fused CUDA kernels, a
hand-written CuPy ``ElementwiseKernel`` Adam and a device-to-device copy of the same bytes
(the roof), timed with CUDA events, the implementations alternating round by round.

Rows: every rule at 1e6 / 1e7 / 1e8 elements in float32, bfloat16 and float16 params and
(rules that have it) 8-bit state; the 195-tensor model and the tiny model against torch fused
(multi-tensor apply); the tiny model's step replayed from a CUDA graph (``capturable=True``).
Without a GPU every row skips with the reason; on the CUDA simulator
(``NUMBA_ENABLE_CUDASIM=1``) the same code runs at tiny sizes, without torch or CuPy, so the
script is exercised but its times mean nothing. ``FASTOPT_GPU_BENCH_JSON=path`` writes the
rows (rewritten after each one, so a run cut short keeps what it measured);
``benchmarks/gpu_report.py`` turns them into the report and computes the goals' verdicts.

    python -m pytest -q -s -p no:cacheprovider benchmarks/test_gpu.py
"""
import gc
import json
import os
import statistics
import time

import numpy as np
import pytest
from numba import config, cuda

import fastopt
from fastopt.kernels import RULES, _blockwise
from fastopt.kernels._formats import BY_NAME
from test_models import MODELS, transformer_shapes
from test_rules import _setup

SIM = bool(config.ENABLE_CUDASIM)
GPU = not SIM and cuda.is_available()
pytestmark = pytest.mark.skipif(not (SIM or GPU), reason="no GPU here (cuda.is_available() is False): "
                                                        "the GPU benchmarks need one, or NUMBA_ENABLE_CUDASIM=1")

try:
    import cupy
except ImportError:
    cupy = None
try:
    import torch
    TORCH = GPU and torch.cuda.is_available()
except ImportError:
    torch, TORCH = None, False

CUPY = GPU and cupy is not None
SIZES = [int(float(s)) for s in os.environ.get("FASTOPT_GPU_BENCH_SIZES", "1e6,1e7,1e8").split(",")] if GPU else [37]
FORMATS = ["float32", "bfloat16", "float16", "8bit"]
ROUNDS = 7 if GPU else 2
LR = 1e-3
UNGUARDED = dict(nonfinite="propagate")  # torch's semantics: no inf/NaN check pass

ROWS = []  # one dict per measured row, in the order measured


def _steps(n):
    """Steps per timed round: about a millisecond or more of GPU work per round."""
    if not GPU:
        return 1
    return max(3, min(200, int(3e8 // max(n, 1))))


# -- timing ----------------------------------------------------------------------------------

def _time(fn, steps):
    """Seconds per call of ``fn`` over ``steps`` back-to-back calls: CUDA events on the
    default stream, which every producer's null stream is (the simulator: wall clock)."""
    if GPU:
        start, end = cuda.event(), cuda.event()
        start.record()
        for _ in range(steps):
            fn()
        end.record()
        end.synchronize()
        return cuda.event_elapsed_time(start, end) / 1e3 / steps
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    cuda.synchronize()
    return (time.perf_counter() - t0) / steps


def alternate(impls, steps, rounds=ROUNDS, warmup=2):
    """``{name: [seconds per step, one per round]}``: every implementation warmed up, then
    timed round by round, one after the other (the order reversed every other round), so a
    drift of the machine hits them alike."""
    for fn in impls.values():
        for _ in range(warmup):
            fn()
    cuda.synchronize()
    times = {name: [] for name in impls}
    for r in range(rounds):
        for name in (list(impls) if r % 2 == 0 else list(reversed(impls))):
            times[name].append(_time(impls[name], steps))
    return times


def summarize(times, nbytes):
    """Per implementation: median / min / max seconds per step; per peer, the per-round
    ratio peer time / fastopt time (above 1: fastopt is faster) as median, min, max; for the
    roof, the fraction of it fastopt reaches (roof time / fastopt time)."""
    out = {"impls": {}, "ratios": {}}
    for name, ts in times.items():
        out["impls"][name] = {"median_s": statistics.median(ts), "min_s": min(ts), "max_s": max(ts),
                              "rounds": len(ts), "gb_s": nbytes / statistics.median(ts) / 1e9 if nbytes else None}
    base = times.get("fastopt")
    if base:
        for name, ts in times.items():
            if name != "fastopt":
                r = [t / b for t, b in zip(ts, base)]
                out["ratios"][name] = {"median": statistics.median(r), "min": min(r), "max": max(r)}
    return out


def record(group, case, n, fmt, times, nbytes, notes=(), skipped=None):
    row = {"group": group, "case": case, "n": n, "format": fmt, "bytes": nbytes,
           "simulator": SIM, **summarize(times, nbytes), "skipped": dict(skipped or {}), "notes": list(notes)}
    ROWS.append(row)
    path = os.environ.get("FASTOPT_GPU_BENCH_JSON")
    if path:
        with open(path + ".tmp", "w") as f:
            json.dump(ROWS, f, indent=1)
        os.replace(path + ".tmp", path)
    ratios = "  ".join(f"x{name}={r['median']:.2f} [{r['min']:.2f}-{r['max']:.2f}]"
                       for name, r in row["ratios"].items())
    fast = row["impls"].get("fastopt", {}).get("median_s")
    print(f"\n[gpu bench] {group} {case} n={n:.0e} {fmt}: fastopt "
          f"{'-' if fast is None else f'{fast * 1e6:.1f} us'}  {ratios}"
          + "".join(f"  ({k} skipped: {v})" for k, v in row["skipped"].items()), flush=True)
    return row


@pytest.fixture(autouse=True)
def _free():
    yield
    gc.collect()
    if CUPY:
        cupy.get_default_memory_pool().free_all_blocks()
    if TORCH:
        torch.cuda.empty_cache()


# -- arrays ----------------------------------------------------------------------------------

def _numba(x):
    return cuda.as_cuda_array(x, sync=False)


def random_device(n, fmt, seed):
    """n standard normal values in format ``fmt`` as a Numba device array (CuPy fills them
    on the GPU where it is installed; the simulator's come from the host)."""
    dtype = np.dtype(BY_NAME[fmt])
    if not CUPY:
        return cuda.to_device(np.random.default_rng(seed).standard_normal(n).astype(dtype))
    x = cupy.random.default_rng(seed).standard_normal(n, dtype=cupy.float32)
    if fmt == "bfloat16":  # CuPy has no bfloat16: its bits, truncated, viewed by Numba
        return _numba((x.view(cupy.uint32) >> 16).astype(cupy.uint16)).view(dtype)
    return _numba(x.astype(dtype))


def zeros_device(n, dtype):
    return _numba(cupy.zeros(n, dtype)) if CUPY else cuda.to_device(np.zeros(n, dtype))


def fastopt_step(rule, n, fmt, hp, state_bits=None):
    """``(step function, path)``: fastopt's optimizer for ``rule`` over one tensor of ``n``
    params of ``fmt``, on a ParamBuffer (CuPy: one launch on views converted once) where CuPy
    holds the format, else over a Numba device array with its gradient passed to each step."""
    cls = fastopt.OPTIMIZERS[rule]
    kw = dict({"lr": LR, **hp}, **UNGUARDED, **({"state_bits": state_bits} if state_bits else {}))
    dtype = np.dtype(BY_NAME[fmt])
    if CUPY and fmt != "bfloat16":
        buf = fastopt.ParamBuffer(shapes=[(n,)], dtype=dtype, device="cuda")
        buf.params[0][...] = cupy.random.default_rng(0).standard_normal(n, dtype=cupy.float32).astype(dtype)
        buf.grads[0][...] = cupy.random.default_rng(1).standard_normal(n, dtype=cupy.float32).astype(dtype)
        opt = cls(buf, **kw)
        return opt.step, "ParamBuffer (CuPy)"
    p, g = random_device(n, fmt, 0), random_device(n, fmt, 1)
    opt = cls([p], **kw)
    grads = [g]
    return (lambda: opt.step(grads)), "arrays (Numba device arrays)"


def torch_step(rule, n, fmt, hp, shapes=None):
    """``(step function, "torch_fused" or "torch_foreach", note)``, or a skip reason string."""
    from test_rules import TORCH_NAMES
    if not TORCH:
        return "torch with CUDA is not available here"
    if rule not in TORCH_NAMES:
        return f"torch has no {rule}"
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[fmt]
    gen = torch.Generator(device="cuda").manual_seed(0)
    params = [torch.randn(s, device="cuda", dtype=dtype, generator=gen) for s in (shapes or [(n,)])]
    for p in params:
        p.grad = torch.randn(p.shape, device="cuda", dtype=dtype, generator=gen)
    for kind in ("fused", "foreach"):
        try:
            opt = getattr(torch.optim, TORCH_NAMES[rule])(params, **{"lr": LR, **hp, kind: True})
            opt.step()
            note = None if kind == "fused" else f"torch {TORCH_NAMES[rule]} has no fused CUDA form"
            return opt.step, f"torch_{kind}", note
        except (RuntimeError, TypeError, ValueError) as e:
            error = e
    return f"torch {TORCH_NAMES[rule]}: {error}"


def copy_roof(nbytes):
    """A device-to-device copy of ``nbytes / 2`` bytes: reads and writes ``nbytes`` in all."""
    half = max(1, nbytes // 2)
    src, dst = zeros_device(half, np.uint8), zeros_device(half, np.uint8)
    return lambda: dst.copy_to_device(src)


_CUPY_ADAM = None


def cupy_adam(n, hp):
    """A hand-written CuPy ``ElementwiseKernel`` Adam(W) over one float32 tensor: the
    per-step scalars (bias corrections) hoisted to the host, as fastopt's are."""
    global _CUPY_ADAM
    if _CUPY_ADAM is None:
        _CUPY_ADAM = cupy.ElementwiseKernel(
            "float32 g, float32 b1, float32 b2, float32 step_size, float32 inv_sqrt_bc2, float32 eps, float32 decay",
            "float32 p, float32 m, float32 v",
            "m = b1 * m + (1.0f - b1) * g; v = b2 * v + (1.0f - b2) * g * g; "
            "p = p * decay - step_size * m / (sqrt(v) * inv_sqrt_bc2 + eps);",
            "fastopt_bench_adam")
    rng = cupy.random.default_rng(0)
    p, g = rng.standard_normal(n, dtype=cupy.float32), rng.standard_normal(n, dtype=cupy.float32)
    m, v = cupy.zeros(n, cupy.float32), cupy.zeros(n, cupy.float32)
    b1, b2, eps, wd = 0.9, 0.999, 1e-8, hp.get("weight_decay", 0.0)
    step = [0]
    f32 = np.float32

    def run():
        step[0] += 1
        t = step[0]
        _CUPY_ADAM(g, f32(b1), f32(b2), f32(LR / (1 - b1 ** t)), f32(1 / (1 - b2 ** t) ** 0.5), f32(eps),
                   f32(1 - LR * wd), p, m, v)
    return run


# -- every rule, one tensor ------------------------------------------------------------------

def _cases():
    for fmt in FORMATS:
        for rule in RULES:
            if fmt == "8bit" and rule.replace("adamw", "adam") not in _blockwise.RULES:
                continue
            for n in SIZES:
                yield pytest.param(rule, n, fmt, id=f"{rule}-{n:.0e}-{fmt}")


def _state_bytes(fmt, itemsize):
    return 1 + 4 / _blockwise.BLOCK if fmt == "8bit" else itemsize


@pytest.mark.parametrize("rule,n,fmt", list(_cases()))
def test_rule(rule, n, fmt):
    _, _, _, hp, used = _setup(rule, 1)  # the hyper-parameters and states the CPU benchmarks use
    if fmt == "8bit" and not GPU:
        n = _blockwise.MIN_SIZE + 37  # smaller tensors keep 32-bit state: the 8-bit kernel would not run
    param_fmt = "float32" if fmt == "8bit" else fmt
    itemsize = np.dtype(BY_NAME[param_fmt]).itemsize
    nbytes = int(n * (3 * itemsize + 2 * used * _state_bytes(fmt, itemsize)))  # read p, g, states; write p, states
    impls, skipped, notes = {}, {}, []
    impls["fastopt"], path = fastopt_step(rule, n, param_fmt, hp, state_bits=8 if fmt == "8bit" else None)
    notes.append(f"fastopt on {path}")
    peer = torch_step(rule, n, param_fmt, hp)
    if isinstance(peer, str):
        skipped["torch"] = peer
    else:
        impls[peer[1]], _, note = peer
        if note:
            notes.append(note)
        if fmt == "8bit":
            notes.append(f"{peer[1]} keeps 32-bit state (torch has no 8-bit optimizer)")
    if rule in ("adam", "adamw") and fmt == "float32":
        if CUPY:
            impls["cupy"] = cupy_adam(n, hp)
        else:
            skipped["cupy"] = "CuPy with a GPU is not available here"
    impls["roof"] = copy_roof(nbytes)
    record("rule", rule, n, fmt, alternate(impls, _steps(n)), nbytes, notes, skipped)


# -- whole models ----------------------------------------------------------------------------

def _model_shapes(model):
    if GPU:
        return MODELS[model]
    return transformer_shapes(layers=1, width=8, vocab=16) if model == "model-200" else MODELS[model]


def fastopt_model(shapes, **kw):
    """``(fastopt.Adam's step, path)`` over a model's tensors: a ParamBuffer on the GPU (one
    launch per step), separate Numba device arrays on the simulator (no CuPy)."""
    if CUPY:
        buf = fastopt.ParamBuffer(shapes=shapes, dtype=np.float32, device="cuda")
        buf.arena[...] = cupy.random.default_rng(0).standard_normal(buf.arena.size, dtype=cupy.float32)
        buf.grad_arena[...] = cupy.random.default_rng(1).standard_normal(buf.arena.size, dtype=cupy.float32)
        opt = fastopt.Adam(buf, lr=LR, **UNGUARDED, **kw)
        return opt.step, "ParamBuffer (CuPy), one launch per step"
    params = [random_device(int(np.prod(s)), "float32", k) for k, s in enumerate(shapes)]
    grads = [random_device(p.size, "float32", 1000 + k) for k, p in enumerate(params)]
    opt = fastopt.Adam(params, lr=LR, **UNGUARDED, **kw)
    return (lambda: opt.step(grads)), "separate Numba device arrays, one launch per tensor"


@pytest.mark.parametrize("model", list(MODELS))
def test_model(model):
    shapes = _model_shapes(model)
    n = sum(int(np.prod(s)) for s in shapes)
    nbytes = 28 * n
    impls, skipped = {}, {}
    impls["fastopt"], path = fastopt_model(shapes)
    peer = torch_step("adam", n, "float32", {}, shapes=shapes)
    if isinstance(peer, str):
        skipped["torch"] = peer
    else:
        impls[peer[1]] = peer[0]
    impls["roof"] = copy_roof(nbytes)
    steps = _steps(n) if model == "model-200" else (300 if GPU else 1)
    record("model", model, n, "float32", alternate(impls, steps), nbytes,
           [f"fastopt on {path}", f"{len(shapes)} tensors", "torch: one optimizer over the same shapes"], skipped)


def test_tiny_model_graph():
    """The tiny model's step replayed from a CUDA graph (``capturable=True``: step count and
    lr on the device), against torch fused plain and replayed from a graph."""
    shapes = MODELS["model-tiny"]
    n = sum(int(np.prod(s)) for s in shapes)
    try:
        step, path = fastopt_model(shapes, capturable=True)
    except TypeError as e:
        pytest.skip(f"capturable=True is not in fastopt yet (issue 15 item 2): {e}")
    if not CUPY:
        pytest.skip("graph capture needs CuPy and a GPU (CuPy's stream capture)")
    impls, skipped = {}, {}
    impls["fastopt"] = capture_cupy(step)
    impls["fastopt_plain"] = step
    if TORCH:
        impls["torch_fused"] = torch_step("adam", n, "float32", {}, shapes=shapes)[0]
        impls["torch_fused_graph"] = capture_torch(shapes)
    else:
        skipped["torch"] = "torch with CUDA is not available here"
    record("graph", "model-tiny", n, "float32", alternate(impls, 300), 28 * n,
           [f"fastopt on {path}, replayed from a CuPy graph"], skipped)


def capture_cupy(step):
    """``step`` captured once into a CUDA graph on a CuPy stream: the replay."""
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        step()  # warm: compiled, states allocated, before the capture
        stream.synchronize()
        stream.begin_capture()
        step()
        graph = stream.end_capture()
    return lambda: graph.launch(stream=cupy.cuda.get_current_stream())


def capture_torch(shapes):
    gen = torch.Generator(device="cuda").manual_seed(0)
    params = [torch.randn(s, device="cuda", generator=gen) for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, device="cuda", generator=gen)
    opt = torch.optim.Adam(params, lr=torch.tensor(LR, device="cuda"), fused=True, capturable=True)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            opt.step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.step()
    return graph.replay
