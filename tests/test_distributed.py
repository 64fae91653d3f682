"""fastopt.distributed: ZeRO-1 sharded optimizers over MPI, tested under ``mpiexec -n 2`` and
``-n 3`` (uneven shards) started from here in child processes with a timeout.

This file is also the workers' script: ``mpiexec -n R python tests/test_distributed.py MODE
FOLDER`` runs one of the ``worker_*`` functions on every rank; rank 0 writes what it found
to ``FOLDER/<mode>-<R>.json`` and the test reads it. Several checks share one launch, since
each launch imports Numba on every rank (the kernels come from Numba's disk cache).
"""
import hashlib
import itertools
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

try:
    import pytest
except ImportError:  # a worker on a rank needs no pytest
    pytest = None

HERE = Path(__file__).resolve()
SHAPES = [(37, 13), (13,), (5, 7, 3), (1,), (129,)]  # arena 816 float32: padded for R = 2 (832) and R = 3 (816 + 0)
STEPS, NAN_STEP, SAVE_STEP = 50, 20, 25
TOL = 2e-6  # float32: a few ulps of the params' size, after 50 steps


def _cases():
    import fastopt
    return {"adamw": (fastopt.AdamW, dict(lr=1e-2, weight_decay=0.1, max_grad_norm=1.0)),
            "sgd": (fastopt.SGD, dict(lr=0.05, momentum=0.9)),
            "lion": (fastopt.Lion, dict(lr=1e-3, weight_decay=0.1))}


def _model(dtype=np.float32):
    """A fresh ParamBuffer with the initial weights, and its two param groups (no decay on the 1-D params)."""
    import fastopt
    rng = np.random.default_rng(0)
    buf = fastopt.ParamBuffer([rng.standard_normal(s).astype(dtype) for s in SHAPES])
    decay = [p for p in buf.params if p.ndim > 1]
    return buf, [{"params": decay}, {"params": [p for p in buf.params if p.ndim == 1], "weight_decay": 0.0}]


def _grads(step, rank):
    """Rank ``rank``'s gradient at ``step`` (a function of both only); rank R-1 sends a NaN at NAN_STEP."""
    rng = np.random.default_rng([step, rank])
    return [(rng.standard_normal(s) * 0.5).astype(np.float32) for s in SHAPES]


def _averaged(step, ranks):
    """What the sharded step averages: the sum over ranks (in rank order here), then / R."""
    total = [np.zeros(s, np.float32) for s in SHAPES]
    for k in range(ranks):
        for t, g in zip(total, _grads(step, k)):
            t += g
    return [t / np.float32(ranks) for t in total]


def _write(buf, grads):
    for view, g in zip(buf.grads, grads):
        view[...] = g


def _digest(*arrays):
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def _report(folder, mode, comm, result):
    if comm.Get_rank() == 0:
        Path(folder, f"{mode}-{comm.Get_size()}.json").write_text(json.dumps(result))


