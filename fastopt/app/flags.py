"""The command line's flags, in one table: each flag is declared once (its names, the commands
that take it, its help group, type, default and help) and every command that takes it gets
that one declaration. A flag whose default is CONFIG takes the :class:`Config` field's.

The optimizer hyper-parameter flags are not written here: they come from the rules'
declarations (``fastopt.OPTIMIZERS[name].rule.hyper``, gathered in ``recipes.HYPER``), one
flag per option, typed by its default (a number, a pair of numbers like ``--betas 0.9,0.999``,
a string, or a switch: ``--x`` where it is off by default, ``--no-x`` where it is on, both
where it is either), the rules' own checks applied to the value, and each optimizer's default
in the help. A rule that gains an option gains its flag.
"""
import argparse
import math
from dataclasses import dataclass, field

from .config import Config, UsageError
from .fullbatch import (
    DEFAULT_ITERATIONS,
    DEFAULT_L2,
    FULL_BATCH_LR,
    MODEL,
    SECOND_ORDER,
)
from .recipes import (
    DEFAULT_LR,
    EXEMPT,
    HYPER,
    MODELS,
    OPTIMIZER_NAMES,
    PRECISIONS,
    SCHEDULES,
    STATE_DTYPES,
    VARIANTS,
)
from .valley import LECTURE_OPTIMIZERS
from .valley import OPTIMIZERS as VALLEY_OPTIMIZERS

COMMANDS = ("train", "compare", "valley", "bench")
TRAINING = ("train", "compare")
CONFIG = object()  # a Flag's default: the Config field of the same name's


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
decay_factor = _number(float, lambda v: 0 < v <= 1, "in (0, 1]")
open_unit_float = _number(float, lambda v: 0 < v < 1, "in (0, 1)")
positive_int = _number(int, lambda v: v >= 1, ">= 1")
# bench's parameter count: its five float32/float64 arrays must fit in memory (1e9: about 28 GB)
bench_size = _number(int, lambda v: 1 <= v <= 10**9, "between 1 and 1e9")
nonnegative_int = _number(int, lambda v: v >= 0, ">= 0")
finite_float = _number(float, lambda v: True, "a finite number")
finite_int = _number(int, lambda v: True, "an integer")


def _name_list(valid, what, variants=()):
    """Comma-separated names from ``valid``, each followed by any ``:VARIANT`` of ``variants``."""
    def known(name):
        base, *rest = name.split(":")
        return base in valid and all(v in variants for v in rest)

    def parse(text):
        names = [n.strip() for n in text.split(",") if n.strip()]
        unknown = [n for n in names if not known(n)]
        if unknown or not names:
            raise argparse.ArgumentTypeError(
                f"unknown {what} {', '.join(map(repr, unknown)) or '(none given)'}; choose from {', '.join(valid)}"
                + (f", each optionally followed by :VARIANT from {', '.join(variants)}" if variants else ""))
        if len(set(names)) != len(names):
            raise argparse.ArgumentTypeError(f"{what} listed twice in {text!r}")
        return names
    return parse


# -- the table ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Flag:
    """One flag: ``names`` (the first long one names it), the ``commands`` that take it, its
    help ``group`` (train and compare only), ``help``, ``default`` (CONFIG: the Config field's;
    a callable: of the command) and any other argparse keywords in ``options``."""

    names: tuple
    commands: tuple
    group: str
    help: str
    default: object = CONFIG
    options: dict = field(default_factory=dict)

    @property
    def dest(self):
        if "dest" in self.options:
            return self.options["dest"]
        return next(n for n in self.names if n.startswith("--"))[2:].replace("-", "_")

    def default_for(self, command):
        if self.default is CONFIG:
            return getattr(Config, self.dest)
        return self.default(command) if callable(self.default) else self.default


def flag(*names, commands=TRAINING, group="run", help, default=CONFIG, **options):
    return Flag(names, tuple(commands), group, help, default, options)


GROUPS = {
    "optimizer": ("optimizer", None),
    "schedule": ("learning-rate schedule (t counts steps; an epoch is ceil(N / batch size) steps)", None),
    "precision": ("precision (storage of params, gradients and optimizer state)", None),
    "run": ("run", None),
    "full batch": (f"full batch (--model {MODEL})", """\
f(W) = mean cross-entropy of softmax(x W) + L2/2 |W|^2, x the flattened standardized image
and a 1 (bias). Every optimizer starts from W = 0 and sees the whole training split each
iteration; loss.png plots f - f* per iteration, loss_calls.png per closure call, f* from
scipy's L-BFGS-B. --epochs, --batch-size and --seed do not apply."""),
}

