"""The ``fastopt`` command (also ``python -m fastopt``): train, compare, valley, bench.

Bad arguments, unreadable data and impossible settings end with one line on stderr,
``fastopt: error: ...``, and exit status 2 (argparse's convention), never a traceback.
"""
import argparse
import math
import sys
import time

from .checkpoint import atomic_write
from .data import DataError

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


# -- value checks: each names the bad value (argparse adds the flag) --------------------------
def _integer(text):
    """An integer, also written like 1e6 or 1_000_000 (as the help texts write counts)."""
    try:
        return int(text)
    except ValueError:
        value = float(text)  # a ValueError here: no number at all
        if not value.is_integer():
            raise ValueError(f"{text!r} is not a whole number") from None
        return int(value)


def _number(kind, test, what):
    def parse(text):
        try:
            value = _integer(text) if kind is int else kind(text)
        except (ValueError, OverflowError):  # OverflowError: int(float("1e999"))
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, "
                                             f"got {text!r}") from None
        if not (math.isfinite(value) and test(value)):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text}")
        return value
    parse.__name__ = what  # argparse names the type in some messages
    return parse


positive_float = _number(float, lambda v: v > 0, "> 0")
nonnegative_float = _number(float, lambda v: v >= 0, ">= 0")
unit_float = _number(float, lambda v: 0 <= v < 1, "in [0, 1)")
decay_factor = _number(float, lambda v: 0 < v <= 1, "in (0, 1]")
positive_int = _number(int, lambda v: v >= 1, ">= 1")
nonnegative_int = _number(int, lambda v: v >= 0, ">= 0")


def betas(text):
    """``"0.9,0.999"`` -> (0.9, 0.999), each in [0, 1)."""
    parts = text.replace(" ", "").split(",")
    try:
        values = tuple(float(p) for p in parts)
    except ValueError:
        values = ()
    if len(values) != 2 or not all(0 <= b < 1 for b in values):
        raise argparse.ArgumentTypeError(f"must be two numbers in [0, 1) like 0.9,0.999, got {text!r}")
    return values


def _name_list(valid, what):
    def parse(text):
        names = [n.strip() for n in text.split(",") if n.strip()]
        unknown = [n for n in names if n not in valid]
        if unknown or not names:
            raise argparse.ArgumentTypeError(f"unknown {what} {', '.join(map(repr, unknown)) or '(none given)'}; "
                                             f"choose from {', '.join(valid)}")
        if len(set(names)) != len(names):
            raise argparse.ArgumentTypeError(f"{what} listed twice in {text!r}")
        return names
    return parse


# the optimizer hyper-parameter flags: flag -> argparse keywords; every default is None, which
# means "the optimizer's own default" (a flag the chosen optimizer does not take is an error)
HYPER_FLAGS = {
    "--momentum": dict(type=nonnegative_float, help="momentum factor (sgd, rmsprop, lars; the presets momentum, "
                                                     "nesterov and lars use 0.9)"),
    "--dampening": dict(type=unit_float, help="dampening of the momentum (sgd, lars)"),
    "--nesterov": dict(action="store_true", help="Nesterov momentum (sgd, lars; needs --momentum > 0)"),
    "--weight-decay": dict(type=nonnegative_float, help="L2 weight decay, never on biases or BatchNorm; decoupled "
                                                         "for adamw, whose default is 0.01"),
    "--decoupled-weight-decay": dict(action="store_true", help="decoupled (AdamW-style) weight decay (adam, "
                                                                "nadam, radam)"),
    "--l1": dict(type=nonnegative_float, help="L1 penalty strength, never on biases or BatchNorm (sgd, adam, adamw)"),
    "--l1-mode": dict(choices=("subgradient", "proximal"), help="L1 as a subgradient term, or a proximal soft "
                                                                "threshold that makes exact zeros"),
    "--betas": dict(type=betas, metavar="B1,B2", help="decay rates of the first and second moment (adam, adamw, "
                                                      "adamax, nadam, radam, lion, lamb)"),
    "--eps": dict(type=positive_float, help="term added to the denominator (adaptive methods)"),
    "--no-bias-correction": dict(dest="bias_correction", action="store_const", const=False,
                                 help="the lecture notes' \"Adam (almost)\": no bias correction (adam, adamw, lamb)"),
    "--amsgrad": dict(action="store_true", help="AMSGrad: use the maximum of the second moment (adam, adamw)"),
    "--alpha": dict(type=unit_float, help="smoothing constant of the squared-gradient average (rmsprop)"),
    "--centered": dict(action="store_true", help="centered RMSprop: normalize by the gradient's variance (rmsprop)"),
    "--rho": dict(type=unit_float, help="decay rate of the running averages (adadelta)"),
    "--lr-decay": dict(type=nonnegative_float, help="Adagrad's own decay: lr / (1 + (t-1) lr_decay) (adagrad)"),
    "--initial-accumulator-value": dict(type=nonnegative_float, metavar="VALUE",
                                        help="starting value of the squared-gradient sum (adagrad)"),
    "--momentum-decay": dict(type=nonnegative_float, metavar="PSI", help="momentum schedule constant (nadam)"),
    "--clamp-value": dict(type=positive_float, metavar="PHI", help="upper bound of ||p|| in the trust ratio (lamb)"),
    "--trust-coeff": dict(type=positive_float, metavar="ETA", help="trust coefficient (lars)"),
    "--trust-clip": dict(action="store_true", help="clip the trust ratio at 1 (lars)"),
    "--always-adapt": dict(action="store_true", help="adapt groups without weight decay too (lars)"),
}


