"""Alternating-rounds measurement of fastopt.torch against torch.optim (the README's table).

This VM's memory bandwidth drifts, so a ratio is only trusted when the implementations
alternate: each block times every implementation back to back (the order rotated from block
to block) and forms the ratios of that block; the report gives the median and quartiles of
the per-block ratios over all blocks. Run it in short bursts (other jobs share the cores):

    python benchmarks/torch_dropin_rounds.py [--blocks 9] [--only xfmr,tiny,rules,iter] [--threads N]
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import numba
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_torch_dropin import optimizer, tiny, transformer, with_grads


def timed(fn, reps):
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def quartiles(xs):
    q = statistics.quantiles(xs, n=4) if len(xs) > 1 else [xs[0]] * 3
    return q[0], statistics.median(xs), q[2]


def alternate(impls, blocks, reps):
    """{impl: [median seconds per block]}, implementations interleaved within each block."""
    names = list(impls)
    out = {n: [] for n in names}
    for b in range(blocks):
        for n in names[b % len(names):] + names[:b % len(names)]:
            out[n].append(timed(impls[n], reps))
    return out


def report(title, times, base="fastopt"):
    print(f"\n{title}")
    for name, ts in times.items():
        lo, med, hi = quartiles(ts)
        line = f"  {name:<12} {1e3 * med:10.4f} ms  (quartiles {1e3 * lo:.4f}-{1e3 * hi:.4f})"
        if name != base:
            r = quartiles([t / f for t, f in zip(ts, times[base])])
            line += f"   {name}/{base} per block: median {r[1]:.2f}x (quartiles {r[0]:.2f}-{r[2]:.2f})"
        print(line)


def step_impls(make, rule, impls):
    out = {}
    for impl in impls:
        net = make()
        out[impl] = roof(net) if impl == "roof" else with_grads(net, optimizer(impl, rule, net.parameters())).step
    return out


def roof(net):
    """A step moving AdamW's bytes (read p, g, m, v; write p, m, v) over flat float32 arrays
    as long as the model, with trivial arithmetic: the fastest any fp32 AdamW step can be."""
    import numpy as np

    from fastopt.kernels import _dispatch
    from test_rules import ROOF

    n = sum(p.numel() for p in net.parameters())
    p, g, m, v = (np.full(n, 1e-3, np.float32) for _ in range(4))
    kernel, one = ROOF.cpu(parallel=n >= _dispatch.PARALLEL_THRESHOLD), np.float32(1)
    return lambda: kernel(p, g, m, v, None, None, (one, None))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=9)
    parser.add_argument("--only", default="xfmr,tiny,rules,iter")
    parser.add_argument("--threads", type=int, default=None, help="torch's and numba's threads (default: theirs)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
        numba.set_num_threads(args.threads)
    only = set(args.only.split(","))
    print(f"torch {torch.__version__}: {torch.get_num_threads()} threads; numba {numba.__version__}: "
          f"{numba.get_num_threads()} threads; {time.strftime('%Y-%m-%d %H:%M')}; {args.blocks} blocks")
    if "tiny" in only:
        report("tiny MLP (1,208 params, 6 tensors), AdamW step",
               alternate(step_impls(tiny, "AdamW", ["fastopt", "guarded", "torch_fused", "torch"]),
                         args.blocks, 400))
    if "xfmr" in only:
        report("TransformerEncoder d512 x 6 (18.9M params), AdamW step",
               alternate(step_impls(transformer, "AdamW", ["fastopt", "guarded", "torch_fused", "torch", "roof"]),
                         args.blocks, 3))
    if "rules" in only:
        for rule in ("RMSprop", "Adagrad", "NAdam", "RAdam"):
            report(f"TransformerEncoder, {rule} step vs torch's default",
                   alternate(step_impls(transformer, rule, ["fastopt", "torch"]), args.blocks, 2))
    if "iter" in only:
        iteration(args.blocks)


def iteration(blocks):
    """forward + backward + AdamW step, by part: fastopt.torch with the arena (zero_grad()
    zeroes it, backward accumulates into it), with set_to_none (backward allocates, the step
    copies in), and torch fused (set_to_none, its default)."""
    x = torch.randn(8, 32, 512, generator=torch.Generator().manual_seed(2))
    parts = {}
    for name, impl, none in (("in-place", "fastopt", False), ("set_to_none", "fastopt", True),
                             ("torch_fused", "torch_fused", True)):
        net = transformer()
        opt = optimizer(impl, "AdamW", net.parameters())

        def run(net=net, opt=opt, none=none):
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=none)
            loss = net(x).square().mean()
            t1 = time.perf_counter()
            loss.backward()
            t2 = time.perf_counter()
            opt.step()
            return t1 - t0, t2 - t1, time.perf_counter() - t2
        run()
        parts[name] = run
    out = {n: [] for n in parts}
    for b in range(blocks):
        names = list(parts)
        for n in names[b % len(names):] + names[:b % len(names)]:
            out[n].append(parts[n]())
    print("\nTransformerEncoder, zero_grad + forward / backward / AdamW step (batch 8 x 32 tokens), median ms")
    totals = {n: [sum(r) for r in rs] for n, rs in out.items()}
    for n, rs in out.items():
        zero_fwd, bwd, step = (1e3 * statistics.median(r[i] for r in rs) for i in range(3))
        line = f"  {n:<12} {zero_fwd:8.1f} {bwd:8.1f} {step:8.1f}   total {1e3 * statistics.median(totals[n]):8.1f}"
        if n != "torch_fused":
            r = quartiles([t / f for t, f in zip(totals["torch_fused"], totals[n])])
            line += f"   torch_fused/{n} per block: median {r[1]:.2f}x (quartiles {r[0]:.2f}-{r[2]:.2f})"
        print(line)


if __name__ == "__main__":
    main()
