"""Checkpoints: an optimizer's state arenas (and optionally the params) in one ``.npz``.

``save`` writes a temporary file in the target's folder, fsyncs it and renames it over
the target, so a crash mid-write leaves the previous checkpoint whole. ``load`` checks the
rule, shapes and dtypes against the live optimizer and names every difference before it
writes anything. The arenas are stored whole, so a resumed run is bit-for-bit the same.
"""
import contextlib
import itertools
import json
import math
import os
import tempfile
import zipfile

import numpy as np

from .buffer import ParamBuffer, _copy_in, _to_host
from .kernels import _dispatch
from .kernels._formats import kernel_dtype, kernel_view
from .optimizer import MASTER, MAX_STEPS

FORMAT = "fastopt-checkpoint-1"


def save(path, optimizer, params=None):
    """Write ``optimizer`` (and ``params``: a ParamBuffer, or a list of arrays) to ``path``."""
    path = os.fspath(path)
    params = _as_kernel_arrays(params)
    with optimizer.lock:  # a consistent snapshot: no step runs while the arrays are copied
        state = optimizer.export_state()
        # a 16-bit float is stored as its bits (.npy has no bfloat16), the format in the metadata
        arrays = {f"state.{name}": kernel_view(arena) for name, arena in state.pop("arenas").items()}
        meta = {"format": FORMAT, "optimizer": state.pop("rule"), **state}
        if params is not None:
            meta["params"] = _params_meta(params)
            if isinstance(params, ParamBuffer):
                arrays["params.arena"] = kernel_view(_to_host(params.arena))
            else:
                arrays.update({f"params.{i}": kernel_view(_to_host(a)) for i, a in enumerate(params)})
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
        with contextlib.suppress(FileNotFoundError):  # the rename had happened
            os.unlink(tmp)
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
    """Restore ``optimizer`` (and ``params``) from ``path``. All or nothing: the file's
    metadata, every array's header (shape, dtype, read before its data) and every
    hyper-parameter are checked against the live optimizer first, and a ValueError naming
    the file and every difference is raised before anything is written. Only the arrays
    this optimizer needs are read; an unknown entry is an error."""
    path = os.fspath(path)
    opt = optimizer
    params = _as_kernel_arrays(params)
    with _NpzReader(path) as f, opt.lock:  # checked and written with no step or edit in between
        meta = _read_meta(path, f)
        unknown = sorted(set(f.names) - _expected_entries(meta, opt) - {"meta"})
        headers = {k: f.header(k) for k in f.names if k not in unknown and k != "meta"}
        problems = _differences(meta, opt, params, headers)
        if not problems:
            problems += [f"{k} is not an entry of a {meta['optimizer']} checkpoint" for k in unknown]
            merged = opt.merged_groups(meta["groups"], f"{path}: ")  # raises on a bad hyper-parameter
            needed = {s for g in merged for s in opt.states_needed(g)}
            problems += [f"state.{s} is missing (the saved options need it)" for s in sorted(needed)
                         if f"state.{s}" not in headers]
            started = {s for names in meta.get("started") or () for s in names}
            problems += [f"'started' names state {s!r}, which {meta['optimizer']} does not keep"
                         for s in sorted(started - set(opt.rule.states))]
            problems += [f"state.{s} is missing (a param group started it)" for s in sorted(started - needed)
                         if s in opt.rule.states and f"state.{s}" not in headers]
            if opt.state_bits == 8:
                problems += opt.state8_layout().header_problems(headers)
        if problems:
            raise ValueError(f"{path} does not match: " + "; ".join(problems))
        wanted = [k for k in headers if k.startswith("state.") or params is not None]
        arrays = {k: f.read(k) for k in wanted}
        arrays = {k: a.view(_stored_dtype(k, opt, params)) for k, a in arrays.items()}
        sizes = [_dispatch._size(sh) for sh in meta["shapes"]]
        if opt.state_bits == 8:  # 8-bit state: codes and scales in the optimizer's own layout, exactly
            state = opt.state8_layout().split({k[len("state."):]: a for k, a in arrays.items()
                                     if k.startswith("state.") and k != f"state.{MASTER}"})
            if f"state.{MASTER}" in arrays:
                state.update({(i, MASTER): arrays[f"state.{MASTER}"][o:o + n]
                              for i, (o, n) in enumerate(zip(meta["offsets"], sizes))})
        else:
            state = {(i, name[len("state."):]): arena[o:o + n] for name, arena in arrays.items()
                     if name.startswith("state.") for i, (o, n) in enumerate(zip(meta["offsets"], sizes))}
        opt.restore(merged, meta["steps"], state, meta.get("restarts"), meta.get("skipped_steps"), meta.get("running"),
                    meta.get("started"))
        if params is not None:  # checked with the rest (_differences): contiguous, writeable
            if isinstance(params, ParamBuffer):
                _copy_in(params.arena, 0, arrays["params.arena"])
            else:
                for i, a in enumerate(params):
                    _copy_in(a.reshape(a.size), 0, arrays[f"params.{i}"].reshape(-1))