def _add_training_args(p, compare):
    from .fullbatch import DEFAULT_ITERATIONS, DEFAULT_L2, FULL_BATCH_LR, MODEL, SECOND_ORDER
    from .train import DEFAULT_LR, MODELS, OPTIMIZER_NAMES, SCHEDULES, Config

    d = Config()
    names = OPTIMIZER_NAMES + SECOND_ORDER
    g = p.add_argument_group("optimizer")
    if compare:
        g.add_argument("--optimizers", type=_name_list(names, "optimizer"),
                       default="sgd,momentum,nesterov,adagrad,rmsprop,adam",
                       help=f"comma-separated, from {', '.join(names)} (default: %(default)s)")
        lr_help = "learning rate for EVERY optimizer (default: each its own, see below)"
    else:
        g.add_argument("--optimizer", "-o", choices=names, default=d.optimizer, metavar="NAME",
                       help=f"one of {', '.join(names)} (default: %(default)s); momentum = sgd "
                            "with momentum 0.9, nesterov = the same with Nesterov's correction; lars starts from "
                            "momentum 0.9 and weight decay 5e-4. Biases and BatchNorm get neither weight decay, "
                            "L1 nor a layer-wise trust ratio")
        lr_help = "learning rate (default: the optimizer's own, see below)"
    g.add_argument("--lr", type=positive_float, default=None, help=lr_help + "; the defaults: "
                   + ", ".join(f"{k} {v:g}" for k, v in DEFAULT_LR.items()))
    for flag, options in HYPER_FLAGS.items():
        g.add_argument(flag, default=None, **options)
    g.add_argument("--max-grad-norm", type=positive_float, default=None, metavar="NORM",
                   help="clip the gradient to this global L2 norm, fused into the step (default: no clipping)")
    g.add_argument("--nonfinite", choices=("propagate", "skip", "raise"), default=d.nonfinite,
                   help="a step whose gradient holds inf or NaN: propagate it (no check), skip the step, or stop; "
                        "skip and raise read the gradient norm on the host each step (default: %(default)s)")
    g.add_argument("--ema", type=_number(float, lambda v: 0 < v < 1, "in (0, 1)"), default=None,
                   metavar="DECAY", help="evaluate with an exponential moving average of the weights, updated "
                                         "after every step with decay min(DECAY, (1+k)/(10+k)) at update k, "
                                         "e.g. 0.999 (default: off)")

    s = p.add_argument_group("learning-rate schedule (t counts steps; an epoch is ceil(N / batch size) steps)")
    s.add_argument("--schedule", choices=SCHEDULES, default=d.schedule,
                   help="constant; step: lr * rate^floor(epoch / every); exp: lr * rate^(t / steps per epoch); "
                        "inverse_time: lr / (1 + (1/rate - 1) t / steps per epoch); cosine: to --final-lr at the "
                        "last step; warmup_cosine: linear warm-up, then cosine (default: %(default)s)")
    s.add_argument("--decay-rate", type=decay_factor, default=d.decay_rate, metavar="RATE",
                   help="step: factor per drop; exp and inverse_time: factor after one epoch (default: %(default)s)")
    s.add_argument("--decay-every", type=positive_int, default=None, metavar="EPOCHS",
                   help="step: epochs between drops (default: a third of --epochs)")
    s.add_argument("--warmup-steps", type=positive_int, default=None, metavar="STEPS",
                   help="warmup_cosine: steps of linear warm-up (default: 5%% of all steps)")
    s.add_argument("--final-lr", type=nonnegative_float, default=d.final_lr, metavar="LR",
                   help="cosine, warmup_cosine: lr at the last step (default: %(default)s)")

    r = p.add_argument_group("run")
    r.add_argument("--model", "-m", choices=MODELS + (MODEL,), default=None,
                   help=f"mlp: one hidden layer; conv: two conv+BatchNorm blocks; {MODEL}: softmax regression, "
                        f"full batch (see below) (default: {d.model}, or {MODEL} when lbfgs or newton is named)")
    r.add_argument("--batch-size", "-b", type=positive_int, default=d.batch_size, metavar="N",
                   help="examples per step (default: %(default)s)")
    r.add_argument("--epochs", "-e", type=positive_int, default=d.epochs, metavar="N",
                   help="passes over the training set (default: %(default)s)")
    r.add_argument("--seed", type=nonnegative_int, default=d.seed,
                   help="initial weights, batch order and dropout (default: %(default)s)")
    r.add_argument("--device", choices=("auto", "cpu", "cuda"), default=d.device,
                   help="auto: cuda when CuPy sees a GPU, else cpu (default: %(default)s)")
    r.add_argument("--dtype", choices=("float32", "float64"), default=None,
                   help=f"(default: {d.dtype}; float64 for --model {MODEL}, whose targets are relative 1e-6)")
    r.add_argument("--threads", "--kernel-threads", dest="threads", type=positive_int, default=d.threads,
                   metavar="N", help="CPU threads of NumPy's BLAS and of fastopt's kernels while training, both "
                                     "(default: %(default)s: these small products gain little from a second "
                                     "thread, and pools that spin on shared cores slowed epochs 10-20x)")
    r.add_argument("--data", default=None, metavar="PATH",
                   help="MNIST: a folder with the four IDX files (raw or .gz) or an .npz with x_train, y_train, "
                        "x_test, y_test (default: scikit-learn's bundled 8x8 digits, fixed 80/20 split)")
    r.add_argument("--limit", type=positive_int, default=None, metavar="N",
                   help="use only the first N training and N test examples (quick trials)")
    r.add_argument("--out", default=f"runs/{'compare' if compare else 'train'}", metavar="DIR",
                   help="output folder: metrics.json, metrics.csv, loss.png, accuracy.png (default: %(default)s)")
    if not compare:
        r.add_argument("--checkpoint", action="store_true",
                       help="save model and optimizer state to DIR after every epoch (atomic)")
        r.add_argument("--resume", action="store_true",
                       help="continue the run checkpointed in DIR, bit for bit; the other flags must match "
                            "(--epochs may grow unless the schedule spans the run: cosine, warmup_cosine, step "
                            "without --decay-every); keeps checkpointing")
    r.add_argument("--no-progress", dest="progress", action="store_false",
                   help="no progress bar (it is also off when stderr is not a terminal)")

    f = p.add_argument_group(f"full batch (--model {MODEL})", """\
f(W) = mean cross-entropy of softmax(x W) + L2/2 |W|^2, x the flattened standardized image
and a 1 (bias). Every optimizer starts from W = 0 and sees the whole training split each
iteration; loss.png plots f - f* per iteration, loss_calls.png per closure call, f* from
scipy's L-BFGS-B. --epochs, --batch-size and --seed do not apply.""")
    f.add_argument("--l2", type=positive_float, default=None,
                   help=f"L2 strength, bias included (default: {DEFAULT_L2:g})")
    f.add_argument("--iterations", type=positive_int, default=None, metavar="N",
                   help=f"iterations per optimizer (default: {DEFAULT_ITERATIONS}): a first-order method makes "
                        "one update from one gradient, lbfgs one two-loop direction and strong-Wolfe line search, "
                        "newton one damped Newton step with the exact Hessian; full-batch lr defaults: "
                        + ", ".join(f"{k} {v:g}" for k, v in FULL_BATCH_LR.items()) + ", lbfgs 1 (its initial "
                        "step), the others as above")