# -- the workers (run on every rank) ------------------------------------------------------------
def worker_train(folder):
    """For AdamW (clipped), SGD with momentum and Lion: 50 sharded steps against one process
    on the same averaged gradients; a NaN on one rank at NAN_STEP; a save at SAVE_STEP resumed
    by a second optimizer; the final state saved for the re-sharding workers."""
    from mpi4py import MPI

    from fastopt.distributed import ShardedOptimizer, load_sharded, save_sharded
    comm, result = MPI.COMM_WORLD, {}
    R, rank = comm.Get_size(), comm.Get_rank()
    for name, (cls, kw) in _cases().items():
        buf, groups = _model()
        opt = ShardedOptimizer(cls, groups, comm=comm, timeout=60, **kw)
        ref_buf, ref_groups = _model()
        ref = cls(ref_groups, **kw)
        nan_ok = True
        for step in range(STEPS):
            grads = _grads(step, rank)
            if step == NAN_STEP and rank == R - 1:
                grads[2][1, 2, 0] = np.nan
            _write(buf, grads)
            _write(ref_buf, _averaged(step, R))
            before = buf.arena.copy(), opt.state_dict() if step == NAN_STEP else None
            opt.step()
            if step == NAN_STEP:  # skipped on every rank: params, state and step counts untouched
                after = opt.state_dict()
                nan_ok = (opt.last_step_skipped and np.array_equal(before[0], buf.arena) and opt.skipped_steps == 1
                          and all(np.array_equal(v, after["state"][i][k]) for i, e in before[1]["state"].items()
                                  for k, v in e.items()))
                continue  # one process never saw that gradient
            ref.step()
            if name == "adamw" and step == SAVE_STEP - 1:
                save_sharded(Path(folder, f"mid{R}"), opt)
        sd, ref_sd = opt.state_dict(), ref.state_dict()
        state_diff = max(float(np.max(np.abs(v - ref_sd["state"][i][k]))) for i, e in sd["state"].items()
                         for k, v in e.items() if k != "step")
        steps_equal = all(e["step"] == ref_sd["state"][i]["step"] for i, e in sd["state"].items())
        flags = np.array([int(nan_ok)], np.int32)
        comm.Allreduce(MPI.IN_PLACE, flags, MPI.MIN)  # every rank skipped
        result[name] = dict(param_diff=float(np.max(np.abs(buf.arena - ref_buf.arena))), state_diff=state_diff,
                            steps_equal=steps_equal, nan_skipped_everywhere=bool(flags[0]),
                            digest=_digest(buf.arena, *[v for e in sd["state"].values() for k, v in e.items()
                                                        if k != "step"]),
                            state_bytes=opt.state_bytes(), one_process_state_bytes=sum(
                                a.nbytes for a in ref.arenas.values()), launches=opt.launches,
                            pieces=sum(len(g["params"]) for g in opt.param_groups), states=len(opt.inner.arenas),
                            groups_here=sum(1 for g in opt.param_groups if any(p.size for p in g["params"])))
        if name == "adamw":
            save_sharded(Path(folder, f"final{R}"), opt)
            if rank == 0:
                np.savez(Path(folder, f"final{R}.npz"), arena=buf.arena,
                         **{f"{i}.{k}": v for i, e in sd["state"].items() for k, v in e.items() if k != "step"})
            # resume from the save at SAVE_STEP: a second optimizer must end bit for bit where this one did
            buf2, groups2 = _model()
            opt2 = ShardedOptimizer(cls, groups2, comm=comm, timeout=60, **kw)
            load_sharded(Path(folder, f"mid{R}"), opt2)
            for step in range(SAVE_STEP, STEPS):
                _write(buf2, _grads(step, rank))
                opt2.step()
            result["resume_bit_exact"] = bool(np.array_equal(buf2.arena, buf.arena)) and _digest(
                buf2.arena, *[v for e in opt2.state_dict()["state"].values() for k, v in e.items() if k != "step"]
            ) == result["adamw"]["digest"]
    _report(folder, "train", comm, result)


def worker_reshard(folder, source, target=None):
    """Load the AdamW state saved by ``source`` (another number of ranks) and compare it, bit
    for bit, with that run's gathered state; save it again to ``target``; then check that a
    missing shard and another save's shard are named errors that write nothing."""
    from mpi4py import MPI

    from fastopt.distributed import ShardedOptimizer, ShardError, load_sharded, save_sharded
    comm = MPI.COMM_WORLD
    cls, kw = _cases()["adamw"]
    buf, groups = _model()
    opt = ShardedOptimizer(cls, groups, comm=comm, timeout=60, **kw)
    src = Path(folder, source)
    load_sharded(src, opt)
    sd = opt.state_dict()
    with np.load(Path(folder, f"{source}.npz")) as saved:
        equal = bool(np.array_equal(saved["arena"], buf.arena)) and all(
            np.array_equal(saved[f"{i}.{k}"], v) for i, e in sd["state"].items() for k, v in e.items() if k != "step")
    result = dict(equal=equal, steps=opt.steps)
    if target:
        save_sharded(Path(folder, target), opt)
        if comm.Get_rank() == 0:
            shutil.copy(Path(folder, f"{source}.npz"), Path(folder, f"{target}.npz"))
    # a damaged checkpoint: every rank raises ShardError, and nothing was written
    fresh_buf, fresh_groups = _model()
    fresh = ShardedOptimizer(cls, fresh_groups, comm=comm, timeout=60, **kw)
    broken, errors = Path(folder, f"broken-{comm.Get_size()}"), {}
    manifest = json.loads((src / "optimizer.manifest.json").read_text())
    for kind in ("missing", "swapped"):
        if comm.Get_rank() == 0:
            shutil.rmtree(broken, ignore_errors=True)
            shutil.copytree(src, broken)
            victim = broken / manifest["shards"][-1]["file"]
            if kind == "missing":
                victim.unlink()
            else:  # another save's shard under this one's name
                other = next(Path(folder, "mid2").glob("optimizer.*.rank1-of-2.npz"))
                shutil.copy(other, victim)
        comm.Barrier()
        try:
            load_sharded(broken, fresh)
            errors[kind] = "no error"
        except ShardError as e:
            errors[kind] = str(e)
        comm.Barrier()
    untouched = fresh.steps == 0 and np.array_equal(fresh_buf.arena, _model()[0].arena)
    result.update(errors=errors, untouched=bool(untouched))
    flags = np.array([int(all(e.startswith(("rank", "shard")) or "missing" in e for e in errors.values())
                          and "no error" not in errors.values())], np.int32)
    comm.Allreduce(MPI.IN_PLACE, flags, MPI.MIN)
    result["every_rank_raised"] = bool(flags[0])
    _report(folder, f"reshard-{source}", comm, result)


