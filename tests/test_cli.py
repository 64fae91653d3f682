"""The ``fastopt`` command: each subcommand end to end on a tiny budget (the loss falls, the
accuracy beats chance, the PNGs are real pictures, the metrics parse), a resumed run equal
bit for bit to an uninterrupted one, complete --help, and bad arguments: one line, exit 2."""
import argparse
import csv
import gzip
import json
import re
import subprocess
import sys

import numpy as np
import pytest

from fastopt.app import flags as F
from fastopt.app import loop as L
from fastopt.app import outputs as O
from fastopt.app import prepare as P
from fastopt.app import recipes as R
from fastopt.app.cli import build_parser, main
from fastopt.app.config import UsageError
from fastopt.app.flags import HYPER_FLAGS, config_from_args

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TINY = ["--limit", "200", "--no-progress"]


def assert_png(path):
    from matplotlib.image import imread
    assert path.read_bytes()[:8] == PNG_MAGIC, path
    image = imread(path)
    assert image.shape[0] >= 300 and image.shape[1] >= 400, (path, image.shape)
    assert image[..., :3].std() > 0.05, f"{path} is blank"


def run(argv, capsys):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("model", ["mlp", "conv"])
def test_train_end_to_end(tmp_path, capsys, model):
    code, out, err = run(["train", "--model", model, "--epochs", 3, "--out", tmp_path, *TINY], capsys)
    assert code == 0, err
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    epochs = metrics["epochs"]
    assert [r["epoch"] for r in epochs] == [1, 2, 3]
    assert epochs[-1]["train_loss"] < epochs[0]["train_loss"] < metrics["step_loss"][0]
    assert epochs[-1]["test_acc"] > 0.5  # chance is 0.1
    assert all(r["examples_per_s"] > 0 and r["seconds"] > 0 for r in epochs)
    assert metrics["summary"]["final_test_acc"] == epochs[-1]["test_acc"]
    assert metrics["config"]["model"] == model and len(metrics["step_loss"]) == 3 * 7  # ceil(200 / 32) steps
    with open(tmp_path / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [float(r["test_acc"]) for r in rows] == [r["test_acc"] for r in epochs]
    for name in ("loss.png", "accuracy.png"):
        assert_png(tmp_path / name)
    assert "device: cpu" in out and out.count("epoch ") >= 3 and "done: 3 epochs" in out


def test_compare_end_to_end(tmp_path, capsys):
    names = ["sgd", "nesterov", "adam"]
    code, out, err = run(["compare", "--optimizers", ",".join(names), "--model", "mlp", "--epochs", 2,
                          "--out", tmp_path, *TINY], capsys)
    assert code == 0, err
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    runs = metrics["runs"]
    assert list(runs) == names
    # the same initial weights: every run starts from the same test loss
    assert len({r["initial"]["test_loss"] for r in runs.values()}) == 1
    for name, r in runs.items():
        assert r["hyper"]["lr"] == R.DEFAULT_LR[name]
        assert r["epochs"][-1]["train_loss"] < r["step_loss"][0] and r["epochs"][-1]["test_acc"] > 0.3
    for name in ("loss.png", "accuracy.png"):
        assert_png(tmp_path / name)
    table = out[out.index("optimizer "):].splitlines()
    assert [line.split()[0] for line in table[2:2 + len(names)]] == names
    with open(tmp_path / "metrics.csv") as f:
        assert [r["optimizer"] for r in csv.DictReader(f)] == [n for n in names for _ in range(2)]


def test_compare_runs_precision_variants_side_by_side(tmp_path, capsys):
    """NAME:VARIANT runs the optimizer with the variant's settings on its own model, from the
    same initial weights (rounded to the variant's storage) and the same batches."""
    names = ["adamw", "adamw:bf16", "adamw:bf16:sr", "adamw:8bit"]
    code, _, err = run(["compare", "--optimizers", ",".join(names), "--model", "mlp", "--epochs", 2,
                          "--out", tmp_path, *TINY], capsys)
    assert code == 0, err
    runs = json.loads((tmp_path / "metrics.json").read_text())["runs"]
    assert list(runs) == names and all(r["hyper"]["lr"] == R.DEFAULT_LR["adamw"] for r in runs.values())
    losses = {name: r["step_loss"] for name, r in runs.items()}
    assert len({tuple(v) for v in losses.values()}) == len(names)  # each variant changed the run
    # a variant's first step sees the fp32 run's loss to within bfloat16's rounding of the weights
    assert abs(losses["adamw:bf16"][0] - losses["adamw"][0]) < 0.05 * losses["adamw"][0]
    assert losses["adamw:8bit"][0] == losses["adamw"][0]  # the same params: only the state differs


def test_valley_end_to_end(tmp_path, capsys):
    code, out, err = run(["valley", "--optimizers", "sgd,momentum,adam", "--steps", 60, "--out", tmp_path], capsys)
    assert code == 0, err
    assert_png(tmp_path / "valley.png")
    rows = json.loads((tmp_path / "metrics.json").read_text())["rows"]
    assert [(r["problem"], r["optimizer"]) for r in rows] == [(p, o) for p in ("quadratic", "rosenbrock")
                                                                for o in ("sgd", "momentum", "adam")]
    assert "distance to minimum" in out and out.count("rosenbrock") == 3


def test_bench_checks_against_the_reference(capsys):
    code, out, err = run(["bench", "-n", 5000, "--steps", 3, "--device", "cpu"], capsys)
    assert code == 0, err
    assert "5,000 float32 params" in out and "max |fastopt - float64 NumPy reference|" in out


def test_counts_may_be_written_like_the_help_writes_them(capsys):
    """The help says "default: 1e7": -n 1e3 (and --epochs 1e0) are integers too."""
    code, out, err = run(["bench", "-n", "1e3", "--steps", 2, "--device", "cpu"], capsys)
    assert code == 0, err
    assert "1,000 float32 params" in out
    args = build_parser().parse_args(["train", "--epochs", "1e1", "--batch-size", "6.4e1", "--limit", "2_000"])
    assert (args.epochs, args.batch_size, args.limit) == (10, 64, 2000)
    assert isinstance(args.epochs, int)


def test_threads_flag_and_its_old_name(capsys):
    for flag in ("--threads", "--kernel-threads"):
        assert build_parser().parse_args(["train", flag, "2"]).threads == 2
    assert build_parser().parse_args(["train"]).threads == 1


PRECISION_RUNS = [["--precision", "bf16", "--stochastic-rounding", "--optimizer", "adamw"],
                  ["--precision", "fp16", "--master-weights"],
                  ["--precision", "bf16", "--master-weights", "--state-bits", 8, "--optimizer", "adamw"],
                  ["--state-bits", 8, "--state-code", "dynamic", "--optimizer", "lion"]]


@pytest.mark.parametrize("model,schedule,precision", [("mlp", "constant", []), ("conv", "exp", [])]
                         + [("mlp", "constant", p) for p in PRECISION_RUNS],
                         ids=lambda v: " ".join(map(str, v)) if isinstance(v, list) else v)
def test_resume_is_bit_exact(tmp_path, capsys, model, schedule, precision):
    """Two epochs in one go == one epoch, stop, --resume to two: parameters, optimizer
    state, BatchNorm statistics (conv), Dropout masks (mlp) and every metric but the clock;
    with 16-bit params (their bits saved), master weights, stochastic rounding, 8-bit state."""
    common = ["--model", model, "--schedule", schedule, "--checkpoint", *precision, *TINY]
    assert run(["train", *common, "--epochs", 2, "--out", tmp_path / "a"], capsys)[0] == 0
    assert run(["train", *common, "--epochs", 1, "--out", tmp_path / "b"], capsys)[0] == 0
    code, out, err = run(["train", *common, "--epochs", 2, "--resume", "--out", tmp_path / "b"], capsys)
    assert code == 0, err
    assert "resumed from" in out and out.count("epoch 2/2") == 1 and "epoch 1/2" not in out
    name = O.CHECKPOINT  # model, optimizer and progress: one file
    with np.load(tmp_path / "a" / name) as a, np.load(tmp_path / "b" / name) as b:
        assert a.files == b.files
        for key in a.files:
            if key != "meta":  # meta holds the clock readings
                assert np.array_equal(a[key], b[key]), (name, key)
    with np.load(tmp_path / "a" / name) as a:
        assert any(k.startswith("model/") and "running_" in k for k in a.files) == (model == "conv")
        assert any(k.startswith("optimizer/state/") for k in a.files)
        kept = json.loads(str(a["meta"]))["bfloat16"]
        assert ("model/1.weight" in kept) == ("bf16" in precision), kept
        assert all(a[k].dtype == np.uint16 for k in kept)
    ma, mb = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in "ab")
    strip = lambda m: [{k: v for k, v in r.items() if k not in L.CLOCK_FIELDS} for r in m["epochs"]]  # noqa: E731
    assert strip(ma) == strip(mb) and ma["step_loss"] == mb["step_loss"]


