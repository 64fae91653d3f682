"""The ``fastopt`` command (also ``python -m fastopt``): train, compare, valley, bench.

Bad arguments, unreadable data and impossible settings end with one line on stderr,
``fastopt: error: ...``, and exit status 2 (argparse's convention), never a traceback.
"""
import argparse
import sys
import time
from pathlib import Path

import numpy as np

from ..plots import format_table
from .config import UsageError
from .data import DataError
from .flags import TRAINING, add_flags, config_from_args
from .outputs import write_json
from .prepare import resolve_device
from .train import compare, train
from .valley import TABLE_HEADERS as VALLEY_HEADERS
from .valley import plot_valley

EXAMPLES = """\
examples:
  fastopt train                                   # conv net, Adam, scikit-learn's 8x8 digits, GPU if present
  fastopt train --model mlp --optimizer sgd --lr 0.1 --momentum 0.9 --epochs 20 --device cpu
  fastopt train --data ~/mnist/ --model conv       # MNIST from local IDX files (.gz or raw) or an .npz
  fastopt train --optimizer adamw --schedule warmup_cosine --ema 0.999 --max-grad-norm 1
  fastopt train --epochs 30 --checkpoint --out runs/long   # saves model + optimizer after every epoch
  fastopt train --epochs 30 --resume --out runs/long       # after an interruption: continues bit for bit
  fastopt compare --optimizers sgd,momentum,nesterov,adagrad,rmsprop,adam --out runs/cmp
  fastopt compare --optimizers lbfgs,newton,adam,momentum --model logreg --out runs/second   # full batch
  fastopt valley --out runs/valley                 # the lecture notes' narrow-valley picture
  fastopt bench -n 10000000                        # one fused Adam step on 1e7 params, timed and checked
"""


class _Parser(argparse.ArgumentParser):
    """argparse, but an error is ONE line: ``fastopt: error: <message> (see '<prog> --help')``."""

    def error(self, message):
        self.exit(2, f"fastopt: error: {message} (see '{self.prog} --help')\n")


SUBCOMMANDS = {  # command -> (one-line help, description); the flags are flags.FLAGS'
    "train": ("train one model (default: conv net + Adam on the digits)",
              "Train one model and write metrics.json, metrics.csv, loss.png and accuracy.png in --out."),
    "compare": ("train the same model with several optimizers, plot their curves",
                "Train the same model from the same initial weights, on the same batches, with each optimizer; "
                "write loss.png (log scale), accuracy.png, metrics.json and metrics.csv in --out and print a "
                "table. Hyper-parameter flags apply to the optimizers that take them."),
    "valley": ("optimizer trajectories on a narrow valley and on Rosenbrock",
               "Run the optimizers on the badly conditioned quadratic (x^2 + 50 y^2) / 2 and on Rosenbrock's "
               "function, draw their paths (valley.png) and print a table."),
    "bench": ("time one fused Adam step on many parameters, checked against NumPy",
              "One fused Adam step on N float32 parameters, timed, on the GPU when CuPy sees one, else on the "
              "CPU, checked against the float64 NumPy reference."),
}


def build_parser():
    p = _Parser(prog="fastopt", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXAMPLES,
                description="Train small nets with fastopt's fused optimizers, compare the optimizers, "
                            "and draw their paths on the lecture notes' test problems.")
    from .. import __version__
    p.add_argument("--version", action="version", version=f"fastopt {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for command, (summary, description) in SUBCOMMANDS.items():
        extra = dict(formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXAMPLES) \
            if command in TRAINING else {}
        add_flags(sub.add_parser(command, help=summary, description=description, **extra), command)
    return p


# -- commands ----------------------------------------------------------------------------------
def cmd_train(args):
    train(config_from_args(args))
    return 0


def cmd_compare(args):
    metrics = compare(config_from_args(args), args.optimizers)
    print()
    print(format_table(metrics["table"]["rows"], metrics["table"]["headers"]))
    files = metrics.get("files", ["loss.png", "accuracy.png", "metrics.json", "metrics.csv"])
    print(f"\nwrote {args.out}/{files[0]}, {', '.join(files[1:])}")
    return 0


def cmd_valley(args):
    t0 = time.perf_counter()
    path, rows = plot_valley(Path(args.out) / "valley.png", optimizers=args.optimizers, steps=args.steps)
    print(format_table(rows, VALLEY_HEADERS))
    records = [dict(zip(("problem", "optimizer", "final_loss", "distance_to_minimum"), r)) for r in rows]
    write_json(Path(args.out) / "metrics.json", {"command": "valley", "rows": records})
    print(f"\nwrote {path} and metrics.json in {time.perf_counter() - t0:.1f} s")
    return 0


def cmd_bench(args):
    """The fused Adam step, timed (the former ``python -m fastopt`` demo)."""
    from ..functional import adam_
    from ..kernels.adam import adam_reference

    device, about = resolve_device(args.device)
    if device == "cuda":
        import cupy as xp
    else:
        xp = np
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
    print(f"fastopt adam_ on {about}: {args.n:,} float32 params")
    print(f"  first call (compile or cache load): {first * 1e3:.1f} ms")
    print(f"  step: {dt * 1e3:.3f} ms   {28 * args.n / dt / 1e9:.1f} GB/s (28 B/param)")
    print(f"  max |fastopt - float64 NumPy reference| after {args.steps + 1} steps: {err:.2e}")
    return 0 if err < 1e-4 else 1


COMMANDS = {"train": cmd_train, "compare": cmd_compare, "valley": cmd_valley, "bench": cmd_bench}


def main(argv=None):
    """Run the command line ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help (0) or a bad argument (2, message already printed)
        return e.code if isinstance(e.code, int) else 0
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return COMMANDS[args.command](args)
    except (UsageError, DataError, OSError) as e:  # OSError: e.g. an --out that cannot be written
        print(f"fastopt: error: {e}", file=sys.stderr)
        return 2
    except FloatingPointError as e:  # --nonfinite raise
        print(f"fastopt: stopped: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("fastopt: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
