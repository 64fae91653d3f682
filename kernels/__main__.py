"""Developer commands: ``python -m fastopt.kernels ptx --cc 80 --cc 90``."""
import argparse
import sys


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m fastopt.kernels")
    sub = parser.add_subparsers(dest="command", required=True)
    ptx = sub.add_parser("ptx", help="compile every CUDA kernel to PTX (no GPU needed) and count .f64 "
                                     "instructions; exit 1 if a float32 kernel has any")
    ptx.add_argument("--cc", action="append", default=None, metavar="CC",
                     help="compute capability such as 80 or 90 (repeatable; default 80 and 90)")
    args = parser.parse_args(argv)

    import importlib.util
    if importlib.util.find_spec("numba_cuda") is None:  # numba's own deprecated numba.cuda cannot do this
        parser.error('the PTX check needs numba-cuda and its NVVM/NVRTC wheels: pip install -e ".[cuda-tools]"')
    from numba import config
    if config.ENABLE_CUDASIM:
        parser.error("PTX cannot be compiled under NUMBA_ENABLE_CUDASIM=1; unset it")
    import itertools

    from ._ptx import report, report_extra
    ccs = [(int(c[:-1]), int(c[-1])) for c in (args.cc or ["80", "90"])]
    header = ("kernel", "states", "dtype", "cc", "ptx lines", ".f64")
    print("{:<10} {:<42} {:<8} {:<4} {:>9} {:>5}".format(*header))
    leaks = 0
    for kernel, states, dtype, cc, lines, f64 in itertools.chain(report(ccs), report_extra(ccs)):
        print(f"{kernel:<10} {states:<42} {dtype:<8} {cc[0]}{cc[1]:<3} {lines:>9} {f64:>5}", flush=True)
        leaks += dtype != "float64" and f64 > 0
    if leaks:
        print(f"FAIL: {leaks} float32/16-bit kernel(s) contain float64 instructions", file=sys.stderr)
        return 1
    print("OK: no float32 or 16-bit kernel contains a float64 instruction")
    return 0


if __name__ == "__main__":
    sys.exit(main())
