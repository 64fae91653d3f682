"""The training loop behind ``fastopt train`` and ``fastopt compare``.

One code path for both devices: the data set is standardized on the host (statistics of the
training split), moved to the device once, and every step runs there: the nn core's
forward and backward, the loss, and the fused optimizer step over ``model.buffer`` (one
launch). Per-step losses and the running count of correct predictions stay on the device
and are fetched once per epoch; the progress bar fetches them only when it redraws.

Reproducibility: the initial weights are a function of ``seed``; the order of the batches
in epoch ``e`` and the Dropout masks are functions of ``(seed, e)``. So a run resumed from
the checkpoint of epoch ``e`` (optimizer state and step, parameters, BatchNorm statistics)
replays epochs ``e+1, ...`` bit for bit, on the device it was saved on. A resume on the other
device is allowed and continues the run, but not bit for bit (other kernels, other rounding).

    cfg = Config(model="mlp", optimizer="sgd", lr=0.1, hyper={"momentum": 0.9}, epochs=20)
    metrics = train(cfg)      # writes cfg.out/metrics.json, metrics.csv, loss.png, accuracy.png
"""
import contextlib
import csv
import dataclasses
import inspect
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

import fastopt

from . import nn, schedules
from .checkpoint import atomic_write
from .data import DataError, batches, load_digits, load_mnist
from .nn._array import array_module, to_numpy
from .optimizers import OPTIMIZERS
from .plots import centred_mean, plot_accuracy, plot_curves
from .preprocessing import Standardize

MODELS = ("mlp", "conv")
DIGITS_SPLIT_SEED = 0  # one fixed train/test split: runs with different --seed see the same test set

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
# seconds: the whole epoch, evaluation included; examples_per_s: training examples over the training time
EPOCH_FIELDS = ("epoch", "train_loss", "train_acc", "test_loss", "test_acc", "lr", "seconds", "train_seconds",
                "examples_per_s")
CLOCK_FIELDS = ("seconds", "train_seconds", "examples_per_s")  # all that differs between two runs of one config
CHECKPOINT = "checkpoint.npz"  # model, optimizer, EMA and progress: one file, one atomic rename
CHECKPOINT_FORMAT = "fastopt-train-checkpoint-2"
# config fields a resumed run may change (everything else must match the checkpoint's run);
# a changed device continues the run, but not bit for bit
RESUMABLE_CHANGES = ("epochs", "out", "progress", "checkpoint", "resume", "device", "threads")


class UsageError(ValueError):
    """A bad combination of settings; the message names the flag (the CLI prints it as one line)."""


@dataclass
class Config:
    """Every setting of a training run (the CLI flags, with their defaults). The defaults (conv,
    Adam at 3e-3, batch 32, 15 epochs) reach about 98% test accuracy on the digits."""

    model: str = "conv"
    optimizer: str = "adam"
    lr: float = None              # None: DEFAULT_LR[optimizer]
    hyper: dict = field(default_factory=dict)  # optimizer hyper-parameters given explicitly (momentum, betas...)
    schedule: str = "constant"
    warmup_steps: int = None      # warmup_cosine: None = 5% of the steps
    decay_rate: float = 0.5       # step: factor per drop; exp, inverse_time: factor after one epoch
    decay_every: int = None       # step: epochs between drops; None = a third of the epochs
    final_lr: float = 0.0         # cosine, warmup_cosine: the lr at the last step
    max_grad_norm: float = None
    nonfinite: str = "propagate"  # the optimizer's guard: skip and raise read a norm on the host every step
    ema: float = None
    batch_size: int = 32
    epochs: int = 15
    seed: int = 0
    device: str = "auto"
    dtype: str = "float32"
    threads: int = 1              # BLAS and Numba threads while training (see thread_limits)
    data: str = None              # None: scikit-learn's digits; else MNIST IDX folder or .npz
    limit: int = None             # use at most this many training and test examples
    l2: float = None              # model "logreg" (fastopt.fullbatch): L2 strength; None = DEFAULT_L2
    iterations: int = None        # model "logreg": full-batch iterations; None = DEFAULT_ITERATIONS
    out: str = "runs/train"
    checkpoint: bool = False
    resume: bool = False
    progress: bool = True

    def as_dict(self):
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()}


# -- device and data --------------------------------------------------------------------
def resolve_device(requested):
    """``(device, description)``: "auto" is "cuda" when CuPy imports and sees a GPU, else "cpu"."""
    if requested not in ("auto", "cpu", "cuda"):
        raise UsageError(f"--device must be auto, cpu or cuda, got {requested!r}")
    if requested == "cpu":
        return "cpu", "cpu (as asked)"
    try:
        import cupy
        count = cupy.cuda.runtime.getDeviceCount()
    except ImportError:
        why = "CuPy is not installed"
    except Exception as e:  # no driver, no device: CuPy raises its own runtime errors
        why = f"CuPy sees no GPU ({type(e).__name__})"
    else:
        if count > 0:
            name = cupy.cuda.runtime.getDeviceProperties(0)["name"]
            name = name.decode() if isinstance(name, bytes) else name
            return "cuda", f"cuda ({name}, CuPy {cupy.__version__}{', auto' if requested == 'auto' else ''})"
        why = "CuPy sees no GPU"
    if requested == "cuda":
        raise UsageError(f"--device cuda: {why} (in the fastopt checkout, on a machine with a GPU: "
                         'pip install -e ".[cuda]")')
    return "cpu", f"cpu (auto: {why})"


