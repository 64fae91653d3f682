"""fastopt.app (train, recipes, prepare, loop, outputs): model builders, optimizer and schedule construction
from settings, weight decay groups, the epoch loop (progress, per-step losses, accuracy), MNIST files, EMA and
clipping, checkpoints (refusals, another device), and the outputs' helpers."""
import dataclasses
import gzip
import io
import json
import math
import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import fastopt
import fastopt.plots
from fastopt import nn
from fastopt.app import data as D
from fastopt.app import loop as L
from fastopt.app import outputs as O
from fastopt.app import prepare as P
from fastopt.app import recipes as R
from fastopt.app import train as T
from fastopt.app.config import Config, UsageError
from fastopt.checkpoint import atomic_write

try:
    import cupy
except ImportError:
    cupy = None

DIGITS = P.load_dataset(limit=160)  # standardized digits, the first 160 train and test images


def tiny_config(tmp_path, **changes):
    return Config(**{"epochs": 2, "limit": 160, "out": str(tmp_path / "run"), "progress": False, **changes})


def quiet(*_):
    pass


# (model, input shape, classes): the digits, MNIST, and a flat input for the MLP
SHAPES = [("mlp", (1, 8, 8), 10), ("mlp", (1, 28, 28), 10), ("mlp", (64,), 3),
          ("conv", (1, 8, 8), 10), ("conv", (1, 28, 28), 10), ("conv", (3, 12, 10), 5)]


@pytest.mark.parametrize("name,shape,classes", SHAPES, ids=[f"{m}-{'x'.join(map(str, s))}" for m, s, _ in SHAPES])
def test_build_model_forward_and_backward_shapes(name, shape, classes):
    model = R.build_model(name, shape, classes, np.float64, "cpu", seed=0)
    x = np.random.default_rng(0).standard_normal((4, *shape))
    logits = model(x)
    assert logits.shape == (4, classes) and np.isfinite(logits).all()
    _loss, dlogits = nn.softmax_cross_entropy(logits, np.arange(4) % classes)
    model.backward(dlogits)
    assert all(g.shape == p.shape for g, p in zip(model.buffer.grads, model.buffer.params))
    assert np.abs(model.buffer.grad_arena).sum() > 0


def test_build_model_same_seed_same_weights_and_bad_input():
    a, b, c = (R.build_model("conv", (1, 8, 8), 10, seed=s) for s in (3, 3, 4))
    assert np.array_equal(a.buffer.arena, b.buffer.arena)
    assert not np.array_equal(a.buffer.arena, c.buffer.arena)
    with pytest.raises(UsageError, match="--model conv needs images"):
        R.build_model("conv", (64,), 10)
    with pytest.raises(UsageError, match="--model must be one of"):
        R.build_model("resnet", (1, 8, 8), 10)


# (name, explicit hyper-parameters, strict, expected class, expected kwargs subset, error)
KWARGS = [
    ("momentum", {}, True, fastopt.SGD, {"momentum": 0.9, "lr": R.DEFAULT_LR["momentum"]}, None),
    ("lars", {"weight_decay": 1e-3}, True, fastopt.OPTIMIZERS["lars"], {"momentum": 0.9, "weight_decay": 1e-3}, None),
    ("nesterov", {"momentum": 0.5}, True, fastopt.SGD, {"momentum": 0.5, "nesterov": True}, None),
    ("sgd", {"momentum": 0.8, "nesterov": True}, True, fastopt.SGD, {"momentum": 0.8, "nesterov": True}, None),
    ("adam", {"betas": (0.8, 0.99), "eps": 1e-6}, True, fastopt.Adam, {"betas": (0.8, 0.99), "eps": 1e-6}, None),
    ("rmsprop", {"alpha": 0.9, "centered": True}, True, fastopt.RMSprop, {"alpha": 0.9, "centered": True}, None),
    ("adadelta", {"rho": 0.95}, True, fastopt.Adadelta, {"rho": 0.95, "lr": R.DEFAULT_LR["adadelta"]}, None),
    ("adam", {"momentum": 0.9}, True, None, None, "--momentum does not apply to adam"),
    ("adam", {"momentum": 0.9, "eps": 1e-7}, False, fastopt.Adam, {"eps": 1e-7}, None),
    ("adamz", {}, True, None, None, "--optimizer must be one of"),
]