# -- the optimizer hyper-parameters, from the rules' declarations ------------------------------
# the app's wording of the options it knows (a switch as the thing it turns on or off); any
# other option is described by its rule's doc
DESCRIPTIONS = {
    "momentum": "momentum factor",
    "dampening": "dampening of the momentum",
    "nesterov": "Nesterov momentum (needs --momentum > 0)",
    "weight_decay": "L2 weight decay (decoupled for adamw)",
    "decoupled_weight_decay": "decoupled (AdamW-style) weight decay",
    "l1": "L1 penalty strength",
    "l1_mode": "L1 as a subgradient term (subgradient), or a proximal soft threshold that makes exact zeros "
               "(proximal)",
    "betas": "decay rates of the first and second moment",
    "eps": "term added to the denominator",
    "bias_correction": "the bias correction of the moments (without it: the lecture notes' \"Adam (almost)\")",
    "amsgrad": "AMSGrad: the maximum of the second moment",
    "alpha": "smoothing constant of the squared-gradient average",
    "centered": "centered RMSprop: normalization by the gradient's variance",
    "rho": "decay rate of the running averages",
    "lr_decay": "Adagrad's own decay: lr / (1 + (t-1) lr_decay)",
    "initial_accumulator_value": "starting value of the squared-gradient sum",
    "momentum_decay": "momentum schedule constant psi",
    "clamp_value": "upper bound of ||p|| in the trust ratio",
    "trust_coeff": "trust coefficient eta",
    "trust_clip": "clipping of the trust ratio at 1",
    "always_adapt": "trust ratios for weights without weight decay too (biases and BatchNorm never get one)",
    "layer_adaptation": "the layer-wise trust ratio",
}
NUMBER_WORDS = {1: "one", 2: "two", 3: "three", 4: "four"}


def hyper_dest(name):
    """The argparse destination of hyper-parameter ``name`` (apart from Config's fields)."""
    return f"hyper_{name}"


def _show(value):
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, tuple):
        return ",".join(_show(v) for v in value)
    if isinstance(value, float):
        return f"{value:g}"
    return "none" if value is None else str(value)


def _names(names):
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def hyper_help(option):
    """What the option is, which optimizers take it and each one's default."""
    text = DESCRIPTIONS.get(option.name)
    if text is None:  # the rule's own words, as they are
        text = option.doc or option.name.replace("_", " ")
    elif option.kind == "bool":
        flags = option.flags
        verb = "turn on or off" if len(flags) == 2 else "turn off" if flags[0].startswith("--no-") else "turn on"
        text = f"{verb} {text}"
    if option.name in EXEMPT:
        text += ", never on biases or BatchNorm"
    by_value = {}
    for name, value in option.defaults.items():
        by_value.setdefault(_show(value), []).append(name)
    common, *others = sorted(by_value.items(), key=lambda kv: -len(kv[1]))  # stable: first declared wins ties
    takers = "every optimizer" if len(option.defaults) == len(OPTIMIZER_NAMES) else ", ".join(option.defaults)
    defaults = f"default {common[0]}" + "".join(f", {value} for {_names(names)}" for value, names in others)
    return f"{text} ({takers}; {defaults})".replace("%", "%%")


def hyper_type(option):
    """The argparse type of a non-switch option: parsed by its kind, then every declaring
    rule's check (its message, as torch words it, follows the flag)."""
    def checked(value, what=None):
        for check in option.checks:
            try:
                check(value)
            except (ValueError, TypeError) as e:
                why = str(e)[:1].lower() + str(e)[1:]
                raise argparse.ArgumentTypeError(f"{what} ({why})" if what else why) from None
        return value

    if option.kind == "tuple":
        example = _show(next(v for v in option.defaults.values() if isinstance(v, tuple)))
        what = f"must be {NUMBER_WORDS.get(option.size, option.size)} numbers like {example}"

        def parse(text):
            try:
                values = tuple(float(p) for p in text.replace(" ", "").split(","))
            except ValueError:
                values = ()
            if len(values) != option.size or not all(map(math.isfinite, values)):
                raise argparse.ArgumentTypeError(f"{what}, got {text!r}")
            return checked(values, what)
    else:
        base = {"str": str, "int": finite_int}.get(option.kind, finite_float)

        def parse(text):
            return checked(base(text))
    parse.__name__ = option.kind
    return parse