@dataclass
class Dataset:
    name: str
    x_train: object
    y_train: object
    x_test: object
    y_test: object
    n_classes: int

    @property
    def in_shape(self):
        return tuple(self.x_train.shape[1:])

    def to(self, device):
        """The same data on ``device`` (one transfer per array)."""
        if device == "cpu":
            return self
        import cupy
        arrays = [cupy.asarray(a) for a in (self.x_train, self.y_train, self.x_test, self.y_test)]
        return Dataset(self.name, *arrays, self.n_classes)


def load_dataset(path=None, limit=None, dtype=np.float32):
    """The digits (``path`` None) or MNIST from ``path``, images (N, 1, H, W) standardized per
    channel with the training split's mean and std, at most ``limit`` examples per split."""
    if path is None:
        name, (xtr, ytr, xte, yte) = "digits", load_digits(seed=DIGITS_SPLIT_SEED, dtype=dtype)
    else:
        name, (xtr, ytr, xte, yte) = f"mnist:{path}", load_mnist(os.path.expanduser(path), dtype=dtype)
    if limit is not None:
        xtr, ytr, xte, yte = xtr[:limit], ytr[:limit], xte[:limit], yte[:limit]
    if len(xtr) == 0 or len(xte) == 0:
        raise DataError(f"{path or 'digits'}: the train or test split is empty")
    scaler = Standardize(axis=(0, 2, 3)).fit(xtr)
    xtr, xte = scaler.transform(xtr).astype(dtype, copy=False), scaler.transform(xte).astype(dtype, copy=False)
    n_classes = int(max(ytr.max(), yte.max())) + 1
    return Dataset(name, np.ascontiguousarray(xtr), ytr, np.ascontiguousarray(xte), yte, n_classes)