@pytest.mark.parametrize("name,hyper,strict,cls,expected,error", KWARGS)
def test_optimizer_kwargs(name, hyper, strict, cls, expected, error):
    if error:
        with pytest.raises(UsageError, match=error):
            R.optimizer_kwargs(name, None, hyper, strict)
        return
    got_cls, kwargs = R.optimizer_kwargs(name, None, hyper, strict)
    assert got_cls is cls
    assert {k: kwargs[k] for k in expected} == expected
    assert set(kwargs) <= set(R.accepted_hyper(cls))  # nothing the class would refuse


def test_every_optimizer_lowers_the_loss(tmp_path):
    """Each name, with its default lr, trains the MLP: the last epoch's loss is below the first step's."""
    data = P.Dataset("digits", DIGITS.x_train, DIGITS.y_train, DIGITS.x_test, DIGITS.y_test, 10)
    cfg = tiny_config(tmp_path, model="mlp", epochs=3)
    for name in R.OPTIMIZER_NAMES:
        model = R.build_model("mlp", data.in_shape, 10, seed=0)
        opt, _ = R.make_optimizer(cfg, model, 5, name=name)
        history, step_losses, diverged = L.fit(cfg, data, model, opt, None, quiet)
        assert not diverged, name
        assert history[-1]["train_loss"] < 0.8 * step_losses[0], name


# (schedule, settings, [(step, expected lr as a function of lr0 and steps per epoch S)])
SCHEDULE_CASES = [
    ("constant", {}, [(0, lambda a, S: a), (99, lambda a, S: a)]),
    ("step", {"decay_rate": 0.5, "decay_every": 2}, [(2 * 10 - 1, lambda a, S: a), (2 * 10, lambda a, S: a / 2),
                                                     (4 * 10, lambda a, S: a / 4)]),
    ("exp", {"decay_rate": 0.25}, [(10, lambda a, S: a * 0.25), (5, lambda a, S: a * 0.5)]),
    ("inverse_time", {"decay_rate": 0.5}, [(10, lambda a, S: a * 0.5), (30, lambda a, S: a * 0.25)]),
    ("cosine", {"final_lr": 1e-4}, [(0, lambda a, S: a), (30, lambda a, S: (a + 1e-4) / 2),
                                    (60, lambda a, S: 1e-4)]),
    ("warmup_cosine", {"warmup_steps": 10}, [(0, lambda a, S: 0.0), (5, lambda a, S: a / 2), (10, lambda a, S: a),
                                             (60, lambda a, S: 0.0)]),
]


@pytest.mark.parametrize("name,settings,points", SCHEDULE_CASES, ids=[c[0] for c in SCHEDULE_CASES])
def test_schedules_follow_their_definitions(name, settings, points):
    cfg = Config(schedule=name, epochs=6, **settings)  # 6 epochs of S = 10 steps: 60 steps
    lr = R.make_schedule(cfg, 0.1, steps_per_epoch=10)
    for t, expected in points:
        value = lr(t) if callable(lr) else lr
        assert value == pytest.approx(expected(0.1, 10), rel=1e-12, abs=1e-15), (name, t)


def test_schedule_errors_name_the_flag():
    with pytest.raises(UsageError, match="--schedule warmup_cosine: total_steps"):
        R.make_schedule(Config(schedule="warmup_cosine", warmup_steps=100, epochs=1), 0.1, 10)
    with pytest.raises(UsageError, match="--schedule must be one of"):
        R.make_schedule(Config(schedule="linear"), 0.1, 10)


@pytest.mark.parametrize("optimizer,hyper,groups", [("adam", {}, 1), ("adam", {"weight_decay": 1e-4}, 2),
                                                     ("adamw", {}, 2), ("sgd", {"l1": 1e-5}, 2), ("lamb", {}, 2),
                                                     ("lamb", {"weight_decay": 0.0}, 2), ("lars", {}, 2),
                                                     ("lars", {"always_adapt": True}, 2),
                                                     ("lars", {"always_adapt": True, "weight_decay": 0.0}, 2)])