def worker_fail(folder, how):
    """Rank R-1 dies (``kill``: SIGKILL) or stops answering (``hang``) at step 5 of a run."""
    import signal

    from mpi4py import MPI

    from fastopt.distributed import CollectiveTimeout, ShardedOptimizer
    comm = MPI.COMM_WORLD
    cls, kw = _cases()["adamw"]
    buf, groups = _model()
    opt = ShardedOptimizer(cls, groups, comm=comm, timeout=3, **kw)
    for step in range(1000):
        if step == 5 and comm.Get_rank() == comm.Get_size() - 1:
            if how == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            time.sleep(600)
        _write(buf, _grads(step, comm.Get_rank()))
        try:
            opt.step()
        except CollectiveTimeout as e:
            print(f"rank {comm.Get_rank()}: CollectiveTimeout: {e}", flush=True)
            comm.Abort(3)


def worker_extras(folder):
    """What a state carries besides its arrays, through the sharded state dict and save_sharded:
    NAdam's running product (beta1 edited mid-run), float16 params' float32 master copy, and
    the count of skipped steps."""
    from mpi4py import MPI

    import fastopt
    from fastopt.distributed import ShardedOptimizer, load_sharded, save_sharded
    comm, result = MPI.COMM_WORLD, {}
    R, rank = comm.Get_size(), comm.Get_rank()
    # NAdam: one process's state dict into a sharded optimizer, which then goes on as one process
    buf, groups = _model()
    ref_buf, ref_groups = _model()
    ref = fastopt.NAdam(ref_groups, lr=1e-2, nonfinite="propagate")
    for step in range(6):
        if step == 2:
            ref.param_groups[0]["betas"] = (0.8, 0.99)
        _write(ref_buf, _averaged(step, R))
        ref.step()
    opt = ShardedOptimizer(fastopt.NAdam, groups, comm=comm, timeout=60, lr=1e-2, nonfinite="propagate")
    opt.load_state_dict(ref.state_dict())
    buf.arena[...] = ref_buf.arena
    opt.load_state_dict(opt.state_dict())  # its own state dict loads too
    for step in range(6, 9):
        _write(buf, _grads(step, rank))
        opt.step()
        _write(ref_buf, _averaged(step, R))
        ref.step()
    result["nadam_diff"] = float(np.max(np.abs(buf.arena - ref_buf.arena)))
    # float16 params with float32 masters: a save resumed bit for bit; the state dict holds the masters
    kw = dict(lr=1e-3, master_weights=True, nonfinite="skip")
    buf, groups = _model(np.float16)
    opt = ShardedOptimizer(fastopt.AdamW, groups, comm=comm, timeout=60, **kw)
    for step in range(8):
        _write(buf, _grads(step, rank))
        if step == 2 and rank == R - 1:
            buf.grads[0][0, 0] = np.nan  # a skipped step, counted
        opt.step()
        if step == 3:
            save_sharded(Path(folder, "f16"), opt)
    sd = opt.state_dict()
    buf2, groups2 = _model(np.float16)
    opt2 = ShardedOptimizer(fastopt.AdamW, groups2, comm=comm, timeout=60, **kw)
    load_sharded(Path(folder, "f16"), opt2)
    for step in range(4, 8):
        _write(buf2, _grads(step, rank))
        opt2.step()
    result["f16_resume_exact"] = bool(np.array_equal(buf.arena, buf2.arena))
    result["f16_master_in_state_dict"] = all("master" in e for e in sd["state"].values())
    result["skips"] = [opt.skipped_steps, opt2.skipped_steps, sd.get("skipped_steps")]
    buf3, groups3 = _model(np.float16)  # noqa: RUF059 (the buffer must live: its views name it)
    opt3 = ShardedOptimizer(fastopt.AdamW, groups3, comm=comm, timeout=60, **kw)
    opt3.load_state_dict(sd)
    result["skips"].append(opt3.skipped_steps)
    _report(folder, "extras", comm, result)