# -- model -------------------------------------------------------------------------------
def build_model(name, in_shape, n_classes, dtype=np.float32, device="cpu", seed=0):
    """A model for images of ``in_shape`` (C, H, W) (an MLP also takes (D,)), sized for the 8x8
    digits and for 28x28 MNIST:

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
    return nn.Sequential(*layers, dtype=dtype, device=device, seed=seed)


# -- optimizer -----------------------------------------------------------------------------
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


# constructor keyword -> the CLI flag that sets it (for messages)
HYPER_FLAG_NAMES = {"momentum": "--momentum", "dampening": "--dampening", "nesterov": "--nesterov",
                    "weight_decay": "--weight-decay", "betas": "--betas", "eps": "--eps", "alpha": "--alpha",
                    "rho": "--rho", "amsgrad": "--amsgrad", "centered": "--centered", "lr_decay": "--lr-decay",
                    "initial_accumulator_value": "--initial-accumulator-value",
                    "momentum_decay": "--momentum-decay", "decoupled_weight_decay": "--decoupled-weight-decay",
                    "bias_correction": "--no-bias-correction", "l1": "--l1", "l1_mode": "--l1-mode",
                    "trust_coeff": "--trust-coeff", "trust_clip": "--trust-clip", "always_adapt": "--always-adapt",
                    "clamp_value": "--clamp-value"}


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
            takes = ", ".join(HYPER_FLAG_NAMES[k] for k in accepted if k in HYPER_FLAG_NAMES)
            raise UsageError(f"{HYPER_FLAG_NAMES.get(key, key)} does not apply to {name} (it takes {takes})")
    kwargs["lr"] = effective_lr(name, lr)
    return cls, kwargs


def effective_lr(name, lr):
    """``lr``, or when it is None the default of optimizer ``name``: its DEFAULT_LR, or for an
    optimizer newer than that table its class's own default."""
    if lr is not None:
        return lr
    return DEFAULT_LR.get(name, accepted_hyper(optimizer_class(name)[0]).get("lr"))


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
            warmup = cfg.warmup_steps if cfg.warmup_steps is not None else max(1, total // 20)
            return schedules.warmup_cosine(lr, warmup, total, final=cfg.final_lr)
    except ValueError as e:
        raise UsageError(f"--schedule {cfg.schedule}: {e}") from None
    raise UsageError(f"--schedule must be one of {', '.join(SCHEDULES)}, got {cfg.schedule!r}")


REGULARIZERS = ("weight_decay", "l1")
# what biases and BatchNorm's gamma and beta get instead of the weights' settings: no penalty, and
# no layer-wise trust ratio (LAMB; LARS adapts only groups with weight decay)
EXEMPT = {"weight_decay": 0.0, "l1": 0.0, "layer_adaptation": False}


def param_groups(model, penalties, accepted):
    """Weight decay, L1 (``penalties``: name -> strength) and layer-wise adaptation on the
    weights (2 or more dimensions) only, not on biases or BatchNorm's gamma and beta: two groups
    of views of ``model.buffer``, or the buffer itself when none of these is on (one group:
    one fused launch per step). ``accepted``: the optimizer's keywords."""
    if not any(penalties.values()) and "layer_adaptation" not in accepted:
        return model.buffer
    weights = [p for p in model.buffer.params if p.ndim >= 2]
    others = [p for p in model.buffer.params if p.ndim < 2]
    exempt = {k: v for k, v in EXEMPT.items() if k in accepted}
    return [{"params": weights}] + ([{"params": others, **exempt}] if others else [])


def make_optimizer(cfg, model, steps_per_epoch, name=None, strict=True):
    """``(optimizer, ema)`` for ``model`` (``ema`` None unless ``cfg.ema``)."""
    name = name or cfg.optimizer
    cls, kwargs = optimizer_kwargs(name, cfg.lr, cfg.hyper, strict)
    kwargs["lr"] = make_schedule(cfg, kwargs["lr"], steps_per_epoch)
    defaults = accepted_hyper(cls)
    penalties = {k: kwargs.get(k, defaults[k]) for k in REGULARIZERS if k in defaults}
    kwargs.update(max_grad_norm=cfg.max_grad_norm, nonfinite=cfg.nonfinite)
    try:
        opt = cls(param_groups(model, penalties, defaults), **kwargs)
    except ValueError as e:
        raise UsageError(f"--optimizer {name}: {e}") from None
    # warm-up (decay min(DECAY, (1 + k) / (10 + k)) at update k): without it the first weights,
    # which are random, keep a weight of DECAY^k in the average for thousands of steps
    ema = fastopt.EMA(model.buffer, cfg.ema, warmup=True) if cfg.ema is not None else None
    return opt, ema


# -- one epoch -------------------------------------------------------------------------------
def epoch_order_rng(seed, epoch):
    """The generator of epoch ``epoch``'s batch order: a function of (seed, epoch) only."""
    return np.random.default_rng([seed, epoch])


def epoch_dropout_seed(seed, epoch):
    return int(np.random.SeedSequence([seed, epoch, 1]).generate_state(1)[0] >> 1)


def _host(*scalars):
    """Device scalars as Python floats, in one transfer."""
    xp = array_module(scalars[0])
    values = xp.stack([xp.asarray(s, dtype=xp.float64) for s in scalars])
    return [float(v) for v in to_numpy(values)]


def evaluate(model, x, y, batch_size=1000):
    """``(mean loss, accuracy)`` of ``model`` in eval mode on (x, y); one fetch from the device."""
    xp = array_module(x)
    model.eval()
    loss_sum, correct = xp.zeros((), xp.float64), xp.zeros((), xp.int64)
    for start in range(0, len(x), batch_size):
        xb, yb = x[start:start + batch_size], y[start:start + batch_size]
        logits = model(xb)
        loss, _ = nn.softmax_cross_entropy(logits, yb, check_labels=False)  # checked at load
        loss_sum += loss * len(yb)
        correct += (logits.argmax(axis=1) == yb).sum()
    loss_sum, correct = _host(loss_sum, correct)
    return loss_sum / len(x), correct / len(x)


def train_epoch(model, opt, ema, x, y, batch_size, seed, epoch, bar=None, redraws=20):
    """One pass over (x, y) in the order of ``(seed, epoch)``. Returns ``(step losses (host
    array), train accuracy)``. ``bar`` (tqdm) gets the examples done and, ``redraws`` times
    per epoch, the running loss and accuracy (the only mid-epoch fetches)."""
    xp = array_module(x)
    steps = -(-len(x) // batch_size)
    losses = xp.zeros(steps, xp.float32)
    correct = xp.zeros((), xp.int64)
    model.train()
    model.reseed(epoch_dropout_seed(seed, epoch))
    every = max(1, steps // redraws)
    live = bar is not None and not bar.disable
    seen = 0
    for i, (xb, yb) in enumerate(batches(x, y, batch_size, rng=epoch_order_rng(seed, epoch))):
        logits = model(xb)
        loss, dlogits = nn.softmax_cross_entropy(logits, yb, check_labels=False)  # checked at load
        model.backward(dlogits, need_dx=False)
        opt.step()
        if ema is not None:
            ema.update()
        losses[i] = loss
        correct += (logits.argmax(axis=1) == yb).sum()
        seen += len(yb)
        if live:
            bar.update(len(yb))
            if (i + 1) % every == 0 or i + 1 == steps:
                loss_now, right = _host(loss, correct)
                bar.set_postfix(loss=f"{loss_now:.4f}", acc=f"{right / seen:.1%}", refresh=False)
    (right,) = _host(correct)
    return to_numpy(losses).astype(np.float64), right / len(x)


def _progress(total, desc, enabled):
    from tqdm import tqdm
    # disable=None: on when stderr is a terminal, off in logs and captured output
    return tqdm(total=total, desc=desc, unit="ex", unit_scale=True, leave=False, dynamic_ncols=True,
                disable=None if enabled else True, file=sys.stderr)


@contextlib.contextmanager
def kernel_threads(n):
    """Run fastopt's CPU kernels on ``n`` Numba threads inside the block (at most Numba's pool).

    Why not all cores: in training, NumPy's BLAS (the matrix products) keeps its own threads,
    which spin between calls. Two spinning pools on the same cores made whole epochs 10-20x
    slower on a 2-core machine (28x28 inputs, where the optimizer's kernels go parallel);
    one kernel thread costs little, the update being a small share of a step."""
    import numba
    before = numba.get_num_threads()
    numba.set_num_threads(max(1, min(int(n), numba.config.NUMBA_NUM_THREADS)))
    try:
        yield
    finally:
        numba.set_num_threads(before)


@contextlib.contextmanager
def thread_limits(n):
    """NumPy's BLAS (through threadpoolctl) and fastopt's Numba kernels both on ``n`` threads
    inside the block, chosen together: each pool alone would take every core, and pools
    that spin on the same cores slow each other down many times over."""
    from threadpoolctl import threadpool_limits
    with kernel_threads(n), threadpool_limits(limits=max(1, int(n)), user_api="blas"):
        yield


def fit(cfg, data, model, opt, ema, log, start_epoch=0, history=None, step_losses=None, on_epoch=None,
        label=""):
    """Train epochs ``start_epoch .. cfg.epochs - 1``; log one line per epoch; call
    ``on_epoch(history, step_losses)`` after each. Stops early if the loss stops being finite.
    Returns ``(history, step_losses, diverged)``."""
    with thread_limits(cfg.threads):
        return _fit(cfg, data, model, opt, ema, log, start_epoch, history, step_losses, on_epoch, label)


def _fit(cfg, data, model, opt, ema, log, start_epoch, history, step_losses, on_epoch, label):
    history, step_losses = list(history or []), list(step_losses or [])
    n = len(data.x_train)
    steps = -(-n // cfg.batch_size)
    watch = LossWatch(step_losses[0] if step_losses else None)
    for epoch in range(start_epoch, cfg.epochs):
        lr, skipped_before = epoch_lr(opt, steps), opt.skipped_steps
        t0 = time.perf_counter()
        # a diverging run overflows: it is reported below, once, instead of by NumPy's warnings
        with _progress(n, f"{label}epoch {epoch + 1}/{cfg.epochs}", cfg.progress) as bar, \
                np.errstate(over="ignore", invalid="ignore"):
            losses, train_acc = train_epoch(model, opt, ema, data.x_train, data.y_train, cfg.batch_size,
                                            cfg.seed, epoch, bar)
        train_seconds = time.perf_counter() - t0
        with np.errstate(over="ignore", invalid="ignore"):
            if ema is not None:
                with ema.average_parameters():
                    test_loss, test_acc = evaluate(model, data.x_test, data.y_test)
            else:
                test_loss, test_acc = evaluate(model, data.x_test, data.y_test)
        sizes = np.diff(np.minimum(np.arange(len(losses) + 1) * cfg.batch_size, n))
        record = dict(epoch=epoch + 1, train_loss=float(np.average(losses, weights=sizes)), train_acc=train_acc,
                      test_loss=test_loss, test_acc=test_acc, lr=lr, seconds=time.perf_counter() - t0,
                      train_seconds=train_seconds, examples_per_s=n / train_seconds)
        record["skipped_steps"] = opt.skipped_steps - skipped_before  # --nonfinite skip: inf/NaN gradients
        history.append(record)
        step_losses.extend(losses.tolist())
        log(epoch_line(record, cfg.epochs, label))
        warning = watch.check(step_losses, record["epoch"])
        if warning:
            log(f"{label}warning: {warning}; the learning rate (peak {peak_lr(opt, cfg.epochs * steps):g}) is "
                "probably too high")
        if on_epoch is not None:
            on_epoch(history, step_losses)
        if not (np.isfinite(record["train_loss"]) and np.isfinite(test_loss)):
            log(f"{label}the loss is no longer finite (diverged): stopping")
            return history, step_losses, True
    return history, step_losses, False


def epoch_lr(opt, steps):
    """The learning rate of the epoch's first step that moves the weights (a warm-up's very
    first step has lr 0): the ``lr`` of the epoch's line and record."""
    lr, t0 = opt.param_groups[0]["lr"], opt.steps
    if not callable(lr):
        return lr
    return next((v for v in map(float, map(lr, range(t0, t0 + steps))) if v), float(lr(t0)))


def peak_lr(opt, total_steps):
    """The largest learning rate of the first group over the run (``opt.lr`` is the next
    step's, which is 0 before a warm-up)."""
    lr = opt.param_groups[0]["lr"]
    return max(map(float, map(lr, range(max(1, total_steps))))) if callable(lr) else lr


def describe_optimizer(opt, schedule, total_steps):
    """The optimizer for the run's header: class, groups and the peak learning rate."""
    groups = len(opt.param_groups)
    text = f"{type(opt).__name__} ({groups} param group{'s' * (groups != 1)}), lr {peak_lr(opt, total_steps):g}"
    return text + (f" at the peak of the {schedule} schedule" if schedule != "constant" else "")


class LossWatch:
    """Says once when the training loss explodes: a step loss EXPLODED times the run's first
    (about ln K for a fresh model), or not finite. A too-high lr often stays finite and ends at
    chance accuracy, with nothing else to say why."""

    EXPLODED = 10.0

    def __init__(self, first_loss=None):
        self.first, self.seen, self.warned = first_loss, 0, False

    def check(self, step_losses, epoch):
        """The warning for the losses added since the last check (or None)."""
        new, self.seen = np.asarray(step_losses[self.seen:], dtype=np.float64), len(step_losses)
        if self.warned or not new.size:
            return None
        if self.first is None:
            self.first = float(new[0])
        bad = ~np.isfinite(new)
        if bad.any():
            self.warned = True
            return f"the training loss became {new[bad][0]} in epoch {epoch} (diverged)"
        worst = float(new.max())
        if np.isfinite(self.first) and worst > self.EXPLODED * max(self.first, 1e-3):
            self.warned = True
            return (f"the training loss exploded in epoch {epoch}: {worst:.3g} at worst, "
                    f"{worst / self.first:.3g} times the first step's {self.first:.3g}")
        return None


def epoch_line(r, epochs, label=""):
    width = len(str(epochs))
    skipped = f"  ({r['skipped_steps']} steps skipped: inf/NaN gradient)" if r.get("skipped_steps") else ""
    return (f"{label}epoch {r['epoch']:>{width}}/{epochs}  train loss {r['train_loss']:.4f}  acc {r['train_acc']:6.2%}"
            f"  | test loss {r['test_loss']:.4f}  acc {r['test_acc']:6.2%}  | {r['seconds']:5.2f} s"
            f"  {r['examples_per_s']:,.0f} ex/s  lr {r['lr']:.3g}{skipped}")


def summarize(history, diverged=False):
    """Final and best figures; seconds are summed over the epochs (a resumed run's included)."""
    last = history[-1]
    best = max(history, key=lambda r: r["test_acc"])
    seconds = sum(r["seconds"] for r in history)
    train_seconds = sum(r["train_seconds"] for r in history)
    examples = sum(r["examples_per_s"] * r["train_seconds"] for r in history)
    return dict(epochs=len(history), final_train_loss=last["train_loss"], final_test_loss=last["test_loss"],
                final_test_acc=last["test_acc"], best_test_acc=best["test_acc"], best_epoch=best["epoch"],
                seconds=seconds, seconds_per_epoch=seconds / len(history),
                median_seconds_per_epoch=float(np.median([r["seconds"] for r in history])),
                examples_per_s=examples / train_seconds, diverged=diverged)


# -- outputs ----------------------------------------------------------------------------------
def _json_safe(x):
    """NaN and inf become None (JSON has no such numbers); NumPy scalars become Python's."""
    if isinstance(x, dict):
        return {str(k): _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    if isinstance(x, (np.floating, float)):
        return float(x) if math.isfinite(x) else None
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.bool_):
        return bool(x)
    return x


def write_metrics(out, metrics, rows, fields):
    """``out/metrics.json`` (everything) and ``out/metrics.csv`` (``rows``, one per epoch)."""
    text = json.dumps(_json_safe(metrics), indent=1)
    atomic_write(Path(out) / "metrics.json", lambda f: f.write(text.encode()))

    def write_csv(f):
        import io
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        f.write(buf.getvalue().encode())
    atomic_write(Path(out) / "metrics.csv", write_csv)


def plot_run(out, history, step_losses, steps_per_epoch, sizes, title, ema=None):
    """``loss.png`` (per-step loss and its centred mean, log scale) and ``accuracy.png``.
    ``sizes``: (training examples, test examples); ``ema``: the EMA decay the test set was
    evaluated with, or None."""
    window = smoothing_window(steps_per_epoch, 4)
    loss = plot_curves(Path(out) / "loss.png",
                       {"per step": step_losses,
                        f"centred mean of {window} steps": centred_mean(step_losses, window)},
                       f"{title}: training loss", "cross-entropy (log scale)", xlabel="step", logy=True)
    train_name = "train (running, in training mode)"
    test_name = "test" if ema is None else f"test, with the EMA of the weights (decay {ema:g})"
    acc = plot_accuracy(Path(out) / "accuracy.png",
                        {train_name: [(r["epoch"], r["train_acc"]) for r in history],
                         test_name: [(r["epoch"], r["test_acc"]) for r in history]},
                        f"{title}: accuracy", dict(zip((train_name, test_name), sizes)))
    return loss, acc


def smoothing_window(steps_per_epoch, per_epoch):
    """An odd window (a centred mean needs one) of about ``steps_per_epoch / per_epoch`` steps."""
    return max(1, steps_per_epoch // per_epoch) | 1


# -- checkpoints ---------------------------------------------------------------------------------
def _fingerprint(cfg):
    """The settings a resumed run must share with the checkpoint's: all but RESUMABLE_CHANGES,
    and the epochs too when the schedule is laid out over the whole run."""
    spans_run = cfg.schedule in ("cosine", "warmup_cosine") or (cfg.schedule == "step" and not cfg.decay_every)
    settings = {k: v for k, v in cfg.as_dict().items() if k not in RESUMABLE_CHANGES or (k == "epochs" and spans_run)}
    settings["lr"] = effective_lr(cfg.optimizer, cfg.lr)  # --lr 0.003 and no --lr are one run for adam
    return settings


def save_checkpoint(out, cfg, model, opt, ema, history, step_losses):
    """One file, ``checkpoint.npz``, written atomically: the model's parameters and BatchNorm
    statistics (``model/...``), the optimizer's state dict (``optimizer/...``), the EMA's
    (``ema/...``), the per-step losses, and in ``meta`` the progress, the run's settings and
    the list of arrays. One rename publishes all of it: no interruption can leave parts of
    two epochs side by side."""
    arrays = {f"model/{k}": v for k, v in model.state_dict().items()}
    opt_tree, opt_arrays = _flatten(_without_schedules(opt.state_dict()), "optimizer")
    arrays.update(opt_arrays)
    ema_tree = None
    if ema is not None:
        ema_tree, ema_arrays = _flatten(ema.state_dict(), "ema")
        arrays.update(ema_arrays)
    arrays["step_losses"] = np.asarray(step_losses, dtype=np.float64)
    meta = dict(format=CHECKPOINT_FORMAT, epoch=len(history), config=_fingerprint(cfg), history=history,
                device=model.device, optimizer=opt_tree, ema=ema_tree, arrays=sorted(arrays))
    arrays["meta"] = np.array(json.dumps(_json_safe(meta)))
    atomic_write(Path(out) / CHECKPOINT, lambda f: np.savez(f, **arrays))


def _without_schedules(state_dict):
    """A schedule is code, not data: stored as None, and the step count restores its value."""
    groups = [{k: (None if callable(v) else v) for k, v in g.items()} for g in state_dict["param_groups"]]
    return {**state_dict, "param_groups": groups}


def load_checkpoint(out, cfg, model, opt, ema, log=print):
    """Restore a run from ``out``; returns ``(history, step_losses)``. Every fault (a missing,
    unreadable, damaged or foreign file, another run's settings, state that does not fit)
    is a one-line UsageError naming the file, raised before training starts: the checkpoint
    is never overwritten by a run that could not resume from it. ``log`` gets a note when
    the checkpoint was saved on another device (the run goes on, not bit for bit)."""
    out = Path(out)
    path = out / CHECKPOINT
    if not path.is_file():
        raise UsageError(f"--resume: no checkpoint in {out} ({path} missing; run with --checkpoint first)")
    arrays, meta = _read_checkpoint(path)
    saved, here = meta["config"], _fingerprint(cfg)
    differ = [f"{k}={saved.get(k)!r} there, {here.get(k)!r} here" for k in sorted(set(saved) | set(here))
              if saved.get(k) != here.get(k)]
    if differ:
        raise UsageError(f"--resume: {path} is from another run: " + "; ".join(differ))
    if ema is not None and meta.get("ema") is None:
        raise UsageError(f"--resume --ema: {path} holds no EMA state (saved without --ema)")
    _restore(path, arrays, meta, model, opt, ema)
    if meta.get("device", model.device) != model.device:
        log(f"note: the checkpoint was saved on {meta['device']}, this run is on {model.device}: "
            "it continues, but not bit for bit")
    history = meta["history"]
    for r in history:  # JSON wrote non-finite numbers as null
        r.update({k: float("nan") for k, v in r.items() if v is None})
    return history, arrays["step_losses"].tolist()


# meta entries of a checkpoint and their types: anything else is a damaged or foreign file
CHECKPOINT_META = {"format": str, "epoch": int, "config": dict, "history": list, "device": str,
                   "optimizer": dict, "ema": (dict, type(None)), "arrays": list}


def _read_checkpoint(path):
    """``(arrays, meta)`` of the checkpoint at ``path``, each array's header checked against
    its real size before it is read, the list of arrays checked against the file's."""
    from .data import npz_array, npz_members, open_npz
    try:
        with open_npz(path, "expected a checkpoint written by fastopt train --checkpoint") as archive:
            arrays = {k: npz_array(archive, m, f"{path}[{k}]") for k, m in npz_members(archive).items()}
    except DataError as e:
        raise UsageError(f"--resume: {e}") from None
    meta = _checkpoint_meta(path, arrays.pop("meta", None))
    missing, unknown = sorted(set(meta["arrays"]) - set(arrays)), sorted(set(arrays) - set(meta["arrays"]))
    if missing or unknown:
        raise UsageError(f"--resume: {path} is damaged: " + "; ".join(
            [f"missing array(s) {', '.join(missing)}"] * bool(missing) + [f"unknown array(s) {', '.join(unknown)}"]
            * bool(unknown)))
    return arrays, meta


def _checkpoint_meta(path, entry):
    """The checkpoint's ``meta`` entry, parsed and its structure checked."""
    def refuse(why):
        return UsageError(f"--resume: {path} is not a checkpoint of fastopt train ({why}); start afresh "
                          "without --resume, or point --out at the run's folder")
    if entry is None:
        raise refuse("no meta entry")
    if entry.shape != () or entry.dtype.kind != "U":
        raise refuse(f"its meta entry is a {entry.dtype} array of shape {entry.shape}, not text")
    try:
        meta = json.loads(str(entry))
    except ValueError as e:
        raise refuse(f"its meta entry is not JSON: {e}") from None
    if not isinstance(meta, dict):
        raise refuse("its meta entry is not a JSON object")
    if str(meta.get("format")).startswith("fastopt-checkpoint-"):
        raise refuse("it holds an optimizer alone, as fastopt.save writes it: the first of the two files an "
                     "older fastopt train wrote, which cannot be resumed")
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise refuse(f"format {meta.get('format')!r}, this fastopt reads {CHECKPOINT_FORMAT!r}")
    wrong = [k for k, kind in CHECKPOINT_META.items() if not isinstance(meta.get(k), kind)]
    if wrong:
        raise refuse(f"its meta entry lacks or garbles {', '.join(wrong)}")
    return meta


def _restore(path, arrays, meta, model, opt, ema):
    """Load the optimizer, the model and the EMA from a read checkpoint. Each checks all it is
    given before it writes anything; whatever does not fit is a UsageError naming ``path``."""
    state = {k[len("model/"):]: v for k, v in arrays.items() if k.startswith("model/")}
    expected = set(model.state_dict())
    if set(state) != expected:
        missing, unknown = sorted(expected - set(state)), sorted(set(state) - expected)
        raise UsageError(f"--resume: {path} holds another model's arrays (missing {', '.join(missing) or 'none'}; "
                         f"unknown {', '.join(unknown) or 'none'})")
    try:
        part = "the optimizer state"
        opt.load_state_dict(_unflatten(meta["optimizer"], arrays, "optimizer"))
        part = "the model"
        model.load_state_dict(state)
        if ema is not None:
            part = "the EMA state"
            ema.load_state_dict(_unflatten(meta["ema"], arrays, "ema"))
    except (ValueError, TypeError, KeyError, AttributeError) as e:  # a shape, dtype or entry that does not fit
        raise UsageError(f"--resume: {path}: {part} does not fit: {type(e).__name__}: {e}") from None


def _flatten(tree, prefix):
    """A state dict as (JSON skeleton, {npz key: array}): arrays become references by key."""
    arrays = {}

    def walk(x, key):
        if isinstance(x, dict):
            return {"dict": {str(k): walk(v, f"{key}/{k}") for k, v in x.items()}}
        if isinstance(x, (list, tuple)):
            return {"list": [walk(v, f"{key}/{i}") for i, v in enumerate(x)]}
        if hasattr(x, "shape") and hasattr(x, "dtype"):
            arrays[key] = to_numpy(x)
            return {"array": key}
        return {"value": x}
    return walk(tree, prefix), arrays


def _unflatten(skeleton, arrays, prefix):
    def walk(node):
        if "dict" in node:
            return {k: walk(v) for k, v in node["dict"].items()}
        if "list" in node:
            return [walk(v) for v in node["list"]]
        if "array" in node:
            return arrays[node["array"]]
        return node["value"]
    return walk(skeleton)


# -- the commands ------------------------------------------------------------------------------
OUTPUTS = ("metrics.json", "metrics.csv", "loss.png", "accuracy.png", "loss_calls.png", CHECKPOINT)


def replacing(out, log, checkpoint=False):
    """Say so when ``out`` holds an earlier run's outputs: a run writes into its --out folder
    (runs/<command> unless told), replacing what is there, so that --resume finds the run by
    its folder (numbered folders would leave --resume to guess). ``checkpoint``: this run
    writes one; if not, an earlier one stays and is said to."""
    out = Path(out)
    found = [name for name in OUTPUTS if (out / name).is_file() and (name != CHECKPOINT or checkpoint)]
    if found:
        log(f"note: {out} holds an earlier run's {', '.join(found)}: this run replaces them "
            "(--out DIR keeps runs apart)")
    if not checkpoint and (out / CHECKPOINT).is_file():
        log(f"note: {out / CHECKPOINT} is an earlier run's and stays; --resume would continue that run")


def notes(cfg, n_train, log):
    """Settings that are allowed but rarely meant: said once, before training."""
    if cfg.batch_size > n_train:
        log(f"note: --batch-size {cfg.batch_size} is more than the {n_train:,} training examples: every epoch "
            "is one step on the whole training set")
def describe(model):
    return f"{len(model.buffer)} tensors, {model.buffer.numel:,} parameters"


def train(cfg, log=print):
    """``fastopt train``: one run; writes metrics.json, metrics.csv, loss.png and accuracy.png in
    ``cfg.out`` (and checkpoints each epoch with ``cfg.checkpoint``). Returns the metrics dict.
    Model "logreg": the full-batch run of :mod:`fastopt.fullbatch` (lbfgs and newton need it)."""
    from .fullbatch import full_batch, uses_full_batch
    if uses_full_batch(cfg, [cfg.optimizer], strict=True):
        from .plots import format_table
        metrics = full_batch(cfg, [cfg.optimizer], log, command="train")
        log(format_table(metrics["table"]["rows"], metrics["table"]["headers"]))
        return metrics
    device, about = resolve_device(cfg.device)
    log(f"device: {about}")
    dtype = np.dtype(cfg.dtype)
    data = load_dataset(cfg.data, cfg.limit, dtype)
    log(f"data: {data.name}, {len(data.x_train):,} train / {len(data.x_test):,} test images of shape "
        f"{data.in_shape}, {data.n_classes} classes")
    model = build_model(cfg.model, data.in_shape, data.n_classes, dtype, device, cfg.seed)
    steps_per_epoch = -(-len(data.x_train) // cfg.batch_size)
    opt, ema = make_optimizer(cfg, model, steps_per_epoch)
    log(f"model: {cfg.model}, {describe(model)}; optimizer: "
        f"{describe_optimizer(opt, cfg.schedule, cfg.epochs * steps_per_epoch)}"
        + (f"; EMA decay {cfg.ema}" if ema is not None else ""))
    notes(cfg, len(data.x_train), log)
    out = Path(cfg.out)
    history, step_losses = [], []
    if cfg.resume:
        history, step_losses = load_checkpoint(out, cfg, model, opt, ema, log)
        log(f"resumed from {out / CHECKPOINT} after epoch {len(history)} (step {opt.steps})")
    if not cfg.resume:
        replacing(out, log, cfg.checkpoint)
    out.mkdir(parents=True, exist_ok=True)  # once every setting has been checked
    data = data.to(device)
    metrics = {"command": "train", "config": cfg.as_dict(), "device": device, "data": data.name,
               "model": {"name": cfg.model, "parameters": model.buffer.numel, "layers": repr(model)}}

    def on_epoch(hist, losses):
        if cfg.checkpoint or cfg.resume:
            save_checkpoint(out, cfg, model, opt, ema, hist, losses)
        write_metrics(out, {**metrics, "epochs": hist, "step_loss": losses, "summary": summarize(hist)},
                      hist, EPOCH_FIELDS)

    done = len(history)
    if done >= cfg.epochs:
        log(f"the checkpoint has {done} epochs already (--epochs {cfg.epochs}): nothing to train")
    history, step_losses, diverged = fit(cfg, data, model, opt, ema, log, done, history, step_losses, on_epoch)
    if not history:
        raise UsageError("--epochs: nothing was trained")
    summary = summarize(history, diverged)
    metrics.update(epochs=history, step_loss=step_losses, summary=summary)
    write_metrics(out, metrics, history, EPOCH_FIELDS)
    plots = plot_run(out, history, step_losses, steps_per_epoch, (len(data.x_train), len(data.x_test)),
                     f"{cfg.model} + {cfg.optimizer} on {data.name}", cfg.ema)
    log(f"done: {summary['epochs']} epoch{'s' * (summary['epochs'] != 1)}, {summary['seconds']:.1f} s "
        f"({summary['seconds_per_epoch']:.3f} s/epoch, median {summary['median_seconds_per_epoch']:.3f}; "
        f"{summary['examples_per_s']:,.0f} train examples/s on {device})")
    log(f"test accuracy {summary['final_test_acc']:.2%} (best {summary['best_test_acc']:.2%} at epoch "
        f"{summary['best_epoch']}); final train loss {summary['final_train_loss']:.4f}")
    log(f"wrote {out / 'metrics.json'}, metrics.csv, {plots[0].name}, {plots[1].name}"
        + (f", {CHECKPOINT}" if (cfg.checkpoint or cfg.resume) and len(history) > done else ""))
    return metrics


COMPARE_FIELDS = ("optimizer",) + EPOCH_FIELDS
COMPARE_HEADERS = ("optimizer", "lr", "train loss", "test acc", "best test acc", "s/epoch", "seconds")


def compare(cfg, optimizers, log=print):
    """``fastopt compare``: the same model from the same initial weights (``cfg.seed``) and the
    same batches, once per optimizer (each with its DEFAULT_LR unless ``cfg.lr``). Writes
    loss.png, accuracy.png, metrics.json, metrics.csv in ``cfg.out``; returns the metrics
    dict, whose ``table`` rows go with COMPARE_HEADERS. Model "logreg": the full-batch comparison
    of :mod:`fastopt.fullbatch`, with its own headers (lbfgs and newton need it)."""
    from .fullbatch import full_batch, uses_full_batch
    if uses_full_batch(cfg, optimizers, strict=False):
        return full_batch(cfg, optimizers, log)
    device, about = resolve_device(cfg.device)
    log(f"device: {about}")
    dtype = np.dtype(cfg.dtype)
    data = load_dataset(cfg.data, cfg.limit, dtype)
    log(f"data: {data.name}, {len(data.x_train):,} train / {len(data.x_test):,} test images")
    steps_per_epoch = -(-len(data.x_train) // cfg.batch_size)
    models = {name: build_model(cfg.model, data.in_shape, data.n_classes, dtype, device, cfg.seed)
              for name in optimizers}
    opts = {name: make_optimizer(cfg, models[name], steps_per_epoch, name=name, strict=False) for name in optimizers}
    notes(cfg, len(data.x_train), log)
    out = Path(cfg.out)
    replacing(out, log)
    out.mkdir(parents=True, exist_ok=True)
    data = data.to(device)
    runs, rows, table = {}, [], []
    for name in optimizers:
        model, (opt, ema) = models[name], opts[name]
        init_loss, init_acc = evaluate(model, data.x_test, data.y_test)
        log(f"{name}: {describe_optimizer(opt, cfg.schedule, cfg.epochs * steps_per_epoch)}")
        history, step_losses, diverged = fit(cfg, data, model, opt, ema, log, label=f"{name}: ")
        summary = summarize(history, diverged)
        _, kwargs = optimizer_kwargs(name, cfg.lr, cfg.hyper, strict=False)
        runs[name] = dict(hyper=kwargs, initial=dict(test_loss=init_loss, test_acc=init_acc), epochs=history,
                          step_loss=step_losses, summary=summary)
        rows += [{"optimizer": name, **r} for r in history]
        table.append((name, kwargs["lr"], summary["final_train_loss"], summary["final_test_acc"],
                      summary["best_test_acc"], summary["seconds_per_epoch"], summary["seconds"]))
        models[name] = None  # free the activations this model still holds
    metrics = {"command": "compare", "config": cfg.as_dict(), "device": device, "data": data.name,
               "optimizers": list(optimizers), "runs": runs, "table": {"headers": COMPARE_HEADERS, "rows": table}}
    write_metrics(out, metrics, rows, COMPARE_FIELDS)
    window = smoothing_window(steps_per_epoch, 2)
    plot_curves(out / "loss.png", {n: centred_mean(r["step_loss"], window) for n, r in runs.items()},
                f"{cfg.model} on {data.name}: training loss (centred mean of {window} steps)",
                "cross-entropy (log scale)", xlabel="step", logy=True)
    plot_accuracy(out / "accuracy.png",
                  {n: [(0, r["initial"]["test_acc"])] + [(e["epoch"], e["test_acc"]) for e in r["epochs"]]
                   for n, r in runs.items()},
                  f"{cfg.model} on {data.name}: test accuracy from the same initial weights", len(data.x_test),
                  ylabel="test accuracy" if cfg.ema is None else f"test accuracy, EMA of the weights ({cfg.ema:g})")
    return metrics