def test_penalties_skip_biases_and_batchnorm(tmp_path, optimizer, hyper, groups):
    model = R.build_model("conv", (1, 8, 8), 10)
    opt, _ = R.make_optimizer(tiny_config(tmp_path, optimizer=optimizer, hyper=hyper), model, 5)
    assert len(opt.param_groups) == groups
    if groups == 2:
        weights, others = opt.param_groups
        assert all(p.ndim >= 2 for p in weights["params"]) and all(p.ndim == 1 for p in others["params"])
        assert len(weights["params"]) + len(others["params"]) == len(model.buffer)
        assert all(others[k] == v for k, v in R.EXEMPT.items() if k in others)
        assert any(weights[k] != v for k, v in R.EXEMPT.items() if k in weights)
        assert not others.get("always_adapt", False)  # no trust ratio for biases and BatchNorm, ever


def test_epoch_order_and_dropout_are_functions_of_seed_and_epoch():
    perm = lambda s, e: L.epoch_order_rng(s, e).permutation(100)  # noqa: E731
    assert np.array_equal(perm(1, 2), perm(1, 2))
    assert not np.array_equal(perm(1, 2), perm(1, 3)) and not np.array_equal(perm(1, 2), perm(2, 2))
    seeds = {L.epoch_dropout_seed(s, e) for s in range(3) for e in range(3)}
    assert len(seeds) == 9 and L.epoch_dropout_seed(1, 2) == L.epoch_dropout_seed(1, 2)


def test_train_epoch_progress_losses_and_accuracy():
    """The bar counts every example and shows loss and accuracy; the per-step losses are
    those of the batches; the accuracy is the share of right answers in training mode."""
    from tqdm import tqdm
    x, y = DIGITS.x_train, DIGITS.y_train
    model = R.build_model("mlp", DIGITS.in_shape, 10, seed=0)
    twin = R.build_model("mlp", DIGITS.in_shape, 10, seed=0)
    opt, twin_opt = fastopt.Adam(model.buffer, lr=1e-3), fastopt.Adam(twin.buffer, lr=1e-3)
    bar = tqdm(total=len(x), file=io.StringIO(), disable=False)
    losses, acc = L.train_epoch(model, opt, None, x, y, 50, seed=5, epoch=1, bar=bar)
    assert bar.n == len(x) and "loss=" in str(bar.postfix) and "acc=" in str(bar.postfix)
    assert losses.shape == (math.ceil(len(x) / 50),)
    # the same epoch by hand: same order, same dropout, same updates
    twin.train()
    twin.reseed(L.epoch_dropout_seed(5, 1))
    expected, right = [], 0
    for xb, yb in D.batches(x, y, 50, rng=L.epoch_order_rng(5, 1)):
        logits = twin(xb)
        loss, d = nn.softmax_cross_entropy(logits, yb)
        twin.backward(d, need_dx=False)
        twin_opt.step()
        expected.append(float(loss))
        right += int((logits.argmax(1) == yb).sum())
    np.testing.assert_array_equal(losses, expected)
    assert acc == right / len(x)
    assert np.array_equal(model.buffer.arena, twin.buffer.arena)


def test_evaluate_matches_a_direct_count():
    model = R.build_model("conv", DIGITS.in_shape, 10, seed=1)
    loss, acc = L.evaluate(model, DIGITS.x_test, DIGITS.y_test, batch_size=64)
    logits = model(DIGITS.x_test)
    assert acc == np.mean(logits.argmax(1) == DIGITS.y_test)
    assert loss == pytest.approx(float(nn.softmax_cross_entropy(logits, DIGITS.y_test)[0]), rel=1e-5)


def test_load_dataset_standardizes_with_training_statistics():
    raw = D.load_digits(seed=P.DIGITS_SPLIT_SEED)
    data = P.load_dataset()
    assert len(data.x_train) == len(raw[0]) and data.n_classes == 10
    assert abs(float(data.x_train.mean())) < 1e-5 and float(data.x_train.std()) == pytest.approx(1, rel=1e-4)
    np.testing.assert_allclose(data.x_test * raw[0].std() + raw[0].mean(), raw[2], atol=1e-5)


def _idx(array):
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    return header + array.astype(np.uint8).tobytes()


