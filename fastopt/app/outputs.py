"""What a run leaves in its ``--out`` folder: ``metrics.json`` (everything) and
``metrics.csv`` (one row per epoch or iteration), the pictures (through :mod:`fastopt.plots`),
and the one checkpoint file of ``fastopt train --checkpoint``, written atomically and read
back by ``--resume`` with every fault a one-line UsageError.

A run writes into its folder and replaces an earlier run's outputs there (with a note), so
that ``--resume`` finds a run by its folder.
"""
import csv
import io
import json
import math
from pathlib import Path

import numpy as np

from ..checkpoint import atomic_write
from ..kernels._formats import BFLOAT16, kernel_view
from ..nn._array import to_numpy
from ..plots import centred_mean, plot_accuracy, plot_curves
from .config import UsageError
from .data import DataError, npz_array, npz_members, open_npz
from .recipes import effective_lr

CHECKPOINT = "checkpoint.npz"  # model, optimizer, EMA and progress: one file, one atomic rename
CHECKPOINT_FORMAT = "fastopt-train-checkpoint-2"
# config fields a resumed run may change (everything else must match the checkpoint's run);
# a changed device continues the run, but not bit for bit
RESUMABLE_CHANGES = ("epochs", "out", "progress", "checkpoint", "resume", "device", "threads", "distributed")
OUTPUTS = ("metrics.json", "metrics.csv", "loss.png", "accuracy.png", "loss_calls.png", CHECKPOINT)


# -- the folder ---------------------------------------------------------------------------------
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


def open_out(out, log, checkpoint=False):
    """Create the folder ``out`` (once every setting has been checked), saying first what of
    an earlier run's it holds (see :func:`replacing`)."""
    replacing(out, log, checkpoint)
    taken = [name for name in OUTPUTS if (Path(out) / name).is_dir() and (name != CHECKPOINT or checkpoint)]
    if taken:  # found now, not after the first epoch's training
        raise OSError(f"--out {out}: {', '.join(taken)} there is a folder, where this run writes a file")
    try:
        Path(out).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OSError(f"--out {out}: cannot make this folder ({e.strerror or e})") from None


# -- metrics and pictures -----------------------------------------------------------------------
def json_safe(x):
    """NaN and inf become None (JSON has no such numbers); NumPy scalars become Python's."""
    if isinstance(x, dict):
        return {str(k): json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    if isinstance(x, (np.floating, float)):
        return float(x) if math.isfinite(x) else None
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.bool_):
        return bool(x)
    return x


def write_json(path, metrics):
    """``metrics`` as JSON (no NaN: see :func:`json_safe`), written atomically."""
    text = json.dumps(json_safe(metrics), indent=1)
    atomic_write(Path(path), lambda f: f.write(text.encode()))


def write_metrics(out, metrics, rows, fields):
    """``out/metrics.json`` (everything) and ``out/metrics.csv`` (``rows``, one per epoch)."""
    write_json(Path(out) / "metrics.json", metrics)

    def write_csv(f):
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


def plot_comparison(out, runs, steps_per_epoch, title, n_test, ema=None):
    """``loss.png`` (each run's per-step loss, centred mean, log scale) and ``accuracy.png``
    (each run's test accuracy from its initial weights, epoch 0) of ``fastopt compare``."""
    window = smoothing_window(steps_per_epoch, 2)
    plot_curves(Path(out) / "loss.png", {n: centred_mean(r["step_loss"], window) for n, r in runs.items()},
                f"{title}: training loss (centred mean of {window} steps)",
                "cross-entropy (log scale)", xlabel="step", logy=True)
    plot_accuracy(Path(out) / "accuracy.png",
                  {n: [(0, r["initial"]["test_acc"])] + [(e["epoch"], e["test_acc"]) for e in r["epochs"]]
                   for n, r in runs.items()},
                  f"{title}: test accuracy from the same initial weights", n_test,
                  ylabel="test accuracy" if ema is None else f"test accuracy, EMA of the weights ({ema:g})")


def plot_gaps(out, runs, fstar, title):
    """``loss.png`` (f - f* per iteration) and ``loss_calls.png`` (per closure call), log scale,
    of the full-batch runs (``runs``: name -> loss and calls per iteration)."""
    for file, x, xlabel in (("loss.png", None, "iteration"), ("loss_calls.png", "calls", "closure calls")):
        curves = {n: [(k if x is None else r[x][k], f - fstar) for k, f in enumerate(r["loss"])]
                  for n, r in runs.items()}
        plot_curves(Path(out) / file, curves, title, "f - f* (log scale)", xlabel=xlabel, logy=True)


def smoothing_window(steps_per_epoch, per_epoch):
    """An odd window (a centred mean needs one) of about ``steps_per_epoch / per_epoch`` steps."""
    return max(1, steps_per_epoch // per_epoch) | 1


# -- the checkpoint ----------------------------------------------------------------------------
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
    if getattr(opt, "rank", 0):  # a ShardedOptimizer's state_dict gathers the shards on every rank; rank 0 writes
        return
    arrays.update(opt_arrays)
    ema_tree = None
    if ema is not None:
        ema_tree, ema_arrays = _flatten(ema.state_dict(), "ema")
        arrays.update(ema_arrays)
    arrays["step_losses"] = np.asarray(step_losses, dtype=np.float64)
    # NumPy's npz writes ml_dtypes' bfloat16 as raw bytes of no dtype: such arrays go as their bits
    bits = sorted(k for k, v in arrays.items() if v.dtype == BFLOAT16)
    arrays.update({k: kernel_view(arrays[k]) for k in bits})
    meta = dict(format=CHECKPOINT_FORMAT, epoch=len(history), config=_fingerprint(cfg), history=history,
                device=model.device, optimizer=opt_tree, ema=ema_tree, arrays=sorted(arrays), bfloat16=bits)
    arrays["meta"] = np.array(json.dumps(json_safe(meta)))
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
    bits = meta.get("bfloat16", [])  # absent before bfloat16 params existed
    for k in bits if isinstance(bits, list) else [None]:
        if k not in arrays or arrays[k].dtype != np.uint16:
            raise UsageError(f"--resume: {path} is damaged: {k} should hold bfloat16 bits (uint16)")
        arrays[k] = arrays[k].view(BFLOAT16)
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