def hyper_flags(options=HYPER):
    """One Flag per option of ``options`` (``recipes.HYPER``: every rule's); every default
    None: the optimizer's own."""
    flags = []
    for option in options.values():
        names, kwargs = option.flags, dict(dest=hyper_dest(option.name))
        if option.kind != "bool":
            kwargs.update(type=hyper_type(option), metavar=(
                ",".join(f"{option.name[0].upper()}{i + 1}" for i in range(option.size)) if option.kind == "tuple"
                else option.name.split("_")[-1].upper()))
        elif len(names) == 2:  # off by default for some optimizers, on for others
            names, kwargs["action"] = names[:1], argparse.BooleanOptionalAction
        else:
            kwargs.update(action="store_const", const=not names[0].startswith("--no-"))
        flags.append(Flag(names, TRAINING, "optimizer", hyper_help(option), None, kwargs))
    return flags


HYPER_FLAGS = {name: option.name for option in HYPER.values() for name in option.flags}

# -- every flag -----------------------------------------------------------------------------------
TRAINING_OPTIMIZERS = OPTIMIZER_NAMES + SECOND_ORDER
FLAGS = [
    # valley and bench
    flag("--optimizers", commands=["valley"], type=_name_list(tuple(VALLEY_OPTIMIZERS), "optimizer"),
         default=",".join(LECTURE_OPTIMIZERS),
         help=f"comma-separated, from {', '.join(VALLEY_OPTIMIZERS)} (default: %(default)s)"),
    flag("--steps", commands=["valley"], type=positive_int, default=None,
         help="steps per problem (default: quadratic 100, Rosenbrock 2000)"),
    flag("-n", commands=["bench"], type=bench_size, default=10_000_000,
         help="number of parameters, e.g. 1e6 or 1000000 (default: 1e7)", dest="n"),
    flag("--steps", commands=["bench"], type=positive_int, default=20, help="timed steps (default: %(default)s)"),
    # the optimizer
    flag("--optimizer", "-o", commands=["train"], group="optimizer", choices=TRAINING_OPTIMIZERS, metavar="NAME",
         help=f"one of {', '.join(TRAINING_OPTIMIZERS)} (default: %(default)s); momentum = sgd "
              "with momentum 0.9, nesterov = the same with Nesterov's correction; lars starts from "
              "momentum 0.9 and weight decay 5e-4. Biases and BatchNorm get neither weight decay, "
              "L1 nor a layer-wise trust ratio"),
    flag("--optimizers", commands=["compare"], group="optimizer",
         type=_name_list(TRAINING_OPTIMIZERS, "optimizer", tuple(VARIANTS)),
         default="sgd,momentum,nesterov,adagrad,rmsprop,adam",
         help=f"comma-separated, from {', '.join(TRAINING_OPTIMIZERS)}; a name may be followed by variants "
              f"(:{', :'.join(VARIANTS)}), e.g. adamw,adamw:bf16,adamw:bf16:sr,adamw:8bit runs AdamW in fp32, "
              "with bf16 params rounded to nearest, with stochastic rounding and with 8-bit state, side by side "
              "(default: %(default)s)"),
    flag("--lr", group="optimizer", type=positive_float,
         help="learning rate, in compare the same for every optimizer (default: each optimizer's own: "
              + ", ".join(f"{k} {v:g}" for k, v in DEFAULT_LR.items()) + ")"),
    *hyper_flags(),
    flag("--max-grad-norm", group="optimizer", type=positive_float, metavar="NORM",
         help="clip the gradient to this global L2 norm, fused into the step (default: no clipping)"),
    flag("--nonfinite", group="optimizer", choices=("propagate", "skip", "raise"),
         help="a step whose gradient holds inf or NaN: propagate it (no check), skip the step, or stop; "
              "on CUDA skip is decided on the device, raise reads the norm on the host each step "
              "(default: %(default)s)"),
    flag("--precision", group="precision", choices=tuple(PRECISIONS),
         help="the dtype the params and gradients are kept in: fp32 (--dtype), bf16 or fp16; the layers compute "
              "in float32 on a copy, the optimizer updates the 16-bit params in place (default: %(default)s)"),
    flag("--master-weights", group="precision", action="store_true",
         help="bf16/fp16: the optimizer keeps a float32 copy of the params, updates it and writes the rounded "
              "params in the same pass (default: off)"),
    flag("--stochastic-rounding", group="precision", action="store_true",
         help="bf16/fp16 without master weights: round the written params (and 16-bit state) stochastically, "
              "so that updates smaller than the params' spacing are kept on average (default: off)"),
    flag("--state-dtype", group="precision", choices=STATE_DTYPES,
         help="the optimizer state's dtype (default: the params', but float32 with --precision fp16, whose "
              "range flushes small squared gradients to zero)"),
    flag("--state-bits", group="precision", type=int, choices=(8,),
         help="8: 8-bit blockwise optimizer state (adam, adamw, lion, sgd with momentum, rmsprop; tensors below "
              "4096 elements keep 32-bit state) (default: 32-bit)"),
    flag("--state-code", group="precision", choices=("fp8", "dynamic"),
         help="with --state-bits 8, the 8-bit code: fp8 (an exponent/mantissa code computed with bit operations) "
              "or dynamic (Dettmers et al.'s dynamic tree map, searched) (default: fp8)"),
    flag("--ema", group="optimizer", type=open_unit_float, metavar="DECAY",
         help="evaluate with an exponential moving average of the weights, updated after every step with "
              "decay min(DECAY, (1+k)/(10+k)) at update k, e.g. 0.999 (default: off)"),
    # the schedule
    flag("--schedule", group="schedule", choices=SCHEDULES,
         help="constant; step: lr * rate^floor(epoch / every); exp: lr * rate^(t / steps per epoch); "
              "inverse_time: lr / (1 + (1/rate - 1) t / steps per epoch); cosine: to --final-lr at the "
              "last step; warmup_cosine: linear warm-up, then cosine (default: %(default)s)"),
    flag("--decay-rate", group="schedule", type=decay_factor, metavar="RATE", default=None,
         help=f"step: factor per drop; exp and inverse_time: factor after one epoch (default: {Config.decay_rate})"),
    flag("--decay-every", group="schedule", type=positive_int, metavar="EPOCHS",
         help="step: epochs between drops (default: a third of --epochs)"),
    flag("--warmup-steps", group="schedule", type=positive_int, metavar="STEPS",
         help="warmup_cosine: steps of linear warm-up (default: 5%% of all steps)"),
    flag("--final-lr", group="schedule", type=nonnegative_float, metavar="LR", default=None,
         help=f"cosine, warmup_cosine: lr at the last step (default: {Config.final_lr})"),
    # the run
    flag("--model", "-m", choices=(*MODELS, MODEL), default=None,
         help=f"mlp: one hidden layer; conv: two conv+BatchNorm blocks; {MODEL}: softmax regression, full batch "
              f"(see below) (default: {Config.model}, or {MODEL} when lbfgs or newton is named)"),
    flag("--batch-size", "-b", type=positive_int, metavar="N", help="examples per step (default: %(default)s)"),
    flag("--epochs", "-e", type=positive_int, metavar="N", help="passes over the training set (default: %(default)s)"),
    flag("--seed", type=nonnegative_int, help="initial weights, batch order and dropout (default: %(default)s)"),
    flag("--device", commands=["train", "compare", "bench"], choices=("auto", "cpu", "cuda"),
         help="auto: cuda when CuPy sees a GPU, else cpu (default: %(default)s)"),
    flag("--dtype", choices=("float32", "float64"), default=None,
         help=f"(default: {Config.dtype}; float64 for --model {MODEL}, whose targets are relative 1e-6)"),
    flag("--threads", "--kernel-threads", type=positive_int, metavar="N",
         help="CPU threads of NumPy's BLAS and of fastopt's kernels while training, both (default: %(default)s: "
              "these small products gain little from a second thread, and pools that spin on shared cores "
              "slowed epochs 10-20x)"),
    flag("--data", metavar="PATH",
         help="MNIST: a folder with the four IDX files (raw or .gz) or an .npz with x_train, y_train, x_test, "
              "y_test (default: scikit-learn's bundled 8x8 digits, fixed 80/20 split)"),
    flag("--limit", type=positive_int, metavar="N",
         help="use only the first N training and N test examples (quick trials)"),
    flag("--out", commands=["train", "compare", "valley"], metavar="DIR", default=lambda command: f"runs/{command}",
         help="output folder: metrics.json, metrics.csv and the pictures (valley: metrics.json and valley.png) "
              "(default: %(default)s)"),
    flag("--checkpoint", commands=["train"], action="store_true",
         help="save model and optimizer state to DIR after every epoch (atomic)"),
    flag("--resume", commands=["train"], action="store_true",
         help="continue the run checkpointed in DIR, bit for bit; the other flags must match (--epochs may grow "
              "unless the schedule spans the run: cosine, warmup_cosine, step without --decay-every); keeps "
              "checkpointing"),
    flag("--distributed", commands=["train"], action="store_true",
         help="data parallel over MPI: run as mpiexec -n R fastopt train ...; each rank takes its slice of every "
              "batch, the optimizer state is sharded over the ranks, rank 0 alone prints and writes (default: on "
              "when mpiexec starts more than one rank; needs pip install \"fastopt[mpi]\")"),
    flag("--no-progress", dest="progress", action="store_false",
         help="no progress bar (it is also off when stderr is not a terminal)"),
    # full batch
    flag("--l2", group="full batch", type=positive_float, help=f"L2 strength, bias included (default: {DEFAULT_L2:g})"),
    flag("--iterations", group="full batch", type=positive_int, metavar="N",
         help=f"iterations per optimizer (default: {DEFAULT_ITERATIONS}): a first-order method makes one update "
              "from one gradient, lbfgs one two-loop direction and strong-Wolfe line search, newton one damped "
              "Newton step with the exact Hessian; full-batch lr defaults: "
              + ", ".join(f"{k} {v:g}" for k, v in FULL_BATCH_LR.items()) + ", lbfgs 1 (its initial step), "
              "the others as above"),
]