@pytest.mark.parametrize("form", ["idx", "idx.gz", "npz"])
def test_mnist_files_train_end_to_end(tmp_path, form):
    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 256, (n, 28, 28)) for n in (24, 8)]
    labels = [rng.integers(0, 10, n) for n in (24, 8)]
    if form == "npz":
        path = tmp_path / "mnist.npz"
        np.savez(path, x_train=arrays[0].astype(np.uint8), y_train=labels[0], x_test=arrays[1].astype(np.uint8),
                 y_test=labels[1])
    else:
        path = tmp_path / "mnist"
        path.mkdir()
        names = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                 "t10k-labels-idx1-ubyte"]
        for name, a in zip(names, [arrays[0], labels[0], arrays[1], labels[1]]):
            blob = _idx(a)
            (path / (name + (".gz" if form.endswith("gz") else ""))).write_bytes(
                gzip.compress(blob) if form.endswith("gz") else blob)
    metrics = T.train(tiny_config(tmp_path, data=str(path), limit=None, epochs=1, batch_size=8), log=quiet)
    assert metrics["data"].startswith("mnist:") and len(metrics["epochs"]) == 1
    assert "Linear(1568, 64" in metrics["model"]["layers"]  # 32 channels x 7 x 7 after two poolings


def test_missing_and_malformed_data_raise_data_errors(tmp_path):
    with pytest.raises(D.DataError, match="no such file"):
        P.load_dataset(str(tmp_path / "absent"))
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(D.DataError, match=r"bad\.npz"):
        P.load_dataset(str(tmp_path / "bad.npz"))


def test_resume_refuses_another_run(tmp_path):
    T.train(tiny_config(tmp_path, model="mlp", epochs=1, checkpoint=True), log=quiet)
    # the lr it ran with, not "None" for "the default"
    with pytest.raises(UsageError, match=r"another run: lr=0\.003 there, 0\.5 here"):
        T.train(tiny_config(tmp_path, model="mlp", lr=0.5, resume=True), log=quiet)
    # the default given explicitly is the same run
    T.train(tiny_config(tmp_path, model="mlp", lr=R.DEFAULT_LR["adam"], epochs=2, resume=True), log=quiet)
    # a schedule laid out over the run: the epochs may not change either
    T.train(tiny_config(tmp_path, model="mlp", epochs=1, schedule="cosine", checkpoint=True,
                        out=str(tmp_path / "cos")), log=quiet)
    with pytest.raises(UsageError, match="epochs=1 there, 2 here"):
        T.train(tiny_config(tmp_path, model="mlp", schedule="cosine", resume=True, out=str(tmp_path / "cos")),
                log=quiet)
    with pytest.raises(UsageError, match="no checkpoint in"):
        T.train(tiny_config(tmp_path, model="mlp", resume=True, out=str(tmp_path / "elsewhere")), log=quiet)


def test_a_checkpoint_is_one_file(tmp_path):
    """Model, optimizer, EMA and progress in one .npz, published by one rename: no pair of files
    that an interruption between two writes could leave from two different epochs."""
    T.train(tiny_config(tmp_path, model="conv", ema=0.9, epochs=1, checkpoint=True), log=quiet)
    assert sorted(p.name for p in (tmp_path / "run").iterdir() if "checkpoint" in p.name) == [O.CHECKPOINT]
    with np.load(tmp_path / "run" / O.CHECKPOINT) as f:
        groups = {k.split("/")[0] for k in f.files}
    assert groups == {"model", "optimizer", "ema", "step_losses", "meta"}


def _drop_first_buffer(arrays):
    del arrays[next(k for k in arrays if "running_" in k)]


def _reshape_first_buffer(arrays):
    key = next(k for k in arrays if "running_" in k)
    arrays[key] = arrays[key][:-1]


def _meta(**changes):
    def change(arrays):
        arrays["meta"] = np.array(json.dumps({**json.loads(str(arrays["meta"])), **changes}))
    return change


def _listed(spoil):
    """``spoil``, then the checkpoint's list of arrays made to agree (a consistent, wrong file)."""
    def change(arrays):
        spoil(arrays)
        _meta(arrays=sorted(k for k in arrays if k != "meta"))(arrays)
    return change


def _drop_state(arrays, param, name):
    """Remove one state array of the optimizer and its mention in the checkpoint's metadata."""
    del arrays[f"optimizer/state/{param}/{name}"]
    meta = json.loads(str(arrays["meta"]))
    del meta["optimizer"]["dict"]["state"]["dict"][param]["dict"][name]
    arrays["meta"] = np.array(json.dumps(meta))