WORKERS = {"train": worker_train, "reshard": worker_reshard, "fail": worker_fail, "extras": worker_extras}

# -- the tests (pytest, in this process) ----------------------------------------------------------
MPIEXEC = shutil.which("mpiexec") or (shutil.which("mpiexec", path=str(Path(sys.executable).parent)))


def _mpi_missing():
    if MPIEXEC is None:
        return "mpiexec is not installed (pip install \"fastopt[mpi]\")"
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        return "mpi4py is not installed (pip install \"fastopt[mpi]\")"
    return None


if pytest is not None:
    needs_mpi = pytest.mark.skipif(_mpi_missing() is not None, reason=str(_mpi_missing()))
else:
    def needs_mpi(f):
        return f


def launch(ranks, *args, timeout=120):
    """``mpiexec -n ranks python this-file args...``: (exit status, output, seconds)."""
    env = dict(os.environ, PYTHONPATH=str(HERE.parents[1]), OMP_NUM_THREADS="1", NUMBA_NUM_THREADS="1")
    t0 = time.perf_counter()
    proc = subprocess.run([MPIEXEC, "-n", str(ranks), sys.executable, str(HERE), *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, env=env, cwd=HERE.parents[1])
    return proc.returncode, proc.stdout + proc.stderr, time.perf_counter() - t0


@pytest.fixture(scope="module") if pytest else (lambda f: f)
def runs(tmp_path_factory):
    """The launches every correctness test reads: R = 2, R = 3 (loading R = 2's save), R = 1
    (loading R = 3's), and R = 2 again (repeatability)."""
    folder = tmp_path_factory.mktemp("mpi")
    for ranks, args in ((2, ["train"]), (3, ["train"]), (3, ["reshard", "final2", "final3to"]),
                        (1, ["reshard", "final3to"])):
        rc, out, _ = launch(ranks, args[0], folder, *args[1:])
        assert rc == 0, f"mpiexec -n {ranks} {' '.join(args)} failed:\n{out[-4000:]}"
    again = folder / "again"
    again.mkdir()
    shutil.copytree(folder / "mid2", again / "mid2")
    rc, out, _ = launch(2, "train", again)
    assert rc == 0, out[-4000:]
    return folder


def _read(folder, name):
    return json.loads((folder / f"{name}.json").read_text())


@needs_mpi
@pytest.mark.parametrize("ranks", [2, 3])
@pytest.mark.parametrize("rule", ["adamw", "sgd", "lion"])
def test_sharded_equals_one_process(runs, ranks, rule):
    r = _read(runs, f"train-{ranks}")[rule]
    assert r["param_diff"] < TOL and r["state_diff"] < TOL, r
    assert r["steps_equal"]
    # one fused launch per group (that has elements on rank 0) per step; none for the NaN step
    assert r["launches"] == r["groups_here"] * (STEPS - 1)


@needs_mpi
@pytest.mark.parametrize("ranks", [2, 3])
def test_nan_on_one_rank_skips_everywhere(runs, ranks):
    assert all(r["nan_skipped_everywhere"] for k, r in _read(runs, f"train-{ranks}").items() if k in _cases())


@needs_mpi
@pytest.mark.parametrize("ranks", [2, 3])
def test_state_is_one_rth(runs, ranks):
    r = _read(runs, f"train-{ranks}")["adamw"]
    # 1/R of one process's, plus the rounding of each piece (a param's part in the slice) to a cache line
    assert r["state_bytes"] <= r["one_process_state_bytes"] / ranks + r["pieces"] * r["states"] * 64


@needs_mpi
def test_repeat_is_bit_identical(runs):
    first, again = _read(runs, "train-2"), _read(runs / "again", "train-2")
    assert all(first[k]["digest"] == again[k]["digest"] for k in _cases())


@needs_mpi
@pytest.mark.parametrize("ranks", [2, 3])
def test_resume_same_ranks_bit_exact(runs, ranks):
    assert _read(runs, f"train-{ranks}")["resume_bit_exact"]


@needs_mpi
@pytest.mark.parametrize("name", ["reshard-final2-3", "reshard-final3to-1"])
def test_reshard(runs, name):
    """2 -> 3 and 3 -> 1: the loaded state is the saved one, bit for bit; a missing shard and
    another save's shard are ShardErrors on every rank, with nothing written."""
    r = _read(runs, name)
    assert r["equal"] and r["steps"] == STEPS - 1
    assert "is missing" in r["errors"]["missing"] or "found a problem" in r["errors"]["missing"], r["errors"]
    assert "does not match the manifest" in r["errors"]["swapped"] or "found a problem" in r["errors"]["swapped"]
    assert r["every_rank_raised"] and r["untouched"]


@needs_mpi
def test_killed_rank_ends_the_job():
    """A rank killed mid-run (SIGKILL): mpiexec's launcher (Hydra) notices and ends the others
    at once; the job fails, it does not hang."""
    rc, out, seconds = launch(3, "fail", "/tmp", "kill", timeout=60)
    assert rc != 0 and seconds < 60
    assert "BAD TERMINATION" in out or "Killed" in out, out[-2000:]


@needs_mpi
def test_hung_rank_times_out():
    """A rank that stops answering: the others' collectives time out (3 s here) with
    CollectiveTimeout, and the job is aborted instead of waiting forever."""
    rc, out, seconds = launch(3, "fail", "/tmp", "hang", timeout=60)
    assert rc != 0 and seconds < 60
    assert "CollectiveTimeout" in out and "did not complete in 3 s" in out, out[-2000:]


@needs_mpi
def test_fastopt_train_data_parallel_resumes_bit_exact(tmp_path):
    """``mpiexec -n 2 fastopt train``: rank 0 alone prints and writes; a run checkpointed
    after epoch 2 and resumed to epoch 3 ends bit for bit where an uninterrupted one does
    (the optimizer state gathered into the one checkpoint file, each rank taking its slice back)."""
    def train(out, *flags):
        args = ["-m", "fastopt", "train", "--model", "mlp", "--device", "cpu", "--no-progress", "--out", out, *flags]
        env = dict(os.environ, PYTHONPATH=str(HERE.parents[1]), OMP_NUM_THREADS="1")
        proc = subprocess.run([MPIEXEC, "-n", "2", sys.executable, *args], capture_output=True, text=True,
                              timeout=120, env=env, cwd=tmp_path)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return proc.stdout
    whole = train("whole", "--epochs", "3")
    assert whole.count("done: 3 epochs") == 1 and "data parallel over 2 MPI ranks" in whole
    train("parts", "--epochs", "2", "--checkpoint")
    train("parts", "--epochs", "3", "--resume")
    runs = [json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("whole", "parts")]
    keep = ("train_loss", "train_acc", "test_loss", "test_acc")
    assert [[e[k] for k in keep] for e in runs[0]["epochs"]] == [[e[k] for k in keep] for e in runs[1]["epochs"]]
    assert runs[0]["ranks"] == 2 and runs[0]["summary"]["final_test_acc"] > 0.9


def _python(code):
    """``code`` run by a fresh interpreter outside the checkout, importing this tree's fastopt."""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd="/tmp", env=dict(os.environ, PYTHONPATH=str(HERE.parents[1])))