class _NpzReader:
    """An ``.npz`` read entry by entry: each ``.npy`` header (shape, dtype) is parsed before
    any data, so a lying or hostile file costs no more memory than what was checked."""

    def __init__(self, path):
        self.path = path
        try:
            self.zip = zipfile.ZipFile(path)
        except FileNotFoundError:
            raise
        except (OSError, zipfile.BadZipFile, EOFError, ValueError) as e:
            raise ValueError(f"{path} is not a fastopt checkpoint: not a readable .npz (zip) file ({e})") from None
        self.members = {n[:-4]: n for n in self.zip.namelist() if n.endswith(".npy")}
        self.names = list(self.members)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.zip.close()

    def header(self, name):
        """``(shape, dtype)`` of entry ``name``, from its header alone."""
        try:
            with self.zip.open(self.members[name]) as fp:
                version = np.lib.format.read_magic(fp)
                read = {(1, 0): np.lib.format.read_array_header_1_0,
                        (2, 0): np.lib.format.read_array_header_2_0}.get(version)
                if read is None:
                    raise ValueError(f"unsupported .npy version {version}")
                shape, _fortran_order, dtype = read(fp)  # the order of a 1-D array changes nothing
        except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
            raise ValueError(f"{self.path}: entry {name!r} is not a readable array ({e})") from None
        if dtype.hasobject:
            raise ValueError(f"{self.path}: entry {name!r} holds Python objects, which a checkpoint never does")
        info = self.zip.getinfo(self.members[name])
        # the data a header declares must be in the member, and the member's size must be one
        # deflate could give (ratio <= 1032): a lying header allocates nothing
        declared = _dispatch._size(shape) * dtype.itemsize
        if declared > info.file_size or info.file_size > 1100 * info.compress_size + 4096:
            raise ValueError(f"{self.path}: entry {name!r} declares {dtype}{list(shape)}, more data than it holds")
        return tuple(shape), dtype

    def read(self, name):
        try:
            with self.zip.open(self.members[name]) as fp:
                return np.lib.format.read_array(fp, allow_pickle=False)
        except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
            raise ValueError(f"{self.path}: entry {name!r} is not a readable array ({e})") from None


META_LIMIT = 1 << 24  # characters: the metadata of a model of a million tensors fits