# (how to spoil a conv + EMA run's checkpoint, the UsageError's words)
BAD_STATE = [
    (_drop_first_buffer, r"is damaged: missing array\(s\) model/1.running_mean"),
    (_listed(_drop_first_buffer), r"holds another model's arrays \(missing 1.running_mean; unknown none\)"),
    (_reshape_first_buffer, "the model does not fit: ValueError: state"),
    (lambda a: a.update({"ema/average/0": a["ema/average/0"][:1]}), r"ValueError: state_dict\['average'\]\[0\]"),
    (lambda a: a.update({"ema/average/0": a["ema/average/0"].astype(np.float64)}), "TypeError: state_dict"),
    (_meta(ema=None), "holds no EMA state"),
    (lambda a: a.pop("optimizer/state/0/exp_avg"), r"is damaged: missing array\(s\) optimizer/state/0/exp_avg$"),
    (_listed(lambda a: _drop_state(a, "0", "exp_avg")), "the optimizer state does not fit: ValueError: .*exp_avg"),
    (lambda a: a.update(extra=np.zeros(3)), r"is damaged: unknown array\(s\) extra"),
    (lambda a: a.pop("meta"), r"is not a checkpoint of fastopt train \(no meta entry\)"),
    (_meta(format="fastopt-checkpoint-1"), "it holds an optimizer alone, as fastopt.save writes it"),
    (_meta(history=None), "its meta entry lacks or garbles history"),
]


@pytest.mark.parametrize("spoil,message", BAD_STATE, ids=[m[:20] for _, m in BAD_STATE])
def test_resume_refuses_a_state_file_that_does_not_fit(tmp_path, spoil, message):
    cfg = tiny_config(tmp_path, model="conv", ema=0.9, epochs=1, checkpoint=True)
    T.train(cfg, log=quiet)
    path = tmp_path / "run" / O.CHECKPOINT
    with np.load(path) as f:
        arrays = {k: f[k] for k in f.files}
    spoil(arrays)
    np.savez(path, **arrays)
    spoiled = path.read_bytes()
    with pytest.raises(UsageError, match=message) as e:
        T.train(dataclasses.replace(cfg, epochs=2, checkpoint=False, resume=True), log=quiet)
    assert "\n" not in str(e.value) and str(path) in str(e.value)
    assert path.read_bytes() == spoiled  # never overwritten by a run that could not resume


def test_resume_on_another_device_continues_with_a_note(tmp_path):
    cfg = tiny_config(tmp_path, model="mlp", epochs=1, checkpoint=True)
    T.train(cfg, log=quiet)
    path = tmp_path / "run" / O.CHECKPOINT
    with np.load(path) as f:
        arrays = {k: f[k] for k in f.files}
    _meta(device="elsewhere")(arrays)
    np.savez(path, **arrays)
    lines = []
    metrics = T.train(dataclasses.replace(cfg, epochs=2, resume=True), log=lines.append)
    assert len(metrics["epochs"]) == 2
    assert any(line.startswith("note: the checkpoint was saved on elsewhere") for line in lines)


def test_divergence_stops_the_run_and_is_reported(tmp_path):
    lines = []
    metrics = T.train(tiny_config(tmp_path, model="mlp", optimizer="sgd", lr=1e12, epochs=5), log=lines.append)
    assert metrics["summary"]["diverged"] and len(metrics["epochs"]) < 5
    assert any("diverged" in line for line in lines)
    text = (tmp_path / "run" / "metrics.json").read_text()
    assert "NaN" not in text and json.loads(text)["summary"]["diverged"] is True


def test_clipping_moves_the_weights_less(tmp_path):
    moved = {}
    for clip in (None, 1e-3):
        cfg = tiny_config(tmp_path, model="mlp", optimizer="sgd", epochs=1, max_grad_norm=clip)
        model = R.build_model("mlp", DIGITS.in_shape, 10, seed=0)
        start = model.buffer.arena.copy()
        opt, _ = R.make_optimizer(cfg, model, 4)
        L.fit(cfg, DIGITS, model, opt, None, quiet)
        moved[clip] = float(np.linalg.norm(model.buffer.arena - start))
    steps = math.ceil(len(DIGITS.x_train) / 32)
    assert moved[1e-3] <= R.DEFAULT_LR["sgd"] * 1e-3 * steps * (1 + 1e-5) < moved[None]