def test_importable_without_mpi_and_refusals():
    """The module imports without touching MPI; LAMB and LARS are refused by name."""
    code = ("import sys; sys.modules['mpi4py'] = None\n"
            "import fastopt, fastopt.distributed as d\n"
            "try:\n    d.ShardedOptimizer(fastopt.AdamW, fastopt.ParamBuffer(shapes=[(3,)]))\n"
            "except d.MPIUnavailable as e:\n    print('MPIUnavailable', e)\n")
    out = _python(code)
    assert "MPIUnavailable" in out.stdout and "fastopt[mpi]" in out.stdout, out.stdout + out.stderr


@needs_mpi
def test_lamb_and_lars_refused():
    code = ("import fastopt, fastopt.distributed as d\n"
            "for cls in (fastopt.LAMB, fastopt.LARS):\n"
            "    try:\n        d.ShardedOptimizer(cls, fastopt.ParamBuffer(shapes=[(3,)]))\n"
            "    except d.NotShardable as e:\n        print('NotShardable', cls.__name__, 'per-tensor' in str(e))\n")
    out = _python(code)
    assert "NotShardable LAMB True" in out.stdout and "NotShardable LARS True" in out.stdout, out.stdout + out.stderr


@needs_mpi
def test_what_a_state_carries_besides_its_arrays_crosses_the_shards(tmp_path):
    rc, out, _ = launch(2, "extras", tmp_path)
    assert rc == 0, out[-4000:]
    r = _read(tmp_path, "extras-2")
    assert r["nadam_diff"] < TOL, r
    assert r["f16_resume_exact"] and r["f16_master_in_state_dict"], r
    assert r["skips"] == [1, 1, 1, 1], r


