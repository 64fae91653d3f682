"""``python -m fastopt``: one fused Adam step on 10M float32 parameters, timed, on the GPU
when CuPy sees one, else on the CPU, checked against the NumPy reference."""
import argparse
import time

import numpy as np

from fastopt.functional import adam_
from fastopt.kernels.adam import adam_reference


def _gpu():
    try:
        import cupy
        return cupy if cupy.cuda.runtime.getDeviceCount() > 0 else None
    except Exception:
        return None


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m fastopt", description=__doc__)
    ap.add_argument("-n", type=int, default=10_000_000, help="number of parameters (default 1e7)")
    ap.add_argument("--steps", type=int, default=20, help="timed steps (default 20)")
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    args = ap.parse_args(argv)
    if args.n < 1 or args.steps < 1:
        ap.error("-n and --steps must be positive")
    xp = _gpu() if args.device in ("auto", "cuda") else None
    if args.device == "cuda" and xp is None:
        ap.error("--device cuda: no GPU found by CuPy")
    xp = xp or np
    device = "cuda" if xp is not np else "cpu"

    rng = np.random.default_rng(0)
    p0, g = rng.standard_normal(args.n).astype(np.float32), rng.standard_normal(args.n).astype(np.float32)
    p, grad = xp.array(p0), xp.array(g)  # copies: p0 stays the starting point of the reference
    m, v = xp.zeros_like(p), xp.zeros_like(p)
    t0 = time.perf_counter()
    adam_(p, grad, m, v, step=1, lr=1e-3)  # first call compiles (or loads the cached kernel)
    first = time.perf_counter() - t0
    sync = (lambda: xp.cuda.Device().synchronize()) if device == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for step in range(2, args.steps + 2):
        adam_(p, grad, m, v, step=step, lr=1e-3)
    sync()
    dt = (time.perf_counter() - t0) / args.steps

    ref = [p0.astype(np.float64), g.astype(np.float64), np.zeros(args.n), np.zeros(args.n)]
    for step in range(1, args.steps + 2):
        adam_reference(*ref, step=step, lr=1e-3)
    got = p.get() if device == "cuda" else p
    err = float(np.max(np.abs(got - ref[0])))
    print(f"fastopt adam_ on {device}: {args.n:,} float32 params")
    print(f"  first call (compile or cache load): {first * 1e3:.1f} ms")
    print(f"  step: {dt * 1e3:.3f} ms   {28 * args.n / dt / 1e9:.1f} GB/s (28 B/param)")
    print(f"  max |fastopt - float64 NumPy reference| after {args.steps + 1} steps: {err:.2e}")
    return 0 if err < 1e-4 else 1


if __name__ == "__main__":
    raise SystemExit(main())