def _read_meta(path, f):
    """The checkpoint's metadata, its structure checked."""
    if "meta" not in f.members:
        raise ValueError(f"{path} is not a fastopt checkpoint (no meta entry)")
    shape, dtype = f.header("meta")
    if shape != () or dtype.kind != "U" or dtype.itemsize > 4 * META_LIMIT:
        raise ValueError(f"{path} is not a fastopt checkpoint (its meta entry is a {dtype}{list(shape)} array)")
    try:
        meta = json.loads(str(f.read("meta")))
    except ValueError as e:
        raise ValueError(f"{path} is not a fastopt checkpoint (its meta entry is not JSON: {e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else None
        raise ValueError(f"{path} has format {found!r}; this fastopt reads {FORMAT!r}")

    def ints(x, n=None):
        return isinstance(x, list) and (n is None or len(x) == n) and all(
            type(v) is int and 0 <= v <= MAX_STEPS for v in x)
    problems = []
    if not isinstance(meta.get("optimizer"), str) or not isinstance(meta.get("dtype"), str):
        problems.append("'optimizer' and 'dtype' must be strings")
    shapes = meta.get("shapes")
    if not (isinstance(shapes, list) and all(ints(s) for s in shapes)):
        problems.append(f"'shapes' must be lists of non-negative integers, got {shapes!r}")
        shapes = None
    groups = meta.get("groups")
    if not (isinstance(groups, list) and groups and all(isinstance(g, dict) and type(g.get("params")) is int
                                                        and g["params"] >= 0 for g in groups)):
        problems.append("'groups' must be a list of param groups, each with a count of params")
        groups = None
    if groups is not None and not ints(meta.get("steps"), len(groups)):
        problems.append(f"the step counts {meta.get('steps')!r} are not one non-negative integer per group")
    if groups is not None:
        problems += carried_problems(meta, len(groups))
    if meta.get("skipped_steps") is not None and not ints([meta["skipped_steps"]]):
        problems.append(f"'skipped_steps' is {meta['skipped_steps']!r}, not a non-negative integer")
    if shapes is not None and not ints(meta.get("offsets"), len(shapes)):
        problems.append(f"the offsets {meta.get('offsets')!r} are not one non-negative integer per param")
    elif shapes is not None:
        spans = sorted((o, o + _dispatch._size(sh)) for o, sh in zip(meta["offsets"], shapes) if _dispatch._size(sh))
        if any(a[1] > b[0] for a, b in itertools.pairwise(spans)):
            problems.append("the offsets place two params' state in the same elements")
    saved = meta.get("params")
    if saved is not None and not (isinstance(saved, dict) and saved.get("kind") in ("buffer", "list")
                                  and isinstance(saved.get("shapes"), list) and all(ints(x) for x in saved["shapes"])
                                  and isinstance(saved.get("dtype"), str)
                                  and (saved["kind"] == "list" or type(saved.get("size")) is int)):
        problems.append(f"'params' is not a description of saved params: {saved!r}")
    if problems:
        raise ValueError(f"{path} has broken metadata: " + "; ".join(problems))
    return meta


def carried_problems(meta, n_groups, states=None):
    """What is wrong with the per-group values besides the step counts that a save carries
    (``restarts``, ``running``, ``started``: state names, among ``states`` when given; each may
    be absent: a save made before they were kept), for checkpoints and sharded manifests alike."""
    problems = []
    restarts, running, started = meta.get("restarts"), meta.get("running"), meta.get("started")
    if started is not None and not (isinstance(started, list) and len(started) == n_groups and all(
            isinstance(s, list) and all(isinstance(n, str) and (states is None or n in states) for n in s)
            for s in started)):
        problems.append(f"'started' is {started!r}, not one list of state names per group")
    if restarts is not None and not (isinstance(restarts, list) and len(restarts) == n_groups
                                     and all(type(r) is bool for r in restarts)):
        problems.append(f"'restarts' is {restarts!r}, not one true or false per group")
    if running is not None and not (isinstance(running, list) and len(running) == n_groups and all(
            isinstance(r, dict) and all(type(v) is float and math.isfinite(v) for v in r.values())
            for r in running)):
        problems.append(f"'running' is {running!r}, not one mapping of finite numbers per group")
    return problems


def _stored_dtype(key, opt, params):
    """The dtype of entry ``key`` (a 16-bit float is read as its bits, then viewed as it)."""
    if key == f"state.{MASTER}":
        return np.dtype(np.float32)
    if key.startswith("state.") and opt.state_bits == 8 and not key.endswith((".absmax", ".small")):
        return np.dtype(np.uint8)  # 8-bit codes
    if key.startswith("state."):
        return opt.state_dtype
    return params.dtype if isinstance(params, ParamBuffer) else np.dtype(opt.dtype)


def _expected_entries(meta, opt):
    """Every entry a checkpoint of this rule may hold."""
    names = {f"state.{s}" for s in opt.rule.states} | {f"state.{MASTER}"}  # a master copy: see _differences
    if opt.state_bits == 8:  # 8-bit state: codes, block scales, and the small tensors' 32-bit state
        names |= {f"state.{s}{x}" for s in opt.rule.states for x in (".absmax", ".small")}
    saved = meta.get("params")
    if saved is not None:
        names |= {"params.arena"} if saved["kind"] == "buffer" else {f"params.{i}" for i in range(len(saved["shapes"]))}
    return names


def _as_kernel_arrays(params):
    if params is None or isinstance(params, ParamBuffer):
        return params
    return [_dispatch.as_kernel_array(a) for a in params]


def _params_meta(params):
    if isinstance(params, ParamBuffer):
        return {"kind": "buffer", "shapes": [list(s) for s in params.shapes], "size": int(params.arena.size),
                "dtype": params.dtype.name}
    return {"kind": "list", "shapes": [list(a.shape) for a in params], "dtype": params[0].dtype.name}


def _differences(meta, opt, params, headers):
    """Every way the checkpoint (metadata and array headers) does not fit ``opt`` and ``params``."""
    problems = []
    name = type(opt).__name__
    if meta["optimizer"] != name:
        problems.append(f"the optimizer is {name} here but {meta['optimizer']} in the checkpoint")
    dtype = opt.dtype.name
    if meta["dtype"] != dtype:
        problems.append(f"dtype is {dtype} here but {meta['dtype']} in the checkpoint")
    shapes = [list(s) for s in opt.shapes]
    if len(shapes) != len(meta["shapes"]):
        problems.append(f"{len(shapes)} params here but {len(meta['shapes'])} in the checkpoint")
    else:
        problems += [f"param {i} has shape {tuple(a)} here but {tuple(b)} in the checkpoint"
                     for i, (a, b) in enumerate(zip(shapes, meta["shapes"])) if a != b]
    counts = [len(g["params"]) for g in opt.param_groups]
    saved_counts = [g["params"] for g in meta["groups"]]
    if counts != saved_counts:
        problems.append(f"params per group are {counts} here but {saved_counts} in the checkpoint")
    end = max([o + _dispatch._size(sh) for o, sh in zip(meta["offsets"], meta["shapes"])] + [0])
    state_dtype = meta.get("state_dtype", dtype)
    if state_dtype != opt.state_dtype.name:
        problems.append(f"the state dtype is {opt.state_dtype.name} here but {state_dtype} in the checkpoint")
    if meta.get("state_bits") != (8 if opt.state_bits == 8 else None):
        problems.append(f"the state is {meta.get('state_bits') or 32}-bit in the checkpoint but "
                        f"{8 if opt.state_bits == 8 else 32}-bit here (state_bits)")
        return problems
    if opt.state_bits == 8 and meta.get("state_code") != opt.state_code:
        problems.append(f"the 8-bit codes are {meta.get('state_code')!r} in the checkpoint but {opt.state_code!r} "
                        "here (state_code): the same codes would mean other values")
    if f"state.{MASTER}" in headers and not opt.master_weights:
        problems.append("the checkpoint holds master weights: load it into an optimizer with master_weights=True")
    elif opt.master_weights and f"state.{MASTER}" not in headers:
        problems.append(f"state.{MASTER} is missing (master_weights=True keeps the params' float32 copy)")
    for key, (shape, dt) in headers.items():
        want = _stored_dtype(key, opt, None)
        if opt.state_bits == 8 and key.startswith("state.") and key != f"state.{MASTER}":
            if dt != want or len(shape) != 1:  # sizes: checked against the 8-bit layout on restore
                problems.append(f"{key} is {dt}{list(shape)}, not a {want} arena")
        elif key.startswith("state.") and (dt != kernel_dtype(want) or len(shape) != 1 or shape[0] < end):
            problems.append(f"{key} is {dt}{list(shape)}, not a {want} arena of >= {end} elements")
    if params is not None and not isinstance(params, ParamBuffer):
        try:  # the loaded values are written into them: each must take them in place
            ref = _dispatch.check_array(_dispatch._Array("params[0]", params[0]))
            for i, a in enumerate(params[1:], start=1):
                _dispatch.check_array(_dispatch._Array(f"params[{i}]", a), like=ref)
        except (TypeError, ValueError) as e:
            problems.append(str(e))
            return problems
    if params is not None:
        saved = meta.get("params")
        if saved is None:
            problems.append("params were given but the checkpoint holds none")
        else:
            here = _params_meta(params)
            for key in ("kind", "shapes", "dtype", "size"):
                if here.get(key) != saved.get(key):
                    problems.append(f"params {key} is {here.get(key)} here but {saved.get(key)} in the checkpoint")
            want = ({"params.arena": (params.arena.size,)} if isinstance(params, ParamBuffer)
                    else {f"params.{i}": tuple(a.shape) for i, a in enumerate(params)})
            for key, shape in want.items():
                if key not in headers:
                    problems.append(f"{key} is missing")
                elif headers[key] != (shape, kernel_dtype(here["dtype"])):
                    got_shape, got_dtype = headers[key]
                    problems.append(f"{key} is {got_dtype}{list(got_shape)}, not {here['dtype']}{list(shape)}")
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
