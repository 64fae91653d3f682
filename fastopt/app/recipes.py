"""What the training application trains with what: its models, its optimizer names (the
classes of ``fastopt.OPTIMIZERS`` and a few presets), their default learning rates, the
learning-rate schedules, and the optimizer hyper-parameters the command line offers, derived
from the rules' declarations (``cls.rule.hyper``): a rule that gains an option gains its flag.

    make_optimizer(cfg, model, steps_per_epoch)   -> (optimizer, EMA or None)
"""
import inspect
import math
from dataclasses import dataclass

import numpy as np

from .. import nn, schedules
from ..averaging import EMA
from ..optimizers import OPTIMIZERS
from .config import UsageError

MODELS = ("mlp", "conv")

# CLI name -> (class name, hyper-parameters it starts from; flags override them): the lecture
# notes' SGD variants, and LARS as it is used (with momentum and weight decay: without weight
# decay timm's LARS does not adapt, and is plain SGD)
PRESETS = {"momentum": ("sgd", {"momentum": 0.9}), "nesterov": ("sgd", {"momentum": 0.9, "nesterov": True}),
           "lars": ("lars", {"momentum": 0.9, "weight_decay": 5e-4})}
OPTIMIZER_NAMES = tuple(OPTIMIZERS) + tuple(k for k in PRESETS if k not in OPTIMIZERS)

# learning rate per optimizer when none is given: the best of a 3-point grid on the digits (10 epochs,
# batch 32, conv and MLP, 2 seeds; momentum's effective step is lr / (1 - 0.9), 10x its lr)
DEFAULT_LR = {"sgd": 0.1, "momentum": 0.03, "nesterov": 0.03, "adagrad": 0.03, "rmsprop": 1e-3, "adam": 3e-3,
              "adamw": 3e-3, "adamax": 6e-3, "nadam": 3e-3, "radam": 1e-2, "adadelta": 1.0, "lion": 3e-4,
              "lamb": 3e-3, "lars": 1.0}

SCHEDULES = ("constant", "step", "exp", "inverse_time", "cosine", "warmup_cosine")

REGULARIZERS = ("weight_decay", "l1")
# what biases and BatchNorm's gamma and beta get instead of the weights' settings: no penalty, and
# no layer-wise trust ratio (LAMB; LARS adapts only groups with weight decay)
EXEMPT = {"weight_decay": 0.0, "l1": 0.0, "layer_adaptation": False, "always_adapt": False}


# -- precision ---------------------------------------------------------------------------------
#: --precision: the params' storage dtype (None: --dtype's)
PRECISIONS = {"fp32": None, "bf16": "bfloat16", "fp16": "float16"}
STATE_DTYPES = ("float32", "bfloat16", "float16")


def precision_options(cfg):
    """The optimizer's precision keywords the run sets (none by default: every optimizer takes
    the defaults, LBFGS and Newton too)."""
    state_dtype = cfg.state_dtype
    if state_dtype is None and cfg.precision == "fp16":
        # float16 flushes squared gradients below 6e-8 to zero: Adam's step then divides by eps
        # alone (measured: params at 768 after two steps on the digits); bfloat16's range has no such gap
        state_dtype = "float32"
    options = {"master_weights": cfg.master_weights, "stochastic_rounding": cfg.stochastic_rounding,
               "state_dtype": state_dtype, "state_bits": cfg.state_bits, "state_code": cfg.state_code}
    return {k: v for k, v in options.items() if v}


#: ``fastopt compare``'s variants of an optimizer: ``NAME:VARIANT[:VARIANT...]``, e.g. ``adamw:bf16:sr``
VARIANTS = {"bf16": {"precision": "bf16"}, "fp16": {"precision": "fp16"}, "master": {"master_weights": True},
            "sr": {"stochastic_rounding": True}, "8bit": {"state_bits": 8},
            "8bit-dynamic": {"state_bits": 8, "state_code": "dynamic"},
            "state-bf16": {"state_dtype": "bfloat16"}, "state-fp32": {"state_dtype": "float32"}}


