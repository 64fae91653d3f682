"""Checkpoints: an optimizer's state arenas (and optionally the params) in one ``.npz``.

``save`` writes a temporary file in the target's folder, fsyncs it and renames it over
the target, so a crash mid-write leaves the previous checkpoint whole. ``load`` checks the
rule, shapes and dtypes against the live optimizer and names every difference before it
writes anything. The arenas are stored whole, so a resumed run is bit-for-bit the same.
"""
import json
import os
import tempfile

import numpy as np

from .buffer import ParamBuffer
from . import _dispatch
from .optimizer import _copy_in, _to_host, _zero

FORMAT = "fastopt-checkpoint-1"


def save(path, optimizer, params=None):
    """Write ``optimizer`` (and ``params``: a ParamBuffer, or a list of arrays) to ``path``."""
    path = os.fspath(path)
    opt = optimizer
    if opt.arenas is None:
        opt._allocate()  # a checkpoint before the first step: zero state, as a fresh run has
    meta = {
        "format": FORMAT, "optimizer": type(opt).__name__, "dtype": opt._params[0].dtype.name,
        "shapes": [list(a.shape) for a in opt._params], "offsets": [int(o) for o in opt._offsets],
        "steps": opt._steps(), "groups": [_group_meta(g) for g in opt.param_groups],
    }
    arrays = {f"state.{name}": _to_host(arena) for name, arena in opt.arenas.items()}
    params = _as_kernel_arrays(params)
    if params is not None:
        meta["params"] = _params_meta(params)
        if isinstance(params, ParamBuffer):
            arrays["params.arena"] = _to_host(params.arena)
        else:
            arrays.update({f"params.{i}": _to_host(a) for i, a in enumerate(params)})
    arrays["meta"] = np.array(json.dumps(meta))
    atomic_write(path, lambda f: np.savez(f, **arrays))
    return path


def atomic_write(path, write):
    """Call ``write(file)`` on a temporary file in ``path``'s folder, fsync it and rename it
    over ``path``: a crash leaves the old file or the new one, never half of one.

    The file gets the mode every other tool gives a new file, 0o666 less the umask (mkstemp
    alone makes it 0o600). Temporary files that earlier saves to ``path`` left behind (killed
    mid-write) are removed first; a save still running in another process keeps its own,
    which it holds locked while it writes."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    prefix = os.path.basename(path) + "."
    _remove_stale_temps(folder, prefix)
    fd, tmp = _locked_temp(folder, prefix)
    try:
        with os.fdopen(fd, "wb") as f:  # closed, and so unlocked, only after the rename
            os.chmod(tmp, 0o666 & ~_umask())
            write(f)
            f.flush()
            os.fsync(f.fileno())
            os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:  # the rename had happened
            pass
        raise
    _fsync_dir(folder)


TEMP_SUFFIX = ".tmp"
TEMP_NAME = r"[a-z0-9_]{8}"  # what tempfile.mkstemp puts between the prefix and the suffix


def _locked_temp(folder, prefix):
    """``(fd, path)`` of a new temporary file, locked (flock) so that another process's
    :func:`_remove_stale_temps` leaves it alone while this one writes it."""
    while True:
        fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=TEMP_SUFFIX, dir=folder)
        if _lock(fd, wait=True) is None or os.fstat(fd).st_nlink:
            return fd, tmp
        os.close(fd)  # removed as stale between its creation and the lock: make another


def _remove_stale_temps(folder, prefix):
    """Delete ``<prefix><8 characters>.tmp`` files in ``folder`` that no live process holds."""
    import re
    pattern = re.compile(re.escape(prefix) + TEMP_NAME + re.escape(TEMP_SUFFIX))
    try:
        names = [n for n in os.listdir(folder) if pattern.fullmatch(n)]
    except OSError:
        return  # a folder we cannot list: mkstemp will say what is wrong with it
    for name in names:
        try:
            fd = os.open(os.path.join(folder, name), os.O_RDONLY)
        except OSError:
            continue  # renamed into place or removed meanwhile
        try:
            if _lock(fd, wait=False) is not False:
                os.unlink(os.path.join(folder, name))
        except OSError:
            pass  # removed meanwhile, or (Windows) still open: it stays
        finally:
            os.close(fd)


def _lock(fd, wait):
    """An exclusive flock on ``fd``: True taken, False held by another process (a live save;
    only without ``wait``), None where there are no such locks (Windows, where an open file
    cannot be removed anyway)."""
    try:
        import fcntl
    except ImportError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
    except BlockingIOError:
        return False
    except OSError:
        return None  # a file system without locks
    return True


def _umask():
    """The process's umask. Linux reports it in /proc; elsewhere it is read by setting it and
    back, which another thread creating a file at that instant could notice."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def load(path, optimizer, params=None):
    """Restore ``optimizer`` (and ``params``) from ``path``; raises ValueError naming every
    mismatch (rule, dtype, number of params, shapes, groups) before anything is written."""
    path = os.fspath(path)
    opt = optimizer
    with np.load(path, allow_pickle=False) as f:
        arrays = {k: f[k] for k in f.files}
    if "meta" not in arrays:
        raise ValueError(f"{path} is not a fastopt checkpoint (no meta entry)")
    meta = json.loads(str(arrays.pop("meta")))
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path} has format {meta.get('format')!r}; this fastopt reads {FORMAT!r}")
    params = _as_kernel_arrays(params)
    problems = _differences(meta, opt, params, arrays)
    if problems:
        raise ValueError(f"{path} does not match: " + "; ".join(problems))
    merged = []
    for k, (g, saved) in enumerate(zip(opt.param_groups, meta["groups"])):
        new = dict(g)
        for key, v in saved.items():
            if key in g and key != "params" and key not in opt.fixed and not (
                    key == "lr" and (callable(g["lr"]) or v is None)):
                new[key] = tuple(v) if isinstance(v, list) else v
        opt._check_hyper(new, f"{path}: param group {k}")
        merged.append(new)
    for g, new in zip(opt.param_groups, merged):
        g.update(new)
    opt._allocate()  # the loaded options may need other states
    same_layout = meta["offsets"] == [int(o) for o in opt._offsets]
    for name, arena in opt.arenas.items():
        saved = arrays.get(f"state.{name}")
        if saved is None:  # a state the saved run's options did not use: it starts afresh
            opt._start_value(name, _zero(arena))
        elif same_layout and saved.size == arena.size:
            _copy_in(arena, 0, saved)
        else:
            for o_saved, o, a in zip(meta["offsets"], opt._offsets, opt._params):
                _copy_in(arena, o, saved[o_saved:o_saved + a.size])
    for plan, t in zip(opt._plans, meta["steps"]):
        plan.step = t
    if params is not None:
        if isinstance(params, ParamBuffer):
            _copy_in(params.arena, 0, arrays["params.arena"])
        else:
            for i, a in enumerate(params):
                _copy_in(a.reshape(a.size), 0, arrays[f"params.{i}"].reshape(-1))