def _without_a_state_array(path):
    with np.load(path) as f:
        arrays = {k: f[k] for k in f.files}
    del arrays[next(k for k in arrays if k.startswith("optimizer/state/"))]
    np.savez(path, **arrays)


# (how to break a checkpoint, the words of the one error line after "<path>")
BROKEN_CHECKPOINTS = [
    (lambda p: p.write_bytes(b""), ": not a readable .npz file: it is empty"),
    (lambda p: p.write_bytes(np.random.default_rng(0).bytes(4096)),
     ": not a readable .npz file: it starts with the bytes"),
    (lambda p: np.save(p.with_suffix(".npy"), np.zeros(3)) or p.with_suffix(".npy").replace(p),
     ": not a readable .npz file: it is a .npy file"),
    (lambda p: p.write_bytes(p.read_bytes()[:-100]), ": not a readable .npz file (a broken zip archive"),
    (_without_a_state_array, " is damaged: missing array(s) optimizer/state/"),
]


@pytest.mark.parametrize("spoil,message", BROKEN_CHECKPOINTS, ids=["empty", "random", "npy", "cut", "no-state"])
def test_resume_from_a_broken_checkpoint_is_one_line_and_keeps_the_file(tmp_path, capsys, spoil, message):
    common = ["--model", "mlp", "--checkpoint", "--out", tmp_path, *TINY]
    assert run(["train", *common, "--epochs", 1], capsys)[0] == 0
    path = tmp_path / O.CHECKPOINT
    spoil(path)
    broken = path.read_bytes()
    code, out, err = run(["train", *common, "--epochs", 2, "--resume"], capsys)
    assert code == 2 and "Traceback" not in out + err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"fastopt: error: --resume: {path}{message}"), err
    assert path.read_bytes() == broken  # not overwritten