def test_ema_is_evaluated_and_resumed(tmp_path):
    a = T.train(tiny_config(tmp_path, model="mlp", ema=0.9, checkpoint=True, out=str(tmp_path / "a")), log=quiet)
    T.train(tiny_config(tmp_path, model="mlp", ema=0.9, epochs=1, checkpoint=True, out=str(tmp_path / "b")),
            log=quiet)
    b = T.train(tiny_config(tmp_path, model="mlp", ema=0.9, resume=True, out=str(tmp_path / "b")), log=quiet)
    plain = T.train(tiny_config(tmp_path, model="mlp", out=str(tmp_path / "c")), log=quiet)
    pick = lambda m: [(r["train_loss"], r["test_loss"]) for r in m["epochs"]]  # noqa: E731
    assert pick(a) == pick(b)
    # same training, other weights evaluated
    assert [r["train_loss"] for r in plain["epochs"]] == [r["train_loss"] for r in a["epochs"]]
    assert [r["test_loss"] for r in plain["epochs"]] != [r["test_loss"] for r in a["epochs"]]


def test_thread_limits_set_blas_and_numba_together_and_restore_them():
    import numba
    from threadpoolctl import threadpool_info
    blas = lambda: [i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"]  # noqa: E731
    before = numba.get_num_threads(), blas()
    with P.thread_limits(1):
        assert numba.get_num_threads() == 1 and set(blas()) == {1}
    assert (numba.get_num_threads(), blas()) == before


def test_training_runs_under_its_thread_limit(tmp_path, monkeypatch):
    seen = []
    real = T.thread_limits
    monkeypatch.setattr(T, "thread_limits", lambda n: seen.append(n) or real(n))
    T.train(tiny_config(tmp_path, model="mlp", epochs=1), log=quiet)
    T.train(tiny_config(tmp_path, model="mlp", epochs=1, threads=2), log=quiet)
    assert seen == [1, 2]  # the default: one BLAS and one Numba thread


def test_kernel_threads_are_set_inside_and_restored():
    import numba
    before = numba.get_num_threads()
    with P.kernel_threads(1):
        assert numba.get_num_threads() == 1
    with P.kernel_threads(10 ** 6):  # more than the pool has: the whole pool
        assert numba.get_num_threads() == numba.config.NUMBA_NUM_THREADS
    assert numba.get_num_threads() == before


def test_smooth_is_a_trailing_mean():
    from fastopt.plots import smooth  # the loss plots use the centred mean now (no lag)
    values = np.array([4.0, 2.0, 6.0, 0.0, 8.0])
    expected = [4.0, 3.0, 4.0, 8 / 3, 14 / 3]
    np.testing.assert_allclose(smooth(values, 3), expected)
    np.testing.assert_array_equal(smooth(values, 1), values)


def test_json_safe_writes_no_nan():
    out = O.json_safe({"a": [np.float32(1.5), float("nan"), np.inf], "b": np.int64(3), "c": np.bool_(True)})
    assert json.loads(json.dumps(out, allow_nan=False)) == {"a": [1.5, None, None], "b": 3, "c": True}


def test_plot_accuracy_draws_0_and_100_percent(tmp_path):
    from matplotlib.image import imread
    a = imread(fastopt.plots.plot_accuracy(tmp_path / "a.png", {"x": [(0, 0.0), (1, 0.9), (2, 1.0)]}, "t", 100))
    b = imread(fastopt.plots.plot_accuracy(tmp_path / "b.png", {"x": [(0, 0.1), (1, 0.5), (2, 0.99)]}, "t", 100))
    assert a.shape[0] >= 400 and a.shape[1] >= 600 and a[..., :3].std() > 0.05
    assert a.shape == b.shape and not np.array_equal(a, b)


@pytest.mark.skipif(cupy is None, reason="CuPy is not installed")
def test_cuda_run_matches_cpu_closely(tmp_path):
    cpu = T.train(tiny_config(tmp_path, device="cpu", out=str(tmp_path / "cpu")), log=quiet)
    gpu = T.train(tiny_config(tmp_path, device="cuda", out=str(tmp_path / "gpu")), log=quiet)
    assert gpu["device"] == "cuda"
    np.testing.assert_allclose(gpu["step_loss"], cpu["step_loss"], rtol=1e-2, atol=1e-3)


# -- atomic writes (fastopt.checkpoint.atomic_write: checkpoints, metrics) ------------------------
def _temps(folder):
    return sorted(p.name for p in Path(folder).iterdir() if p.name.endswith(".tmp"))


def test_atomic_write_removes_the_orphans_of_earlier_saves_to_that_path_only(tmp_path):
    orphans = ["metrics.json.abcd_123.tmp", "metrics.json.zz9xk0qa.tmp"]
    others = ["metrics.json.keep.tmp", "metrics.csv.abcd_123.tmp", "metrics.json.abcd_123.tmp.bak",
              "xmetrics.json.abcd_123.tmp", "metrics.json.ABCD_123.tmp"]
    for name in orphans + others:
        (tmp_path / name).write_text("left by a killed save")
    atomic_write(tmp_path / "metrics.json", lambda f: f.write(b"new"))
    assert (tmp_path / "metrics.json").read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*others, "metrics.json"])