def _as_kernel_arrays(params):
    if params is None or isinstance(params, ParamBuffer):
        return params
    return [_dispatch.as_kernel_array(a) for a in params]


def _group_meta(group):
    out = {}
    for k, v in group.items():
        if k == "params":
            out[k] = len(v)
        elif callable(v):
            out[k] = None  # a schedule is code: the step count restores its value
        else:
            out[k] = list(v) if isinstance(v, tuple) else v
    return out


def _params_meta(params):
    if isinstance(params, ParamBuffer):
        return {"kind": "buffer", "shapes": [list(s) for s in params.shapes], "size": int(params.arena.size),
                "dtype": params.dtype.name}
    return {"kind": "list", "shapes": [list(a.shape) for a in params], "dtype": params[0].dtype.name}


def _differences(meta, opt, params, arrays):
    problems = []
    name = type(opt).__name__
    if meta["optimizer"] != name:
        problems.append(f"the optimizer is {name} here but {meta['optimizer']} in the checkpoint")
    dtype = opt._params[0].dtype.name
    if meta["dtype"] != dtype:
        problems.append(f"dtype is {dtype} here but {meta['dtype']} in the checkpoint")
    shapes = [list(a.shape) for a in opt._params]
    if len(shapes) != len(meta["shapes"]):
        problems.append(f"{len(shapes)} params here but {len(meta['shapes'])} in the checkpoint")
    else:
        problems += [f"param {i} has shape {tuple(a)} here but {tuple(b)} in the checkpoint"
                     for i, (a, b) in enumerate(zip(shapes, meta["shapes"])) if a != b]
    counts = [len(g["params"]) for g in opt.param_groups]
    saved_counts = [g["params"] for g in meta["groups"]]
    if counts != saved_counts:
        problems.append(f"params per group are {counts} here but {saved_counts} in the checkpoint")
    end = max([o + int(np.prod(sh)) for o, sh in zip(meta["offsets"], meta["shapes"])] + [0])
    for key, a in arrays.items():
        if key.startswith("state.") and (a.dtype.name != meta["dtype"] or a.ndim != 1 or a.size < end):
            problems.append(f"{key} is {a.dtype.name}{list(a.shape)}, not a {meta['dtype']} arena of "
                            f">= {end} elements")
    steps = meta.get("steps")
    if not (isinstance(steps, list) and len(steps) == len(meta["groups"])
            and all(isinstance(t, int) and t >= 0 for t in steps)):
        problems.append(f"the step counts {steps!r} are not one non-negative integer per group")
    if params is not None:
        saved = meta.get("params")
        if saved is None:
            problems.append("params were given but the checkpoint holds none")
        else:
            here = _params_meta(params)
            for key in ("kind", "shapes", "dtype", "size"):
                if here.get(key) != saved.get(key):
                    problems.append(f"params {key} is {here.get(key)} here but {saved.get(key)} in the checkpoint")
            sizes = ({"params.arena": params.arena.size} if isinstance(params, ParamBuffer)
                     else {f"params.{i}": int(np.prod(a.shape)) for i, a in enumerate(params)})
            problems += [f"{key} is missing or holds {arrays[key].size if key in arrays else 0} values, not {n}"
                         for key, n in sizes.items() if key not in arrays or arrays[key].size != n]
    return problems


def _fsync_dir(folder):
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return  # e.g. Windows: the rename is what matters
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