def build_parser():
    from .valley import LECTURE_OPTIMIZERS
    from .valley import OPTIMIZERS as VALLEY_OPTIMIZERS

    p = _Parser(prog="fastopt", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXAMPLES,
                description="Train small nets with fastopt's fused optimizers, compare the optimizers, "
                            "and draw their paths on the lecture notes' test problems.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    t = sub.add_parser("train", help="train one model (default: conv net + Adam on the digits)",
                       description="Train one model and write metrics.json, metrics.csv, loss.png and "
                                   "accuracy.png in --out.",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXAMPLES)
    _add_training_args(t, compare=False)
    c = sub.add_parser("compare", help="train the same model with several optimizers, plot their curves",
                       description="Train the same model from the same initial weights, on the same batches, "
                                   "with each optimizer; write loss.png (log scale), accuracy.png, metrics.json "
                                   "and metrics.csv in --out and print a table. Hyper-parameter flags apply to "
                                   "the optimizers that take them.",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXAMPLES)
    _add_training_args(c, compare=True)
    v = sub.add_parser("valley", help="optimizer trajectories on a narrow valley and on Rosenbrock",
                       description="Run the optimizers on the badly conditioned quadratic (x^2 + 50 y^2) / 2 and "
                                   "on Rosenbrock's function, draw their paths (valley.png) and print a table.")
    names = tuple(VALLEY_OPTIMIZERS)
    v.add_argument("--optimizers", type=_name_list(names, "optimizer"), default=",".join(LECTURE_OPTIMIZERS),
                   help=f"comma-separated, from {', '.join(names)} (default: %(default)s)")
    v.add_argument("--steps", type=positive_int, default=None,
                   help="steps per problem (default: quadratic 100, Rosenbrock 2000)")
    v.add_argument("--out", default="runs/valley", metavar="DIR", help="output folder (default: %(default)s)")
    b = sub.add_parser("bench", help="time one fused Adam step on many parameters, checked against NumPy",
                       description="One fused Adam step on N float32 parameters, timed, on the GPU when CuPy sees "
                                   "one, else on the CPU, checked against the float64 NumPy reference.")
    b.add_argument("-n", type=positive_int, default=10_000_000, help="number of parameters, e.g. 1e6 or 1000000 "
                                                                      "(default: 1e7)")
    b.add_argument("--steps", type=positive_int, default=20, help="timed steps (default: %(default)s)")
    b.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="(default: %(default)s)")
    return p