def split_variant(name):
    """``("adamw", {"precision": "bf16", "stochastic_rounding": True})`` for ``"adamw:bf16:sr"``:
    the optimizer and the settings its variant changes."""
    base, *variants = name.split(":")
    changes = {}
    for v in variants:
        clash = [k for k, value in VARIANTS[v].items() if k in changes and changes[k] != value]
        if clash:
            raise UsageError(f"--optimizers {name}: {v!r} sets {clash[0]} again (one value each)")
        changes.update(VARIANTS[v])
    return base, changes


def storage_dtype(cfg):
    """The model's ``storage`` for ``cfg.precision`` (None: ``cfg.dtype``), checked against --dtype."""
    storage = PRECISIONS[cfg.precision]
    if storage is not None and cfg.dtype != "float32":
        raise UsageError(f"--precision {cfg.precision} keeps the params in {storage} and computes in float32: "
                         f"drop --dtype {cfg.dtype}")
    if storage is None and (cfg.master_weights or cfg.stochastic_rounding):
        flag = "--master-weights" if cfg.master_weights else "--stochastic-rounding"
        raise UsageError(f"{flag} is for 16-bit params: add --precision bf16 or fp16")
    if cfg.state_code is not None and cfg.state_bits != 8:
        raise UsageError("--state-code chooses the code of 8-bit state: add --state-bits 8")
    return storage