def test_the_optimizer_flags_are_the_rules_options_with_each_optimizers_default(capsys):
    """One flag per option any optimizer's rule declares (lr has --lr; training never maximizes),
    its help naming the optimizers that take it and each one's default, presets included."""
    import fastopt
    declared = {n for cls in fastopt.OPTIMIZERS.values() for n in cls.rule.hyper} - set(R.NOT_FLAGS)
    assert set(HYPER_FLAGS.values()) == declared
    code, out, _ = run(["train", "--help"], capsys)
    text = " ".join(out.split())  # argparse wraps the help
    assert code == 0 and all(flag in out for flag in HYPER_FLAGS)
    assert "--betas B1,B2 decay rates of the first and second moment (adam, adamw, adamax, nadam, radam, lion, " \
           "lamb; default 0.9,0.999, 0.9,0.99 for lion)" in text
    assert "(every optimizer; default 0, 0.01 for adamw and lamb, 0.0005 for lars)" in text
    assert "--no-bias-correction turn off the bias correction" in text and "--maximize" not in text
    args = build_parser().parse_args(["train", "--momentum", "0.5", "--betas", "0.8,0.99", "--no-bias-correction",
                                      "--nesterov", "--l1-mode", "proximal", "--clamp-value", "10"])
    assert config_from_args(args).hyper == {"momentum": 0.5, "betas": (0.8, 0.99), "bias_correction": False,
                                            "nesterov": True, "l1_mode": "proximal", "clamp_value": 10.0}
    assert config_from_args(build_parser().parse_args(["train"])).hyper == {}