def test_a_failed_save_leaves_the_old_file_and_no_temporary_file(tmp_path):
    (tmp_path / "m.json").write_bytes(b"old")

    def fail(f):
        f.write(b"half")
        raise RuntimeError("disk full")
    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(tmp_path / "m.json", fail)
    assert [p.name for p in tmp_path.iterdir()] == ["m.json"] and (tmp_path / "m.json").read_bytes() == b"old"


SLOW_SAVE = """
import sys, time
from fastopt.checkpoint import atomic_write

def write(f):
    f.write(b"half of a checkpoint")
    f.flush()
    print("writing", flush=True)
    time.sleep(120)

atomic_write(sys.argv[1], write)
"""


def test_saves_killed_mid_write_leave_nothing_after_the_next_save(tmp_path):
    """Two child processes stop in the middle of a save. While they live, a save to the same
    path keeps their temporary files (they hold them locked); once they are killed (SIGKILL:
    no cleanup), the next save removes them."""
    target = tmp_path / "checkpoint.npz"
    target.write_bytes(b"old")
    children = [subprocess.Popen([sys.executable, "-c", SLOW_SAVE, str(target)], stdout=subprocess.PIPE, text=True)
                for _ in range(2)]
    try:
        assert [c.stdout.readline() for c in children] == ["writing\n"] * 2
        atomic_write(target, lambda f: f.write(b"meanwhile"))
        assert len(_temps(tmp_path)) == 2, _temps(tmp_path)
    finally:
        for c in children:
            c.kill()
            c.wait()
            c.stdout.close()
    assert len(_temps(tmp_path)) == 2 and target.read_bytes() == b"meanwhile"
    atomic_write(target, lambda f: f.write(b"new"))
    assert _temps(tmp_path) == [] and target.read_bytes() == b"new"


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002], ids=oct)
def test_outputs_follow_the_umask(tmp_path, umask):
    """Checkpoints and metrics get 0o666 less the umask, as every other tool's files (mkstemp
    alone made them 0o600 whatever the umask)."""
    before = os.umask(umask)
    try:
        T.train(tiny_config(tmp_path, model="mlp", epochs=1, checkpoint=True), log=quiet)
    finally:
        os.umask(before)
    run = tmp_path / "run"
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in run.iterdir()}
    assert modes == dict.fromkeys(modes, 0o666 & ~umask) and O.CHECKPOINT in modes and "metrics.json" in modes


# -- what a run says ----------------------------------------------------------------------------
def test_a_warmup_run_states_its_peak_lr_and_the_first_lr_that_moves(tmp_path):
    lines = []
    metrics = T.train(tiny_config(tmp_path, model="mlp", schedule="warmup_cosine", epochs=2, batch_size=8),
                      log=lines.append)  # 40 steps, 2 of warm-up
    header = next(line for line in lines if line.startswith("model: "))
    assert "lr 0.003 at the peak of the warmup_cosine schedule" in header and "lr=0.0" not in header
    first = metrics["epochs"][0]["lr"]
    assert 0 < first < 0.003  # the warm-up's first step has lr 0; its second does not
    epoch_1 = next(line for line in lines if line.startswith("epoch 1/2"))
    assert epoch_1.endswith(f"lr {first:.3g}") and not epoch_1.endswith("lr 0")


def test_plots_label_the_ema_curve_and_smooth_without_lag(tmp_path, monkeypatch):
    drawn = {}
    monkeypatch.setattr(O, "plot_accuracy", lambda path, curves, title, n: drawn.update(acc=(curves, n)) or Path(path))
    monkeypatch.setattr(O, "plot_curves", lambda path, curves, *a, **k: drawn.update(loss=curves) or Path(path))
    T.train(tiny_config(tmp_path, model="mlp", ema=0.9, batch_size=8), log=quiet)  # 20 steps per epoch
    curves, sizes = drawn["acc"]
    assert list(curves) == ["train (running, in training mode)", "test, with the EMA of the weights (decay 0.9)"]
    assert sizes == dict(zip(curves, (160, 160)))
    assert list(drawn["loss"]) == ["per step", "centred mean of 5 steps"]
    per_step, mean = drawn["loss"].values()
    np.testing.assert_allclose(mean, fastopt.plots.centred_mean(per_step, 5))