# -- commands ----------------------------------------------------------------------------------
def _config(args):
    from .fullbatch import MODEL, SECOND_ORDER
    from .train import HYPER_FLAG_NAMES, Config
    hyper = {k: getattr(args, k) for k in HYPER_FLAG_NAMES if getattr(args, k, None) is not None}
    fields = {k: getattr(args, k) for k in Config.__dataclass_fields__ if k != "hyper" and hasattr(args, k)}
    if fields["model"] is None:  # not given: the full-batch model when a second-order method is named
        named = getattr(args, "optimizers", None) or [args.optimizer]
        fields["model"] = MODEL if set(named) & set(SECOND_ORDER) else Config.model
    if fields["dtype"] is None:
        fields["dtype"] = "float64" if fields["model"] == MODEL else Config.dtype
    return Config(**fields, hyper=hyper)


def cmd_train(args):
    from .train import train
    train(_config(args))
    return 0


def cmd_compare(args):
    from .plots import format_table
    from .train import compare
    metrics = compare(_config(args), args.optimizers)
    print()
    print(format_table(metrics["table"]["rows"], metrics["table"]["headers"]))
    files = metrics.get("files", ["loss.png", "accuracy.png", "metrics.json", "metrics.csv"])
    print(f"\nwrote {args.out}/{files[0]}, {', '.join(files[1:])}")
    return 0


def cmd_valley(args):
    import json
    from pathlib import Path

    from .plots import format_table
    from .valley import TABLE_HEADERS, plot_valley
    t0 = time.perf_counter()
    path, rows = plot_valley(Path(args.out) / "valley.png", optimizers=args.optimizers, steps=args.steps)
    print(format_table(rows, TABLE_HEADERS))
    records = [dict(zip(("problem", "optimizer", "final_loss", "distance_to_minimum"), r)) for r in rows]
    from .train import _json_safe
    text = json.dumps(_json_safe({"command": "valley", "rows": records}), indent=1)
    atomic_write(Path(args.out) / "metrics.json", lambda f: f.write(text.encode()))
    print(f"\nwrote {path} and metrics.json in {time.perf_counter() - t0:.1f} s")
    return 0


def cmd_bench(args):
    """The fused Adam step, timed (the former ``python -m fastopt`` demo)."""
    import numpy as np

    from .functional import adam_
    from .kernels.adam import adam_reference
    from .train import resolve_device

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
    from .train import UsageError

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