def test_an_option_a_rule_gains_is_a_flag(monkeypatch):
    """Adding an option to a rule's declaration adds its flag, typed by its default and checked
    by the rule's own check, without a change to the application."""
    import fastopt
    rule = fastopt.OPTIMIZERS["adam"].rule
    Hyper = type(rule.hyper["lr"])

    def positive(values):
        if min(values) <= 0:
            raise ValueError(f"Invalid gamma value: {values}")
    monkeypatch.setitem(rule.hyper, "gamma", Hyper("gamma", (0.5, 0.25, 0.125), positive, doc="a new option"))
    monkeypatch.setitem(rule.hyper, "frozen_bias", Hyper("frozen_bias", True))
    monkeypatch.setitem(rule.hyper, "depth", Hyper("depth", 3))
    flags = {f.names[0]: f for f in F.hyper_flags(R.hyper_options())}
    assert flags["--gamma"].help == "a new option (adam; default 0.5,0.25,0.125)"
    parser = argparse.ArgumentParser(exit_on_error=False)
    for f in flags.values():
        parser.add_argument(*f.names, default=None, help=f.help, **f.options)
    args = parser.parse_args(["--gamma", "1,2,3", "--no-frozen-bias", "--depth", "1e1"])
    assert getattr(args, F.hyper_dest("gamma")) == (1.0, 2.0, 3.0)
    assert getattr(args, F.hyper_dest("frozen_bias")) is False and getattr(args, F.hyper_dest("depth")) == 10
    for bad, words in ((["--gamma", "1,2"], "must be three numbers like 0.5,0.25,0.125"),
                       (["--gamma", "1,-2,3"], "(invalid gamma value: (1.0, -2.0, 3.0))")):
        with pytest.raises(argparse.ArgumentError, match=re.escape(words)):
            parser.parse_args(bad)


def test_each_flag_is_declared_once_for_every_command_that_takes_it():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for command, p in sub.choices.items():
        taken = {name for a in p._actions for name in a.option_strings} - {"-h", "--help"}
        declared = {name for f in F.FLAGS if command in f.commands for name in f.names}
        declared |= {"--no-" + f.names[0][2:] for f in F.FLAGS  # a switch's pair: --x, --no-x
                     if command in f.commands and f.options.get("action") is argparse.BooleanOptionalAction}
        assert taken == declared, command
    shared = {f.names[0]: f.commands for f in F.FLAGS if len(f.commands) > 1}
    assert shared["--out"] == ("train", "compare", "valley") and shared["--device"] == ("train", "compare", "bench")
    with pytest.raises(AssertionError, match="--epochs declared twice"):
        F._check_table([*F.FLAGS, F.flag("--epochs", help="again")])


APP_FLOORS = ("config", "data", "valley", "recipes", "prepare", "loop", "outputs", "fullbatch", "train", "flags",
              "cli")  # fastopt/app/__init__.py's order: each module imports only those before it


