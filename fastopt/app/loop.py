"""The training loop: epochs over minibatches, the cross-entropy loss and accuracy, a progress
bar, an EMA of the weights and a hook after every epoch (where the caller writes its
metrics and checkpoint). It knows models and optimizers only by their interfaces (``model``
forward, backward, train/eval, reseed; ``opt.step()`` and ``opt.param_groups``).

One code path for both devices: every step runs where the data is (the nn core's forward
and backward, the loss, the fused optimizer step). Per-step losses and the running count of
correct predictions stay on the device and are fetched once per epoch; the progress bar
fetches them only when it redraws.

Reproducibility: the order of the batches in epoch ``e`` and the Dropout masks are functions
of ``(seed, e)``, so a run resumed after epoch ``e`` (optimizer state and step, parameters,
BatchNorm statistics) replays epochs ``e+1, ...`` bit for bit, on the device it was saved on.
"""
import sys
import time

import numpy as np

from .. import nn
from ..nn._array import array_module, to_numpy
from .data import batches

# seconds: the whole epoch, evaluation included; examples_per_s: training examples over the training time
EPOCH_FIELDS = ("epoch", "train_loss", "train_acc", "test_loss", "test_acc", "lr", "seconds", "train_seconds",
                "examples_per_s")
CLOCK_FIELDS = ("seconds", "train_seconds", "examples_per_s")  # all that differs between two runs of one config


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
    parallel = getattr(opt, "local_batch", None)  # a ShardedOptimizer: each rank takes its slice of every batch
    for i, (xb, yb) in enumerate(batches(x, y, batch_size, rng=epoch_order_rng(seed, epoch))):
        if parallel is not None:
            share, (xb, yb) = len(yb), parallel(xb, yb)
            share = len(yb) / share
        if parallel is None or len(yb):
            logits = model(xb)
            loss, dlogits = nn.softmax_cross_entropy(logits, yb, check_labels=False)  # checked at load
            if parallel is not None:  # the global batch's mean: each rank's mean weighted by its share, times
                dlogits, loss = dlogits * (share * opt.size), loss * share  # R, as the step averages over R
            model.backward(dlogits, need_dx=False)
            correct += (logits.argmax(axis=1) == yb).sum()
        else:  # a last batch smaller than R: nothing for this rank, which adds a zero gradient
            opt.zero_grad()
            loss = 0.0
        opt.step()
        if ema is not None:
            ema.update()
        losses[i] = loss
        seen += len(yb)
        if live:
            bar.update(len(yb))
            if (i + 1) % every == 0 or i + 1 == steps:
                loss_now, right = _host(loss, correct)
                bar.set_postfix(loss=f"{loss_now:.4f}", acc=f"{right / seen:.1%}", refresh=False)
    (right,) = _host(correct)
    losses = to_numpy(losses).astype(np.float64)
    if parallel is not None:  # the global batches' losses and the correct count: one allreduce per epoch
        total = opt.sum_over_ranks(np.append(losses, right))
        losses, right = total[:-1], total[-1]
    return losses, right / len(x)


def _progress(total, desc, enabled):
    from tqdm import tqdm
    # disable=None: on when stderr is a terminal, off in logs and captured output
    return tqdm(total=total, desc=desc, unit="ex", unit_scale=True, leave=False, dynamic_ncols=True,
                disable=None if enabled else True, file=sys.stderr)


def fit(cfg, data, model, opt, ema, log, start_epoch=0, history=None, step_losses=None, on_epoch=None,
        label=""):
    """Train epochs ``start_epoch .. cfg.epochs - 1`` (``cfg``: epochs, batch_size, seed,
    progress) on ``data`` (x_train, y_train, x_test, y_test); log one line per epoch; call
    ``on_epoch(history, step_losses)`` after each. Evaluates with the EMA's weights when
    ``ema`` is given. Stops early if the loss stops being finite.
    Returns ``(history, step_losses, diverged)``."""
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
            log(f"{label}warning: {warning}; {_suspects(opt, peak_lr(opt, cfg.epochs * steps))}")
        if on_epoch is not None:
            on_epoch(history, step_losses)
        if not (np.isfinite(record["train_loss"]) and np.isfinite(test_loss)):
            log(f"{label}the loss is no longer finite (diverged): stopping")
            return history, step_losses, True
    return history, step_losses, False


def _suspects(opt, peak):
    """What most likely made a run diverge, the options that can before the learning rate."""
    found = []
    if opt.param_groups[0].get("eps", None) == 0:
        found.append("eps=0 (a zero second moment divides 0 by 0)")
    if getattr(opt, "state_dtype", None) == np.float16:
        found.append("float16 state (it flushes small values to zero and overflows past 65504)")
    if not found:
        return f"the learning rate (peak {peak:g}) is probably too high"
    return "suspects: " + "; ".join([*found, f"a learning rate too high (peak {peak:g})"])


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
