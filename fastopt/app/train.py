"""The commands ``fastopt train`` and ``fastopt compare``: the setup of :mod:`.prepare`, the
loop of :mod:`.loop`, the outputs of :mod:`.outputs`; ``--model logreg`` (and lbfgs or
newton) hands the run to :mod:`.fullbatch`.

Reproducibility: the initial weights are a function of ``seed``, the batches and Dropout
masks of ``(seed, epoch)``: a run resumed from the checkpoint of epoch ``e`` replays epochs
``e+1, ...`` bit for bit, on the device it was saved on. A resume on the other device is
allowed and continues the run, but not bit for bit (other kernels, other rounding).

    cfg = Config(model="mlp", optimizer="sgd", lr=0.1, hyper={"momentum": 0.9}, epochs=20)
    metrics = train(cfg)      # writes cfg.out/metrics.json, metrics.csv, loss.png, accuracy.png
"""
import dataclasses
from pathlib import Path

from ..distributed import MPIUnavailable, ShardedOptimizer, in_mpi_launch, mpi
from ..plots import format_table
from .config import UsageError
from .fullbatch import full_batch, uses_full_batch
from .loop import EPOCH_FIELDS, evaluate, fit, peak_lr, summarize
from .outputs import (
    CHECKPOINT,
    load_checkpoint,
    open_out,
    plot_comparison,
    plot_run,
    save_checkpoint,
    write_metrics,
)
from .prepare import build, describe_data, open_run, steps_per_epoch, thread_limits
from .recipes import describe_model, optimizer_kwargs, split_variant

COMPARE_FIELDS = ("optimizer", *EPOCH_FIELDS)
COMPARE_HEADERS = ("optimizer", "lr", "train loss", "test acc", "best test acc", "s/epoch", "seconds")


def notes(cfg, n_train, log):
    """Settings that are allowed but rarely meant: said once, before training."""
    if cfg.batch_size > n_train:
        log(f"note: --batch-size {cfg.batch_size} is more than the {n_train:,} training examples: every epoch "
            "is one step on the whole training set")


def describe_optimizer(opt, schedule, total_steps):
    """The optimizer for the run's header: class, groups and the peak learning rate."""
    groups = len(opt.param_groups)
    text = f"{type(opt).__name__} ({groups} param group{'s' * (groups != 1)}), lr {peak_lr(opt, total_steps):g}"
    return text + (f" at the peak of the {schedule} schedule" if schedule != "constant" else "")


def _comm(cfg):
    """MPI's world communicator for a data-parallel run (``--distributed``, or started by
    ``mpiexec -n R`` with R > 1), else None."""
    if not (cfg.distributed or in_mpi_launch()):
        return None
    try:
        MPI = mpi()
    except MPIUnavailable as e:
        raise UsageError(f"--distributed: {e}") from None
    return MPI.COMM_WORLD


def train(cfg, log=print):
    """``fastopt train``: one run; writes metrics.json, metrics.csv, loss.png and accuracy.png in
    ``cfg.out`` (and checkpoints each epoch with ``cfg.checkpoint``). Returns the metrics dict.
    Model "logreg": the full-batch run of :mod:`.fullbatch` (lbfgs and newton need it)."""
    if uses_full_batch(cfg, [cfg.optimizer], strict=True):
        if cfg.distributed:
            raise UsageError(f"--distributed: the full-batch runs (--model {cfg.model}) run in one process")
        metrics = full_batch(cfg, [cfg.optimizer], log, command="train")
        log(format_table(metrics["table"]["rows"], metrics["table"]["headers"]))
        return metrics
    comm = _comm(cfg)
    lead = comm is None or comm.Get_rank() == 0  # rank 0 alone prints, plots and writes
    if not lead:
        def log(*_):
            pass
    device, data = open_run(cfg, log)
    log(f"data: {describe_data(data)}")
    steps = steps_per_epoch(cfg, data)
    model, opt, ema = build(cfg, data, device, steps)
    if comm is not None:
        opt = ShardedOptimizer.from_optimizer(opt, comm)
        log(f"data parallel over {comm.Get_size()} MPI ranks: each takes its slice of every batch of "
            f"{cfg.batch_size}, the optimizer state is sharded (ZeRO-1), BatchNorm statistics are per rank "
            "(rank 0's are evaluated and saved)")
    log(f"model: {cfg.model}, {describe_model(model)}; optimizer: "
        f"{describe_optimizer(opt, cfg.schedule, cfg.epochs * steps)}"
        + (f"; EMA decay {cfg.ema}" if ema is not None else ""))
    notes(cfg, len(data.x_train), log)
    out = Path(cfg.out)
    history, step_losses = [], []
    if cfg.resume:
        history, step_losses = load_checkpoint(out, cfg, model, opt, ema, log)
        log(f"resumed from {out / CHECKPOINT} after epoch {len(history)} (step {opt.steps})")
    elif lead:
        open_out(out, log, cfg.checkpoint)  # once every setting has been checked
    data = data.to(device)
    metrics = {"command": "train", "config": cfg.as_dict(), "device": device, "data": data.name,
               "model": {"name": cfg.model, "parameters": model.buffer.numel, "layers": repr(model)},
               "ranks": 1 if comm is None else comm.Get_size()}

    def on_epoch(hist, losses):
        if cfg.checkpoint or cfg.resume:
            save_checkpoint(out, cfg, model, opt, ema, hist, losses)  # every rank: the state is gathered
        if lead:
            write_metrics(out, {**metrics, "epochs": hist, "step_loss": losses, "summary": summarize(hist)},
                          hist, EPOCH_FIELDS)

    done = len(history)
    if done >= cfg.epochs:
        log(f"the checkpoint has {done} epochs already (--epochs {cfg.epochs}): nothing to train")
    with thread_limits(cfg.threads):
        history, step_losses, diverged = fit(cfg, data, model, opt, ema, log, done, history, step_losses,
                                             on_epoch)
    if not history:
        raise UsageError("--epochs: nothing was trained")
    summary = summarize(history, diverged)
    metrics.update(epochs=history, step_loss=step_losses, summary=summary)
    if not lead:
        return metrics
    write_metrics(out, metrics, history, EPOCH_FIELDS)
    plots = plot_run(out, history, step_losses, steps, (len(data.x_train), len(data.x_test)),
                     f"{cfg.model} + {cfg.optimizer} on {data.name}", cfg.ema)
    log(f"done: {summary['epochs']} epoch{'s' * (summary['epochs'] != 1)}, {summary['seconds']:.1f} s "
        f"({summary['seconds_per_epoch']:.3f} s/epoch, median {summary['median_seconds_per_epoch']:.3f}; "
        f"{summary['examples_per_s']:,.0f} train examples/s on {device})")
    log(f"test accuracy {summary['final_test_acc']:.2%} (best {summary['best_test_acc']:.2%} at epoch "
        f"{summary['best_epoch']}); final train loss {summary['final_train_loss']:.4f}")
    log(f"wrote {out / 'metrics.json'}, metrics.csv, {plots[0].name}, {plots[1].name}"
        + (f", {CHECKPOINT}" if (cfg.checkpoint or cfg.resume) and len(history) > done else ""))
    return metrics