def test_the_app_is_the_top_floor_and_has_no_import_cycle():
    """Nothing in the library imports fastopt.app (``python -m fastopt`` aside), and each app
    module imports only the app modules listed before it: no cycle (train <-> fullbatch was one)."""
    import ast
    from pathlib import Path

    import fastopt
    root = Path(fastopt.__file__).parent
    assert sorted(p.stem for p in (root / "app").glob("*.py") if p.stem != "__init__") == sorted(APP_FLOORS)
    for path in root.rglob("*.py"):
        tree = ast.parse(path.read_text())
        found = [(n.level, n.module or "") for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
        found += [(0, a.name) for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
        if path.parent.name != "app":
            app = [m for level, m in found if m.startswith("fastopt.app") or (level == 1 and m.split(".")[0] == "app")]
            assert not app or path.name == "__main__.py", (path, app)
            continue
        if path.stem == "__init__":
            continue
        below = APP_FLOORS[:APP_FLOORS.index(path.stem)]
        for level, module in found:
            if level == 1:
                assert module in below, f"app/{path.name} imports .{module}, not below it in APP_FLOORS"


def test_help_is_complete(capsys):
    """Every option of every subcommand has a help text, and every optimizer flag is offered."""
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for name, p in sub.choices.items():
        for action in p._actions:
            assert action.help, f"fastopt {name} {action.option_strings} has no help"
    code, out, _ = run(["train", "--help"], capsys)
    assert code == 0
    for flag in [*HYPER_FLAGS, "--optimizer", "--lr", "--schedule", "--warmup-steps", "--decay-rate",
                 "--max-grad-norm", "--ema", "--model", "--batch-size", "--epochs", "--seed", "--device", "--out",
                 "--data", "--checkpoint", "--resume", "--no-progress"]:
        assert flag in out, flag
    assert "examples:" in out and "fastopt compare" in out


# (arguments, text the one error line must contain)
BAD = [
    (["train", "--optimizer", "adamm"], "invalid choice: 'adamm'"),
    (["train", "--lr", "-1"], "argument --lr: must be > 0, got -1"),
    (["train", "--lr", "0"], "argument --lr: must be > 0"),
    (["train", "--lr", "nan"], "argument --lr: must be > 0"),
    (["train", "--lr", "fast"], "argument --lr: expected a number"),
    (["train", "--betas", "0.9"], "argument --betas: must be two numbers"),
    (["train", "--betas", "0.9,1.0"], "argument --betas: must be two numbers"),
    (["train", "--epochs", "0"], "argument --epochs/-e: must be >= 1"),
    (["train", "--batch-size", "2.5"], "argument --batch-size/-b: expected an integer"),
    (["train", "--seed", "-3"], "argument --seed: must be >= 0"),
    (["train", "--ema", "1"], "argument --ema: must be in (0, 1)"),
    (["train", "--data", "{tmp}/no-such-mnist"], "no-such-mnist: no such file or directory"),
    (["train", "--data", "{tmp}/bad.npz"], "bad.npz: not a readable .npz file"),
    (["train", "--data", "{tmp}/negative.npz"], "negative.npz[y_train]: labels must be >= 0, got -1"),
    (["train", "--data", "{tmp}/text.npz"], "text.npz[y_train]: labels must be integer class indices"),
    (["train", "--data", "{tmp}/object.npz"], "object.npz[y_train]: unreadable array"),
    (["train", "--data", "{tmp}/notes.txt"], "notes.txt: not a readable .npz file: it is a text file (--data takes"),
    (["train", "--data", "{tmp}/t10k-labels-idx1-ubyte.gz"],
     "t10k-labels-idx1-ubyte.gz: not a readable .npz file: it is gzip data (a single .gz file?"),
    (["train", "--momentum", "0.9"], "--momentum does not apply to adam"),
    (["train", "--optimizer", "sgd", "--nesterov"], "Nesterov momentum requires a momentum"),
    (["train", "--schedule", "warmup_cosine", "--warmup-steps", "100000"], "--schedule warmup_cosine"),
    (["train", "--resume", "--out", "{tmp}/fresh"], "--resume: no checkpoint in"),
    (["train", "--out", "{tmp}/bad.npz"], "--out {tmp}/bad.npz: cannot make this folder (File exists)"),
    (["train", "--out", "{tmp}/bad.npz/sub"], "--out {tmp}/bad.npz/sub: cannot make this folder (Not a directory)"),
    (["train", "--checkpoint", "--out", "{tmp}/taken"], "checkpoint.npz there is a folder, where this run writes"),
    (["bench", "-n", "1e30"], "argument -n: must be between 1 and 1e9, got 1e30"),
    (["compare", "--optimizers", "adam:bf16:fp16"], "--optimizers adam:bf16:fp16: 'fp16' sets precision again"),
    (["compare", "--optimizers", "sgd,adamm"], "unknown optimizer 'adamm'"),
    (["valley", "--optimizers", "sgd,sgd"], "optimizer listed twice"),
    (["bench", "-n", "0"], "argument -n: must be between 1 and 1e9, got 0"),
    (["bench", "-n", "2.5"], "argument -n: expected an integer, got '2.5'"),
    (["bench", "-n", "1e999"], "argument -n: expected an integer, got '1e999'"),
    (["train", "--threads", "0"], "argument --threads/--kernel-threads: must be >= 1"),
    (["fly"], "invalid choice: 'fly'"),
    (["compare", "--optimizers", "adamw:bf8"], "unknown optimizer 'adamw:bf8'; choose from"),
    (["compare", "--optimizers", "lamb:bf16"], "--optimizers lamb:bf16: --optimizer lamb: LAMB takes float32"),
    (["compare", "--optimizers", "adamw:master"], "--optimizers adamw:master: --master-weights is for 16-bit"),
    (["compare", "--optimizers", "lbfgs,adam:bf16", "--model", "logreg"], "take no :variants"),
    (["train", "--precision", "bf8"], "argument --precision: invalid choice: 'bf8'"),
    (["train", "--master-weights"], "--master-weights is for 16-bit params: add --precision bf16 or fp16"),
    (["train", "--stochastic-rounding"], "--stochastic-rounding is for 16-bit params"),
    (["train", "--precision", "bf16", "--dtype", "float64"], "computes in float32: drop --dtype float64"),
    (["train", "--precision", "fp16", "--optimizer", "lamb"], "--optimizer lamb: "),
    (["train", "--state-bits", "4"], "argument --state-bits: invalid choice: 4"),
    (["train", "--state-bits", "8", "--optimizer", "adagrad"], "--optimizer adagrad: "),
    (["train", "--state-code", "dynamic"], "--state-code chooses the code of 8-bit state: add --state-bits 8"),
    (["train", "--state-bits", "8", "--state-code", "tree"], "argument --state-code: invalid choice: 'tree'"),
    (["train", "--optimizer", "lbfgs", "--precision", "bf16"], "--precision does not apply to --model logreg"),
    (["train", "--decay-rate", "0.1"], "--decay-rate shapes the step, exp, inverse_time schedules, not --schedule "
                                       "constant"),
    (["train", "--schedule", "cosine", "--warmup-steps", "10"], "--warmup-steps shapes the warmup_cosine schedule, "
                                                                "not --schedule cosine"),
    (["compare", "--schedule", "exp", "--final-lr", "0"], "--final-lr shapes the cosine, warmup_cosine schedules"),
    (["train", "--schedule", "cosine", "--decay-every", "2"], "--decay-every shapes the step schedule"),
    (["train", "--state-bits", "8", "--optimizer", "sgd"], "--state-bits 8: --optimizer sgd keeps no state with "
                                                          "these options (sgd: add --momentum)"),
]


# --data files whose training labels are no class indices
BAD_LABELS = {"negative": np.array([0, 1, -1, 2]), "text": np.array(list("0123")),
              "object": np.arange(4).astype(object)}


@pytest.mark.parametrize("argv,message", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_arguments_give_one_line_and_exit_2(tmp_path, capsys, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)  # the default --out is relative: keep it out of the checkout
    (tmp_path / "bad.npz").write_bytes(b"this is not a zip archive")
    (tmp_path / "notes.txt").write_text("x_train, y_train\n")
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(bytes([0, 0, 8, 1, 0, 0, 0, 1, 7])))
    for name, labels in BAD_LABELS.items():
        images = np.zeros((4, 8, 8), np.uint8)
        np.savez(tmp_path / f"{name}.npz", x_train=images, y_train=labels, x_test=images, y_test=np.arange(4))
    (tmp_path / "taken" / "checkpoint.npz").mkdir(parents=True)
    message = message.format(tmp=tmp_path)
    argv = [a.format(tmp=tmp_path) for a in argv] + (["--no-progress"] if argv[0] == "train" else [])
    code, out, err = run(argv, capsys)
    assert code == 2
    assert not (tmp_path / "runs").exists() and not (tmp_path / "fresh").exists()  # nothing written
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fastopt: error: "), err
    assert message in lines[0]
    assert "Traceback" not in err + out


def test_device_cuda_without_a_gpu_is_a_clear_error(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    device, _ = P.resolve_device("auto")
    if device == "cuda":
        pytest.skip("a GPU is present")
    code, _, err = run(["train", "--device", "cuda"], capsys)
    assert code == 2 and err.startswith("fastopt: error: --device cuda: ") and len(err.strip().splitlines()) == 1
    assert 'pip install -e ".[cuda]"' in err


def test_the_cuda_hint_names_an_install_that_works(monkeypatch):
    """fastopt is on no package index: the hint is the editable install of the checkout."""
    monkeypatch.setitem(sys.modules, "cupy", None)  # import cupy raises ImportError
    with pytest.raises(UsageError) as e:
        P.resolve_device("cuda")
    assert str(e.value) == ('--device cuda: CuPy is not installed (in the fastopt checkout, on a machine with a '
                            'GPU: pip install -e ".[cuda]")')


def test_python_dash_m_help_and_a_bad_argument_in_a_child_process(tmp_path):
    ok = subprocess.run([sys.executable, "-m", "fastopt", "--help"], capture_output=True, text=True, cwd=tmp_path)
    assert ok.returncode == 0 and all(c in ok.stdout for c in ("train", "compare", "valley", "bench"))
    bad = subprocess.run([sys.executable, "-m", "fastopt", "train", "--lr", "-1"], capture_output=True, text=True,
                         cwd=tmp_path)
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr.startswith("fastopt: error: argument --lr: must be > 0, got -1")
    assert len(bad.stderr.strip().splitlines()) == 1 and "Traceback" not in bad.stderr


def test_compare_logreg_says_when_a_method_stopped_moving_and_takes_f_star_from_scipy(tmp_path, capsys):
    """Newton converges in about 10 iterations and then steps to where it is (no call): its line
    says so instead of only "after 40 iterations, 11 calls"; f* is SciPy's L-BFGS-B minimum, as
    the README says, to within rounding."""
    code, out, err = run(["compare", "--optimizers", "newton,adam", "--model", "logreg", "--iterations", 40,
                          "--out", tmp_path], capsys)
    assert code == 0, err
    newton = next(line for line in out.splitlines() if line.startswith("newton: "))
    assert "after 40 iterations (the weights last changed in iteration " in newton
    adam = next(line for line in out.splitlines() if line.startswith("adam: "))
    assert "after 40 iterations, 41 calls" in adam  # moving to the end: nothing to add
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["fstar_source"].startswith("scipy L-BFGS-B")
    assert min(metrics["runs"]["newton"]["loss"]) >= metrics["fstar"]  # no gap is negative
    assert "f* = " in out and "(scipy L-BFGS-B" in out


def test_f_star_is_scipys_within_rounding_and_says_when_scipy_stopped_short():
    from fastopt.app.fullbatch import choose_fstar
    assert choose_fstar(0.5, "newton", 0.6) == (0.5, "scipy L-BFGS-B")
    fstar, source = choose_fstar(0.5, "newton", 0.5 - 1e-16)
    assert fstar == 0.5 - 1e-16 and source.startswith("scipy L-BFGS-B, within rounding: newton's lowest loss")
    fstar, source = choose_fstar(0.5, "newton", 0.5 - 1e-9)
    assert fstar == 0.5 - 1e-9 and source == "newton's lowest loss: scipy L-BFGS-B stopped 1.0e-09 above it"


def test_a_one_step_warmup_cosine_run_and_the_version(tmp_path, capsys):
    """The default warm-up (5% of the steps) leaves a one-step run without one, not an error."""
    code, _, err = run(["train", "--schedule", "warmup_cosine", "--limit", 10, "--epochs", 1, "--no-progress",
                        "--out", tmp_path], capsys)
    assert code == 0, err
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"fastopt {__import__('fastopt').__version__}"


def test_a_divergence_warning_names_the_options_that_cause_one(tmp_path, capsys):
    _, out, err = run(["train", "--eps", 0, "--out", tmp_path, "--epochs", 1, *TINY], capsys)
    out += err
    assert "suspects: eps=0 (a zero second moment divides 0 by 0)" in out