@needs_mpi
def test_8bit_state_and_bfloat16_params_are_refused():
    code = ("import numpy as np, ml_dtypes, fastopt, fastopt.distributed as d\n"
            "for params, kw in ((fastopt.ParamBuffer(shapes=[(3,)]), dict(state_bits=8)),\n"
            "                   (fastopt.ParamBuffer([np.ones(3, ml_dtypes.bfloat16)]), {})):\n"
            "    try:\n        d.ShardedOptimizer(fastopt.AdamW, params, **kw)\n"
            "    except d.NotShardable as e:\n        print('NotShardable', str(e).split(':')[0])\n")
    out = _python(code)
    assert "NotShardable state_bits=8" in out.stdout and "NotShardable bfloat16 params" in out.stdout, \
        out.stdout + out.stderr


@needs_mpi
def test_clipping_and_guard_options_are_checked_and_may_be_turned_on_later():
    """As a plain optimizer's: a bad value is refused when set; clipping turned on after the
    constructor works (it found no norm plan)."""
    code = ("import numpy as np, fastopt, fastopt.distributed as d\n"
            "buf = fastopt.ParamBuffer([np.ones(8, np.float32)])\n"
            "opt = d.ShardedOptimizer(fastopt.SGD, buf, lr=0.1, nonfinite='propagate')\n"
            "for name, value in (('max_grad_norm', -1.0), ('nonfinite', 'skp')):\n"
            "    try:\n        setattr(opt, name, value)\n"
            "    except ValueError as e:\n        print('refused', name)\n"
            "opt.max_grad_norm = 1.0\n"
            "buf.grads[0][...] = 1.0\n"
            "opt.step()\n"
            "print('clipped', round(float(buf.params[0][0]), 6))\n")
    out = _python(code)
    assert "refused max_grad_norm" in out.stdout and "refused nonfinite" in out.stdout, out.stdout + out.stderr
    # the gradient (norm sqrt(8)) clipped to norm 1: each element 1 / sqrt(8)
    assert f"clipped {round(1 - 0.1 / 8 ** 0.5, 6)}" in out.stdout, out.stdout + out.stderr


def test_shard_bounds_cover_the_arena():
    from fastopt.distributed import shard_bounds
    for n, ranks in ((816, 2), (816, 3), (10, 4), (1, 3), (1000, 7)):
        size, bounds = shard_bounds(n, ranks, np.float32)
        assert size % 16 == 0 and size * ranks >= n
        assert bounds[0][0] == 0 and bounds[-1][1] == n
        assert all(a[1] == b[0] for a, b in itertools.pairwise(bounds))


if __name__ == "__main__":
    WORKERS[sys.argv[1]](*sys.argv[2:])