def test_a_batch_larger_than_the_training_set_is_said(tmp_path):
    lines = []
    T.train(tiny_config(tmp_path, model="mlp", batch_size=5000, epochs=1), log=lines.append)
    assert "note: --batch-size 5000 is more than the 160 training examples: every epoch is one step on the " \
           "whole training set" in lines


def test_a_run_into_an_earlier_runs_folder_says_what_it_replaces(tmp_path):
    first, second, third = [], [], []
    T.train(tiny_config(tmp_path, model="mlp", epochs=1, checkpoint=True), log=first.append)
    T.train(tiny_config(tmp_path, model="mlp", epochs=1), log=second.append)
    T.train(tiny_config(tmp_path, model="mlp", epochs=1, checkpoint=True), log=third.append)
    run = tmp_path / "run"
    assert not any(line.startswith("note: ") for line in first)
    assert f"note: {run} holds an earlier run's metrics.json, metrics.csv, loss.png, accuracy.png: this run " \
           "replaces them (--out DIR keeps runs apart)" in second
    assert f"note: {run / O.CHECKPOINT} is an earlier run's and stays; --resume would continue that run" in second
    assert any(line.startswith("note: ") and "accuracy.png, checkpoint.npz: this run replaces" in line
               for line in third)


def test_an_exploding_loss_is_warned_about_once(tmp_path):
    """--lr 100: the loss stays finite, the run ends at chance accuracy; one warning says why."""
    lines = []
    T.train(tiny_config(tmp_path, model="mlp", lr=100.0, epochs=3), log=lines.append)
    warnings = [line for line in lines if line.startswith("warning: ")]
    assert len(warnings) == 1, lines
    assert warnings[0].startswith("warning: the training loss exploded in epoch 1: ")
    assert warnings[0].endswith("the learning rate (peak 100) is probably too high")
    calm = []
    T.train(tiny_config(tmp_path, model="mlp", epochs=3), log=calm.append)
    assert not any("warning" in line for line in calm)


def test_a_loss_that_stops_being_finite_is_warned_about(tmp_path):
    lines = []
    T.train(tiny_config(tmp_path, model="mlp", optimizer="sgd", lr=1e12, epochs=5), log=lines.append)
    warnings = [line for line in lines if line.startswith("warning: ")]
    assert len(warnings) == 1 and ("became nan" in warnings[0] or "became inf" in warnings[0]
                                   or "exploded" in warnings[0]), lines


@pytest.mark.parametrize("settings,params,state,master", [
    ({}, np.float32, np.float32, False),
    (dict(precision="bf16"), "bfloat16", "bfloat16", False),  # torch's rule: state in the params' dtype
    (dict(precision="bf16", master_weights=True, state_dtype="float32"), "bfloat16", np.float32, True),
    (dict(precision="fp16"), np.float16, np.float32, False),  # float16 state would flush small v to zero
    (dict(precision="fp16", state_dtype="float16"), np.float16, np.float16, False),
])
def test_precision_settings_reach_the_model_and_optimizer(tmp_path, settings, params, state, master):
    from fastopt.kernels._formats import BY_NAME
    cfg = tiny_config(tmp_path, optimizer="adamw", **settings)
    model, opt, _ = P.build(cfg, DIGITS, "cpu", 5)
    params, state = (BY_NAME[d] if isinstance(d, str) else np.dtype(d) for d in (params, state))
    assert model.buffer.dtype == params and all(p.dtype == params for p in model.buffer.params)
    assert opt.state_dtype == state and opt.master_weights == master


@pytest.mark.parametrize("settings,bits,code", [({}, None, "fp8"), (dict(state_bits=8), 8, "fp8"),
                                                (dict(state_bits=8, state_code="dynamic"), 8, "dynamic")])
def test_8bit_settings_reach_the_optimizer(tmp_path, settings, bits, code):
    _, opt, _ = P.build(tiny_config(tmp_path, optimizer="adamw", **settings), DIGITS, "cpu", 5)
    assert (opt.state_bits, opt.state_code) == (bits, code)