def _check_table(flags):
    """No command gets one name twice (a flag declared once per meaning)."""
    for command in COMMANDS:
        names = [n for f in flags if command in f.commands for n in f.names]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise AssertionError(f"fastopt {command}: flag(s) {', '.join(twice)} declared twice")


_check_table(FLAGS)


def add_flags(parser, command):
    """Every flag of ``command`` on ``parser``; train and compare get them in their help groups."""
    groups = {}
    for f in FLAGS:
        if command not in f.commands:
            continue
        target = parser
        if command in TRAINING:
            if f.group not in groups:
                groups[f.group] = parser.add_argument_group(*GROUPS[f.group])
            target = groups[f.group]
        target.add_argument(*f.names, default=f.default_for(command), help=f.help, **f.options)


#: the schedule flags and the schedules they shape (parsed with default None, so that one given
#: to a schedule it does not shape is an error rather than a setting nothing reads)
SCHEDULE_FLAGS = {"decay_rate": ("step", "exp", "inverse_time"), "decay_every": ("step",),
                  "warmup_steps": ("warmup_cosine",), "final_lr": ("cosine", "warmup_cosine")}


def config_from_args(args):
    """The Config of parsed train or compare arguments: hyper-parameters only where given, the
    model logreg when lbfgs or newton is named without --model, float64 for it."""
    hyper = {name: getattr(args, hyper_dest(name)) for name in HYPER
             if getattr(args, hyper_dest(name), None) is not None}
    fields = {k: getattr(args, k) for k in Config.__dataclass_fields__ if k != "hyper" and hasattr(args, k)}
    schedule = fields.get("schedule", Config.schedule)
    for name, shaped in SCHEDULE_FLAGS.items():
        if fields.get(name) is None:
            fields.pop(name, None)  # not given: the Config's default
        elif schedule not in shaped:
            raise UsageError(f"--{name.replace('_', '-')} shapes the {', '.join(shaped)} schedule"
                             f"{'s' if len(shaped) > 1 else ''}, not --schedule {schedule}")
    if fields["model"] is None:
        named = getattr(args, "optimizers", None) or [args.optimizer]
        fields["model"] = MODEL if set(named) & set(SECOND_ORDER) else Config.model
    if fields["dtype"] is None:
        fields["dtype"] = "float64" if fields["model"] == MODEL else Config.dtype
    return Config(**fields, hyper=hyper)