def compare(cfg, optimizers, log=print):
    """``fastopt compare``: the same model from the same initial weights (``cfg.seed``) and the
    same batches, once per optimizer (each with its DEFAULT_LR unless ``cfg.lr``). Writes
    loss.png, accuracy.png, metrics.json, metrics.csv in ``cfg.out``; returns the metrics
    dict, whose ``table`` rows go with COMPARE_HEADERS. Model "logreg": the full-batch comparison
    of :mod:`.fullbatch`, with its own headers (lbfgs and newton need it)."""
    bases = {name: split_variant(name)[0] for name in optimizers}
    if uses_full_batch(cfg, list(bases.values()), strict=False):
        if bases != {name: name for name in optimizers}:
            raise UsageError(f"--optimizers: the full-batch runs (--model {cfg.model}) take no :variants")
        return full_batch(cfg, optimizers, log)
    device, data = open_run(cfg, log)
    log(f"data: {describe_data(data)}")
    steps = steps_per_epoch(cfg, data)
    built = {}
    for name in optimizers:  # a variant's settings apply to its own model and optimizer
        try:
            built[name] = build(dataclasses.replace(cfg, **split_variant(name)[1]), data, device, steps,
                                name=bases[name], strict=False)
        except UsageError as e:
            raise UsageError(f"--optimizers {name}: {e}") from None
    notes(cfg, len(data.x_train), log)
    out = Path(cfg.out)
    open_out(out, log)
    data = data.to(device)
    runs, rows, table = {}, [], []
    with thread_limits(cfg.threads):
        for name in optimizers:
            model, opt, ema = built.pop(name)  # then freed, with the activations it holds, after its run
            init_loss, init_acc = evaluate(model, data.x_test, data.y_test)
            log(f"{name}: {describe_optimizer(opt, cfg.schedule, cfg.epochs * steps)}")
            history, step_losses, diverged = fit(cfg, data, model, opt, ema, log, label=f"{name}: ")
            summary = summarize(history, diverged)
            _, kwargs = optimizer_kwargs(bases[name], cfg.lr, cfg.hyper, strict=False)
            runs[name] = dict(hyper=kwargs, initial=dict(test_loss=init_loss, test_acc=init_acc), epochs=history,
                              step_loss=step_losses, summary=summary)
            rows += [{"optimizer": name, **r} for r in history]
            table.append((name, kwargs["lr"], summary["final_train_loss"], summary["final_test_acc"],
                          summary["best_test_acc"], summary["seconds_per_epoch"], summary["seconds"]))
            del model, opt, ema
    metrics = {"command": "compare", "config": cfg.as_dict(), "device": device, "data": data.name,
               "optimizers": list(optimizers), "runs": runs, "table": {"headers": COMPARE_HEADERS, "rows": table}}
    write_metrics(out, metrics, rows, COMPARE_FIELDS)
    plot_comparison(out, runs, steps, f"{cfg.model} on {data.name}", len(data.x_test), cfg.ema)
    return metrics
