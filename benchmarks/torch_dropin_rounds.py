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
        out[impl] = with_grads(net, optimizer(impl, rule, net.parameters())).step
    return out


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
               alternate(step_impls(transformer, "AdamW", ["fastopt", "guarded", "torch_fused", "torch"]),
                         args.blocks, 3))
    if "rules" in only:
        for rule in ("RMSprop", "Adagrad", "NAdam", "RAdam"):
            report(f"TransformerEncoder, {rule} step vs torch's default",
                   alternate(step_impls(transformer, rule, ["fastopt", "torch"]), args.blocks, 2))
    if "iter" in only:
        x = torch.randn(8, 32, 512, generator=torch.Generator().manual_seed(2))
        impls = {}
        for impl in ("fastopt", "torch_fused"):
            net = transformer()
            opt = optimizer(impl, "AdamW", net.parameters())

            def iteration(net=net, opt=opt):
                opt.zero_grad()
                net(x).square().mean().backward()
                opt.step()
            iteration()
            impls[impl] = iteration
        report("TransformerEncoder, forward + backward + AdamW step (batch 8 x 32 tokens)",
               alternate(impls, args.blocks, 1))


if __name__ == "__main__":
    main()
