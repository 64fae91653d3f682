"""Collects the medians of every benchmark in this run and prints one table at the end:
ms per step, GB/s, % of the same-traffic roof, and speed-up of fastopt over each peer.
Every ratio compares timings taken in this same run."""
import collections

import numba
import pytest

RESULTS = collections.defaultdict(dict)  # (group, size) -> {impl: (seconds, bytes moved)}


@pytest.fixture
def record(benchmark):
    def run(group, size, impl, fn, nbytes, rounds):
        benchmark.group = f"{group} n={size:.0e}"
        benchmark.extra_info.update(bytes=nbytes)
        benchmark.pedantic(fn, rounds=rounds, iterations=1, warmup_rounds=2)
        RESULTS[(group, size)][impl] = (benchmark.stats.stats.median, nbytes)
    return run


def pytest_terminal_summary(terminalreporter):
    if not RESULTS:
        return
    w = terminalreporter.write_line
    try:
        layer = numba.threading_layer()
    except ValueError:
        layer = "not started"
    w("")
    w(f"fastopt benchmark summary (median of rounds; numba threads={numba.get_num_threads()}, "
      f"threading layer={layer})")
    peers = ["numpy", "torch_foreach", "torch_fused", "torch", "serial", "guarded", "groups", "lists", "separate"]
    head = f"{'rule':<10}{'n':>7}{'fastopt ms':>12}{'GB/s':>8}{'% roof':>8}" + "".join(f"{'x ' + p:>16}" for p in peers)
    w(head)
    for (group, size), r in sorted(RESULTS.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        if "fastopt" not in r:
            continue
        t, nbytes = r["fastopt"]
        roof = f"{100 * r['roof'][0] / t:7.0f}%" if "roof" in r else f"{'-':>8}"
        cols = "".join(f"{r[p][0] / t:16.2f}" if p in r else f"{'-':>16}" for p in peers)
        w(f"{group:<10}{size:>7.0e}{t * 1e3:12.4f}{nbytes / t / 1e9:8.1f}{roof}{cols}")
    w("x peer = peer time / fastopt time (above 1: fastopt is faster); % roof = roof time / fastopt time; "
      "x serial (adam-thr rows) = serial / parallel CPU kernel time; "
      "model rows: fastopt = Adam on a ParamBuffer (1 launch/step, nonfinite='propagate' as torch), "
      "x guarded = the default nonfinite='skip' (one more read of g), x groups = AdamW in 2 param groups "
      "(2 launches), x lists = Adam on separate arrays (1 call over typed lists)")