# -- models ----------------------------------------------------------------------------------
def build_model(name, in_shape, n_classes, dtype=np.float32, device="cpu", seed=0, storage=None):
    """A model for images of ``in_shape`` (C, H, W) (an MLP also takes (D,)), sized for the 8x8
    digits and for 28x28 MNIST, its initial weights a function of ``seed``:

        mlp    Flatten, Linear(D, h), ReLU, Dropout(0.1), Linear(h, K)      h = 128 (D <= 256) or 256
        conv   [Conv3x3(16), BatchNorm, ReLU, MaxPool2] x2 (channels 16, 32), Flatten,
               Linear(32 (H/4)(W/4), 64), ReLU, Linear(64, K)
    """
    in_shape = tuple(int(d) for d in in_shape)
    if name == "mlp":
        d = math.prod(in_shape)
        hidden = 128 if d <= 256 else 256
        layers = [nn.Flatten(), nn.Linear(d, hidden), nn.ReLU(), nn.Dropout(0.1), nn.Linear(hidden, n_classes)]
    elif name == "conv":
        if len(in_shape) != 3 or min(in_shape[1:]) < 4:
            raise UsageError(f"--model conv needs images (C, H, W) of at least 4x4, got shape {in_shape}")
        c, h, w = in_shape
        layers = [nn.Conv2d(c, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
                  nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
                  nn.Flatten(), nn.Linear(32 * (h // 4) * (w // 4), 64), nn.ReLU(), nn.Linear(64, n_classes)]
    else:
        raise UsageError(f"--model must be one of {', '.join(MODELS)}, got {name!r}")
    try:
        return nn.Sequential(*layers, dtype=dtype, device=device, seed=seed, storage=storage)
    except ValueError as e:  # a storage the device cannot keep
        raise UsageError(f"--precision: {e}") from None


def describe_model(model):
    return f"{len(model.buffer)} tensors, {model.buffer.numel:,} parameters"


# -- optimizer names and their hyper-parameters -------------------------------------------------
def optimizer_class(name):
    """``(class, preset hyper-parameters)`` for a CLI optimizer name (PRESETS included)."""
    if name in PRESETS:
        base, preset = PRESETS[name]
        return OPTIMIZERS[base], dict(preset)
    if name not in OPTIMIZERS:
        raise UsageError(f"--optimizer must be one of {', '.join(OPTIMIZER_NAMES)}, got {name!r}")
    return OPTIMIZERS[name], {}


def accepted_hyper(cls):
    """The keyword hyper-parameters ``cls`` takes (besides params), with their defaults."""
    sig = inspect.signature(cls.__init__)
    return {k: p.default for k, p in sig.parameters.items()
            if k not in ("self", "params") and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}


# rule options that get no flag of their own: --lr sets lr (and a schedule can drive it);
# training minimizes its loss, so maximize would only make it diverge
NOT_FLAGS = ("lr", "maximize")


@dataclass(frozen=True)
class HyperOption:
    """One hyper-parameter as the command line offers it, gathered from every rule that
    declares it: ``kind`` from its defaults' type ("bool", "tuple" of ``size`` numbers, "str",
    "int" or "float"; a default of None is a number), ``defaults``: CLI optimizer name -> its
    default there (presets applied), ``checks``: the rules' checks of one value, ``doc``."""

    name: str
    kind: str
    size: int
    defaults: dict
    checks: tuple
    doc: str

    @property
    def flags(self):
        """``--name`` (a bool: sets it; off by default somewhere), ``--no-name`` (a bool on by
        default somewhere: clears it), or both."""
        flag = "--" + self.name.replace("_", "-")
        if self.kind != "bool":
            return (flag,)
        values = set(self.defaults.values())
        return (flag,) * (False in values) + ("--no-" + flag[2:],) * (True in values)


def _kind(defaults):
    values = [v for v in defaults if v is not None]
    if any(isinstance(v, bool) for v in values):
        return "bool", 0
    if any(isinstance(v, tuple) for v in values):
        return "tuple", max(len(v) for v in values if isinstance(v, tuple))
    if any(isinstance(v, str) for v in values):
        return "str", 0
    if values and all(isinstance(v, int) for v in values):
        return "int", 0
    return "float", 0


def hyper_options():
    """Name -> :class:`HyperOption` for every option of every optimizer (NOT_FLAGS aside), in
    the order the optimizers declare them."""
    found = {}
    for cli_name in OPTIMIZER_NAMES:
        cls, preset = optimizer_class(cli_name)
        for name, h in cls.rule.hyper.items():
            if name not in NOT_FLAGS:
                defaults, hypers = found.setdefault(name, ({}, []))
                defaults[cli_name] = preset.get(name, h.default)
                hypers.append(h)
    options = {}
    for name, (defaults, hypers) in found.items():
        kind, size = _kind([h.default for h in hypers])
        checks = tuple(dict.fromkeys(h.check for h in hypers if h.check is not None))
        doc = next((h.doc for h in hypers if h.doc), "")
        options[name] = HyperOption(name, kind, size, defaults, checks, doc)
    return options


HYPER = hyper_options()


def hyper_flag(name):
    """The flag that sets hyper-parameter ``name`` (for messages): its last (``--no-x`` for an
    option on by default)."""
    return HYPER[name].flags[-1] if name in HYPER else name


def optimizer_kwargs(name, lr, hyper, strict=True):
    """The constructor arguments of optimizer ``name``: its PRESETS values, then ``hyper``
    (only those the class takes; with ``strict`` an inapplicable one is an error), then lr."""
    cls, kwargs = optimizer_class(name)
    accepted = accepted_hyper(cls)
    for key, value in hyper.items():
        if value is None:
            continue
        if key in accepted:
            kwargs[key] = value
        elif strict:
            takes = ", ".join(hyper_flag(k) for k in accepted if k in HYPER)
            raise UsageError(f"{hyper_flag(key)} does not apply to {name} (it takes {takes})")
    kwargs["lr"] = effective_lr(name, lr)
    return cls, kwargs


def effective_lr(name, lr):
    """``lr``, or when it is None the default of optimizer ``name``: its DEFAULT_LR, or for an
    optimizer newer than that table its class's own default."""
    if lr is not None:
        return lr
    return DEFAULT_LR.get(name, accepted_hyper(optimizer_class(name)[0]).get("lr"))


# -- schedules ----------------------------------------------------------------------------------
def make_schedule(cfg, lr, steps_per_epoch):
    """``cfg.schedule`` as a callable of the step (or the float ``lr`` for "constant")."""
    total = cfg.epochs * steps_per_epoch
    try:
        if cfg.schedule == "constant":
            return lr
        if cfg.schedule == "step":
            every = cfg.decay_every or max(1, cfg.epochs // 3)
            return schedules.step_decay(lr, cfg.decay_rate, every * steps_per_epoch)
        if cfg.schedule == "exp":
            return schedules.exponential_decay(lr, -math.log(cfg.decay_rate) / steps_per_epoch)
        if cfg.schedule == "inverse_time":
            return schedules.inverse_time_decay(lr, (1 / cfg.decay_rate - 1) / steps_per_epoch)
        if cfg.schedule == "cosine":
            return schedules.cosine_decay(lr, total, final=cfg.final_lr)
        if cfg.schedule == "warmup_cosine":
            if cfg.warmup_steps is None and total < 2:  # the default warm-up: 5%, none in a one-step run
                return schedules.cosine_decay(lr, total, final=cfg.final_lr)
            warmup = cfg.warmup_steps if cfg.warmup_steps is not None else max(1, total // 20)
            return schedules.warmup_cosine(lr, warmup, total, final=cfg.final_lr)
    except ValueError as e:
        raise UsageError(f"--schedule {cfg.schedule}: {e}") from None
    raise UsageError(f"--schedule must be one of {', '.join(SCHEDULES)}, got {cfg.schedule!r}")


# -- the optimizer of a model --------------------------------------------------------------------
def param_groups(model, penalties, accepted, always_adapt=False):
    """Weight decay, L1 (``penalties``: name -> strength) and layer-wise adaptation on the
    weights (2 or more dimensions) only, not on biases or BatchNorm's gamma and beta: two groups
    of views of ``model.buffer``, or the buffer itself when none of these is on (one group:
    one fused launch per step). ``accepted``: the optimizer's keywords; ``always_adapt``: LARS
    adapts groups without weight decay too (the weights' group only)."""
    if not any(penalties.values()) and "layer_adaptation" not in accepted and not always_adapt:
        return model.buffer
    weights = [p for p in model.buffer.params if p.ndim >= 2]
    others = [p for p in model.buffer.params if p.ndim < 2]
    exempt = {k: v for k, v in EXEMPT.items() if k in accepted}
    return [{"params": weights}] + ([{"params": others, **exempt}] if others else [])


def make_optimizer(cfg, model, steps_per_epoch, name=None, strict=True):
    """``(optimizer, ema)`` for ``model`` (anything with a ``buffer``; ``ema`` None unless ``cfg.ema``)."""
    name = name or cfg.optimizer
    cls, kwargs = optimizer_kwargs(name, cfg.lr, cfg.hyper, strict)
    kwargs["lr"] = make_schedule(cfg, kwargs["lr"], steps_per_epoch)
    defaults = accepted_hyper(cls)
    penalties = {k: kwargs.get(k, defaults[k]) for k in REGULARIZERS if k in defaults}
    kwargs.update(max_grad_norm=cfg.max_grad_norm, nonfinite=cfg.nonfinite, **precision_options(cfg))
    try:
        opt = cls(param_groups(model, penalties, defaults, kwargs.get("always_adapt", False)), **kwargs)
    except (ValueError, TypeError) as e:  # TypeError: a params dtype the optimizer does not take
        raise UsageError(f"--optimizer {name}: {e}") from None
    if cfg.state_bits == 8 and not any(opt.states_needed(g) for g in opt.param_groups):
        # the library takes it (momentum may be turned on mid-run); a run cannot do that
        raise UsageError(f"--state-bits 8: --optimizer {name} keeps no state with these options "
                         "(sgd: add --momentum)")
    # warm-up (decay min(DECAY, (1 + k) / (10 + k)) at update k): without it the first weights,
    # which are random, keep a weight of DECAY^k in the average for thousands of steps
    ema = EMA(model.buffer, cfg.ema, warmup=True) if cfg.ema is not None else None
    return opt, ema
